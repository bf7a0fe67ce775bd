"""One fused Triton kernel: every statistic of an activation in one read, merged into its slot.

Each program walks a strided share of the (dense, flattened) tensor in groups of ``UNROLL``
tiles. A tile only updates per-lane accumulators; each program reduces its lanes once, writes
its partial result to the slot's workspace and takes a ticket; the program holding the last
ticket reduces all partials (Chan again, as a tree) and merges them into the slot of the active
half of the :class:`~torchwatch._table.DeviceTable`, then returns the ticket counter to zero. One
launch, no atomics on the statistics, no host sync; the launch can be captured in a CUDA graph or
a compiled region, where the sampling flag on the device decides whether a replay counts.

Where the instructions go (``benchmarks/kernel_static.py`` reads them from the sm_90 SASS; the
budget is ~20 per element for 16-bit inputs, ~40 for float32, to keep up with HBM):

* **A fast pass over whole groups, without masks**, counting only what a finite value below every
  over-threshold can move: zeros, |x| < tiny, |x| <= each live under-threshold (on the bits of
  |x|, which order like |x| and which no flush-to-zero touches), min/max, and float64 sums of
  x - shift and its square (shift: the finite mean of the program's first tile, so the variance
  does not cancel however large the mean is). A count is ``acc += (|x|bits - t) >> 31``: a
  subtraction and a shift-add, negated once at the end.
* **A gate after the loop**: NaN makes the sums NaN, an infinity or a value over the smallest
  crossable over-threshold shows in min/max. A program whose share shows either reads it again
  with every count (NaN, +Inf, -Inf, overflow) and masks, replacing the fast totals: exact
  counts always, at twice the read only where the tensor already holds a fault.
* **The tail** (less than a whole group) is read once, with masks and every count, by the program
  that would have taken the next group.

Tested on CPU tensors with ``TRITON_INTERPRET=1`` against the float64 oracle, both passes and the
tail on purpose (tests/test_triton_kernel.py).
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Iterator
from typing import Any

import torch
import triton
import triton.language as tl
from triton.compiler import ASTSource

from .._casts import CastPlan
from .._table import ACTIVE, CALL_NONFINITE, ENABLED, N_FIXED, NO_CALL, mark_static

NUM_WARPS = 8
BLOCK = 1024  # elements per tile: 4 per thread
UNROLL = 4  # tiles per loop iteration: independent loads in flight, loop bookkeeping amortised
MAX_PROGRAMS = 256
MAX_CAST_DTYPES = 4  # under/over columns the kernel keeps per launch
# partial row: n, mean, m2, min, max, nan, posinf, neginf, zeros, subnormal, under[K], over[K]
N_PART_FIXED = 10
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# A @triton.jit function may read only globals that are tl.constexpr (the interpreter does not check).
_N_PART = tl.constexpr(N_PART_FIXED)
_N_FIXED = tl.constexpr(N_FIXED)
_ACTIVE = tl.constexpr(ACTIVE)
_ENABLED = tl.constexpr(ENABLED)
_CALL_NONFINITE = tl.constexpr(CALL_NONFINITE)


@triton.jit
def _chan(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    n = n_a + n_b
    w_b = tl.where(n > 0, n_b / tl.maximum(n, 1.0), 0.0)
    delta = mean_b - mean_a
    return n, mean_a + delta * w_b, m2_a + m2_b + delta * delta * n_a * w_b


@triton.jit
def _load(ptrs, inside, IS_BF16: tl.constexpr, MASKED: tl.constexpr):
    """One tile as float32 (bfloat16 widened by hand: exact for subnormals on every backend)."""
    if IS_BF16:
        if MASKED:  # noqa: SIM108 - constexpr branches, resolved at compile time
            raw = tl.load(ptrs, mask=inside, other=0)
        else:
            raw = tl.load(ptrs)
        v = (raw.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        if MASKED:  # noqa: SIM108
            v = tl.load(ptrs, mask=inside, other=0.0).to(tl.float32)
        else:
            v = tl.load(ptrs).to(tl.float32)
    return v


@triton.jit
def _at_most(acc, ab, t1, J: tl.constexpr, LIVE: tl.constexpr):
    """Subtract from ``acc`` this tile's lanes with |x| < t1 (as bits), if column J is counted.

    ``(ab - t1) >> 31`` is -1 exactly where ab < t1 (no overflow: both lie in [0, 2**31)): one
    subtraction and one shift-add per lane, where a compare-and-increment costs three.
    """
    if (LIVE >> J) & 1:
        acc += (ab - t1) >> 31
    return acc


@triton.jit
def _above(acc, fin, ab, t, J: tl.constexpr, LIVE: tl.constexpr):
    """Add this tile's finite lanes with |x| > t (as bits) to ``acc``, if column J is counted at all."""
    if (LIVE >> J) & 1:
        acc += (fin & (ab > t)).to(tl.int32)
    return acc


@triton.jit
def _under_total(u, zeros, J: tl.constexpr, LIVE: tl.constexpr):
    """Column J's underflow count: lanes with |x| <= its threshold, less the zeros (0 if not counted)."""
    total = 0.0
    if (LIVE >> J) & 1:
        total = (-tl.sum(u, axis=0) - zeros).to(tl.float64)
    return total


@triton.jit
def _threshold(t_ptr, J: tl.constexpr, LIVE: tl.constexpr, PLUS: tl.constexpr):
    """Threshold J as int32 bits plus PLUS, loaded once before the loops (0 where not counted)."""
    if (LIVE >> J) & 1:  # noqa: SIM108 - a constexpr branch
        t = tl.load(t_ptr + J) + PLUS
    else:
        t = 0
    return t


@triton.jit
def _fresh(BLOCK: tl.constexpr):
    """Empty accumulators for _common: zeros, small, under x4 (negated counts), lo, hi, s1, s2."""
    zero = tl.zeros((BLOCK,), tl.int32)
    lo = tl.full((BLOCK,), float("inf"), tl.float32)
    hi = tl.full((BLOCK,), -float("inf"), tl.float32)
    s = tl.zeros((BLOCK,), tl.float64)
    return zero, zero, zero, zero, zero, zero, lo, hi, s, s


@triton.jit
def _common(v, ab, keep, shift, tiny_bits, c_zero, c_small, u0, u1, u2, u3, lo, hi, s1, s2,
            t_u0, t_u1, t_u2, t_u3, UNDER_LIVE: tl.constexpr, MASKED: tl.constexpr):  # fmt: skip
    """What every tile adds: minus the zeros, minus the lanes with |x| < tiny and with |x| <=
    each under-threshold (zeros included there; the totals are negated and the zeros subtracted
    once at the end), min/max and the shifted moments over the lanes kept."""
    if MASKED:
        ab = tl.where(keep, ab, 0x7FFFFFFF)  # a lane not kept is below no threshold
        lo = tl.minimum(lo, tl.where(keep, v, float("inf")))
        hi = tl.maximum(hi, tl.where(keep, v, -float("inf")))
        d = tl.where(keep, v.to(tl.float64) - shift, 0.0)
    else:
        lo = tl.minimum(lo, v)
        hi = tl.maximum(hi, v)
        d = v.to(tl.float64) - shift
    c_zero += (ab - 1) >> 31
    c_small += (ab - tiny_bits) >> 31
    u0 = _at_most(u0, ab, t_u0, 0, UNDER_LIVE)
    u1 = _at_most(u1, ab, t_u1, 1, UNDER_LIVE)
    u2 = _at_most(u2, ab, t_u2, 2, UNDER_LIVE)
    u3 = _at_most(u3, ab, t_u3, 3, UNDER_LIVE)
    s1 += d
    s2 += d * d
    return c_zero, c_small, u0, u1, u2, u3, lo, hi, s1, s2


@triton.jit
def _rare(v, ab, inside, c_nan, c_pinf, c_ninf, o0, o1, o2, o3, t_o0, t_o1, t_o2, t_o3, OVER_LIVE: tl.constexpr):
    """The counts a finite tile below every over-threshold never moves: NaN, +Inf, -Inf, overflow."""
    bits = v.to(tl.int32, bitcast=True)
    fin = ab < 0x7F800000
    c_nan += (inside & (ab > 0x7F800000)).to(tl.int32)
    c_pinf += (inside & (bits == 0x7F800000)).to(tl.int32)
    c_ninf += (inside & (bits == -8388608)).to(tl.int32)  # 0xFF800000 as int32
    fin = fin & inside
    o0 = _above(o0, fin, ab, t_o0, 0, OVER_LIVE)
    o1 = _above(o1, fin, ab, t_o1, 1, OVER_LIVE)
    o2 = _above(o2, fin, ab, t_o2, 2, OVER_LIVE)
    o3 = _above(o3, fin, ab, t_o3, 3, OVER_LIVE)
    return fin, c_nan, c_pinf, c_ninf, o0, o1, o2, o3


# Integers that change from call to call are not specialised on (Triton would compile a variant
# for 1 and for multiples of 16: a JIT stall on root call 16 in production).
@triton.jit(do_not_specialize=["n_elements", "slot", "capacity", "call", "tiny_bits"])
def _stats_kernel(
    x_ptr, n_elements,
    part_ptr, ticket_ptr,
    counts_ptr, moments_ptr, nfcalls_ptr, control_ptr,
    slot, capacity, call,
    under_ptr, over_ptr, tiny_bits, gate,
    K: tl.constexpr, UNDER_LIVE: tl.constexpr, OVER_LIVE: tl.constexpr, IS_BF16: tl.constexpr,
    USE_FLAG: tl.constexpr, CALL_FROM_DEVICE: tl.constexpr, BLOCK: tl.constexpr, UNROLL: tl.constexpr,
    P_POW2: tl.constexpr,
):  # fmt: skip
    enabled = 1
    if USE_FLAG:
        enabled = tl.load(control_ptr + _ENABLED)
    if enabled != 0:
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        npart = _N_PART + 2 * K
        inf = float("inf")
        lanes = tl.arange(0, BLOCK)
        group = BLOCK * UNROLL
        full = n_elements // group  # groups of UNROLL whole tiles; the rest is the tail
        mine = tl.maximum(full - pid + nprog - 1, 0) // nprog  # groups pid, pid + nprog, ...
        t_u0 = _threshold(under_ptr, 0, UNDER_LIVE, 1)
        t_u1 = _threshold(under_ptr, 1, UNDER_LIVE, 1)
        t_u2 = _threshold(under_ptr, 2, UNDER_LIVE, 1)
        t_u3 = _threshold(under_ptr, 3, UNDER_LIVE, 1)
        t_o0 = _threshold(over_ptr, 0, OVER_LIVE, 0)
        t_o1 = _threshold(over_ptr, 1, OVER_LIVE, 0)
        t_o2 = _threshold(over_ptr, 2, OVER_LIVE, 0)
        t_o3 = _threshold(over_ptr, 3, OVER_LIVE, 0)
        # Moments are taken of x - shift, shift the finite mean of this program's first tile, so
        # the variance does not cancel however large the mean is.
        first = pid.to(tl.int64) * group + lanes
        v0 = _load(x_ptr + first, first < n_elements, IS_BF16, True)
        fin0 = (first < n_elements) & ((v0.to(tl.int32, bitcast=True) & 0x7FFFFFFF) < 0x7F800000)
        shift = tl.sum(tl.where(fin0, v0.to(tl.float64), 0.0), axis=0) / tl.maximum(
            tl.sum(fin0.to(tl.float64), axis=0), 1.0
        )
        c_zero, c_small, u0, u1, u2, u3, lo, hi, s1, s2 = _fresh(BLOCK)
        # The fast pass: whole tiles, no masks, and only the counts a finite value below every
        # over-threshold can move. NaN reaches s1, an infinity hi/lo or s1, a value over a
        # threshold hi/lo: so the gate below sees every tile the fast pass could get wrong.
        ptrs = x_ptr + pid.to(tl.int64) * group + lanes
        step = nprog.to(tl.int64) * group
        for _g in range(0, mine):
            for u in tl.static_range(UNROLL):
                v = _load(ptrs + u * BLOCK, lanes < BLOCK, IS_BF16, False)
                ab = v.to(tl.int32, bitcast=True) & 0x7FFFFFFF
                c_zero, c_small, u0, u1, u2, u3, lo, hi, s1, s2 = _common(
                    v, ab, ab == ab, shift, tiny_bits, c_zero, c_small, u0, u1, u2, u3, lo, hi, s1, s2,
                    t_u0, t_u1, t_u2, t_u3, UNDER_LIVE, False,
                )  # fmt: skip
            ptrs += step
        zero = tl.zeros((BLOCK,), tl.int32)
        c_nan, c_pinf, c_ninf, o0, o1, o2, o3 = zero, zero, zero, zero, zero, zero, zero
        total = tl.sum(s1, axis=0) + tl.sum(s2, axis=0)
        widest = tl.maximum(tl.max(hi, axis=0), -tl.min(lo, axis=0))
        if (total != total) | (widest > gate):  # rare: read this program's share again, in full
            c_zero, c_small, u0, u1, u2, u3, lo, hi, s1, s2 = _fresh(BLOCK)
            ptrs = x_ptr + pid.to(tl.int64) * group + lanes
            for i in range(0, mine * UNROLL):
                v = _load(ptrs, lanes < BLOCK, IS_BF16, False)
                ab = v.to(tl.int32, bitcast=True) & 0x7FFFFFFF
                fin, c_nan, c_pinf, c_ninf, o0, o1, o2, o3 = _rare(
                    v, ab, lanes < BLOCK, c_nan, c_pinf, c_ninf, o0, o1, o2, o3, t_o0, t_o1, t_o2, t_o3, OVER_LIVE
                )
                c_zero, c_small, u0, u1, u2, u3, lo, hi, s1, s2 = _common(
                    v, ab, fin, shift, tiny_bits, c_zero, c_small, u0, u1, u2, u3, lo, hi, s1, s2,
                    t_u0, t_u1, t_u2, t_u3, UNDER_LIVE, True,
                )  # fmt: skip
                # the next tile of this program's share: UNROLL tiles in a group, then the next group
                ptrs += tl.where((i + 1) % UNROLL == 0, step - (UNROLL - 1) * BLOCK, BLOCK)
        # The tail (fewer than UNROLL whole tiles, then a partial one) belongs to the program that
        # would have taken the next group; it is read in full, with masks.
        if pid == full % nprog:
            for u in range(0, UNROLL):
                offs = full.to(tl.int64) * group + u * BLOCK + lanes
                inside = offs < n_elements
                v = _load(x_ptr + offs, inside, IS_BF16, True)
                ab = v.to(tl.int32, bitcast=True) & 0x7FFFFFFF
                fin, c_nan, c_pinf, c_ninf, o0, o1, o2, o3 = _rare(
                    v, ab, inside, c_nan, c_pinf, c_ninf, o0, o1, o2, o3, t_o0, t_o1, t_o2, t_o3, OVER_LIVE
                )
                c_zero, c_small, u0, u1, u2, u3, lo, hi, s1, s2 = _common(
                    v, ab, fin, shift, tiny_bits, c_zero, c_small, u0, u1, u2, u3, lo, hi, s1, s2,
                    t_u0, t_u1, t_u2, t_u3, UNDER_LIVE, True,
                )  # fmt: skip
            n_in = mine * group + tl.minimum(n_elements - full * group, group)
        else:
            n_in = mine * group

        zeros = -tl.sum(c_zero, axis=0)
        c_nonfinite = tl.sum(c_nan + c_pinf + c_ninf, axis=0)
        n = (n_in - c_nonfinite).to(tl.float64)
        sd = tl.sum(s1, axis=0)
        mean = shift + sd / tl.maximum(n, 1.0)
        m2 = tl.maximum(tl.sum(s2, axis=0) - sd * sd / tl.maximum(n, 1.0), 0.0)
        row = part_ptr + pid * npart
        tl.store(row + 0, n)
        tl.store(row + 1, tl.where(n > 0, mean, 0.0))
        tl.store(row + 2, m2)
        tl.store(row + 3, tl.min(lo, axis=0).to(tl.float64))
        tl.store(row + 4, tl.max(hi, axis=0).to(tl.float64))
        tl.store(row + 5, tl.sum(c_nan, axis=0).to(tl.float64))
        tl.store(row + 6, tl.sum(c_pinf, axis=0).to(tl.float64))
        tl.store(row + 7, tl.sum(c_ninf, axis=0).to(tl.float64))
        tl.store(row + 8, zeros.to(tl.float64))
        tl.store(row + 9, (-tl.sum(c_small, axis=0) - zeros).to(tl.float64))
        under = row + _N_PART
        over = row + _N_PART + K
        tl.store(under + 0, _under_total(u0, zeros, 0, UNDER_LIVE))
        tl.store(over + 0, tl.sum(o0, axis=0).to(tl.float64))
        if K > 1:
            tl.store(under + 1, _under_total(u1, zeros, 1, UNDER_LIVE))
            tl.store(over + 1, tl.sum(o1, axis=0).to(tl.float64))
        if K > 2:
            tl.store(under + 2, _under_total(u2, zeros, 2, UNDER_LIVE))
            tl.store(over + 2, tl.sum(o2, axis=0).to(tl.float64))
        if K > 3:
            tl.store(under + 3, _under_total(u3, zeros, 3, UNDER_LIVE))
            tl.store(over + 3, tl.sum(o3, axis=0).to(tl.float64))

        # the last program to finish folds every partial into the slot
        ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
        if ticket == nprog - 1:
            rows = tl.arange(0, P_POW2)
            live = rows < nprog
            base = part_ptr + rows * npart
            p_n = tl.load(base + 0, mask=live, other=0.0)
            p_mean = tl.load(base + 1, mask=live, other=0.0)
            p_m2 = tl.load(base + 2, mask=live, other=0.0)
            n_b, mean_b, m2_b = tl.reduce((p_n, p_mean, p_m2), 0, _chan)
            lo_b = tl.min(tl.load(base + 3, mask=live, other=inf), axis=0)
            hi_b = tl.max(tl.load(base + 4, mask=live, other=-inf), axis=0)

            active = tl.load(control_ptr + _ACTIVE)
            crow = counts_ptr + (active * capacity + slot) * (_N_FIXED + 2 * K)
            mrow = moments_ptr + (active * capacity + slot) * 4
            frow = nfcalls_ptr + (active * capacity + slot) * 2
            nonfinite = tl.zeros((), tl.int64)
            tl.store(crow + 0, tl.load(crow + 0) + 1)  # calls
            n_a = tl.load(crow + 1).to(tl.float64)
            tl.store(crow + 1, tl.load(crow + 1) + n_b.to(tl.int64))
            for j in tl.static_range(5):  # nan, posinf, neginf, zeros, subnormal
                c = tl.sum(tl.load(base + 5 + j, mask=live, other=0.0), axis=0).to(tl.int64)
                tl.store(crow + 2 + j, tl.load(crow + 2 + j) + c)
                if j < 3:
                    nonfinite += c
            for k in tl.static_range(2 * K):
                c = tl.sum(tl.load(base + _N_PART + k, mask=live, other=0.0), axis=0).to(tl.int64)
                tl.store(crow + _N_FIXED + k, tl.load(crow + _N_FIXED + k) + c)
            mean_a = tl.load(mrow + 0)
            m2_a = tl.load(mrow + 1)
            _, mean_n, m2_n = _chan(n_a, mean_a, m2_a, n_b, mean_b, m2_b)
            tl.store(mrow + 0, mean_n)
            tl.store(mrow + 1, m2_n)
            tl.store(mrow + 2, tl.minimum(tl.load(mrow + 2), lo_b))
            tl.store(mrow + 3, tl.maximum(tl.load(mrow + 3), hi_b))
            if nonfinite > 0:
                if CALL_FROM_DEVICE:  # noqa: SIM108 - a constexpr branch, resolved at compile time
                    call_index = tl.load(control_ptr + 0) - 1
                else:
                    call_index = call
                tl.store(frow + 0, tl.minimum(tl.load(frow + 0), call_index))
                tl.store(frow + 1, tl.maximum(tl.load(frow + 1), call_index))
                tl.atomic_add(control_ptr + _CALL_NONFINITE, nonfinite)
            tl.atomic_xchg(ticket_ptr, 0)


class Workspace:
    """Per-slot partial rows and tickets of one :class:`DeviceTable`, and the thresholds of
    each cast plan on its device: all allocated up front, never inside a trace or a capture."""

    def __init__(self, table, plans: list[CastPlan]) -> None:
        with torch.inference_mode(False), torch.no_grad():
            self.partials = torch.zeros(
                table.capacity, MAX_PROGRAMS, N_PART_FIXED + 2 * table.k, dtype=torch.float64, device=table.device
            )
            self.tickets = torch.zeros(table.capacity, dtype=torch.int32, device=table.device)
            # thresholds as the int32 bits of float32 |x| (exact for every dtype the kernel reads)
            self.thresholds = {
                id(plan): (_bits(plan.under, table.device), _bits(plan.over, table.device)) for plan in plans
            }
        self.tiny_bits = {id(plan): _bits_of(plan.tiny) for plan in plans}
        self.live = {id(plan): live_columns(plan) for plan in plans}
        self.gate = {id(plan): gate(plan) for plan in plans}
        mark_static(self.partials, self.tickets, *(t for pair in self.thresholds.values() for t in pair))


def _bits(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor((*values, 0.0), dtype=torch.float32).view(torch.int32).to(device)


def _bits_of(value: float) -> int:
    return int(torch.tensor([value], dtype=torch.float32).view(torch.int32))


def _flat(x: torch.Tensor) -> torch.Tensor:
    """A 1-D view of every element of ``x`` (order is irrelevant to the statistics).

    A dense tensor in any dimension order (channels_last, a transpose) is viewed without a copy;
    only a tensor with gaps (a strided slice) is copied.
    """
    if x.is_contiguous():
        return x.reshape(-1)
    order = sorted(range(x.dim()), key=lambda d: (x.stride(d), x.size(d)), reverse=True)
    y = x.permute(order)
    return y.reshape(-1) if y.is_contiguous() else x.contiguous().reshape(-1)


def live_columns(plan: CastPlan) -> tuple[int, int]:
    """Bitmasks of the cast columns some value of the source dtype can cross (the others stay 0).

    A float16 activation can never underflow or overflow a bfloat16 cast, for instance; the
    kernel skips such columns entirely.
    """
    under = sum(1 << j for j, t in enumerate(plan.under) if t > 0.0)
    over = sum(1 << j for j, t in enumerate(plan.over) if t < plan.src_max)
    return under, over


def group(dtype: torch.dtype) -> int:
    """Elements per iteration of a program's loop (UNROLL tiles): a program's share is whole
    groups, and the tail after the last whole group is read with masks."""
    return BLOCK * UNROLL


def gate(plan: CastPlan) -> float:
    """The |x| above which the fast pass may miss a count: the smallest over-threshold some value
    of the source dtype can cross, else the source's largest finite value (so only Inf passes it)."""
    crossable = [t for j, t in enumerate(plan.over) if live_columns(plan)[1] >> j & 1]
    return min(crossable, default=plan.src_max)


def supports(x: torch.Tensor, k: int) -> bool:
    """Whether the kernel takes this tensor with ``k`` cast dtypes (the torch-ops twin does otherwise)."""
    return x.dtype in DTYPES and k <= MAX_CAST_DTYPES


def merge_into(table, slot: int, x: torch.Tensor, plan: CastPlan, call: int | torch.Tensor, *, use_flag: bool) -> None:
    """The Triton twin of :func:`torchwatch.kernels.torch_ops.merge_into` (same effect)."""
    ws = table.scratch
    flat = _flat(x)
    is_bf16 = flat.dtype == torch.bfloat16
    if is_bf16:
        flat = flat.view(torch.int16)
    n = flat.numel()
    programs = max(1, min(MAX_PROGRAMS, triton.cdiv(n, group(x.dtype))))
    under, over = ws.thresholds[id(plan)]
    from_device = isinstance(call, torch.Tensor)
    _stats_kernel[(programs,)](
        flat, n,
        ws.partials[slot], ws.tickets[slot:],
        table.counts, table.moments, table.nfcalls, table.control,
        slot, table.capacity, 0 if from_device else int(min(call, NO_CALL - 1)),
        under, over, ws.tiny_bits[id(plan)], ws.gate[id(plan)],
        K=len(plan.names), UNDER_LIVE=ws.live[id(plan)][0], OVER_LIVE=ws.live[id(plan)][1], IS_BF16=is_bf16,
        # P_POW2 fixed at the workspace's row count: one compiled variant per dtype, whatever the size
        USE_FLAG=use_flag, CALL_FROM_DEVICE=from_device, BLOCK=BLOCK, UNROLL=UNROLL, P_POW2=MAX_PROGRAMS,
        num_warps=NUM_WARPS,
    )  # fmt: skip


_SCALARS = {"part_ptr": "*fp64", "ticket_ptr": "*i32", "counts_ptr": "*i64", "moments_ptr": "*fp64",
            "nfcalls_ptr": "*i64", "control_ptr": "*i64", "under_ptr": "*i32", "over_ptr": "*i32",
            "gate": "fp32"}  # fmt: skip


def variants() -> Iterator[tuple[str, Any]]:
    """``(name, ASTSource)`` for every variant of the kernel the watch launches, to compile
    ahead of time without a GPU (``benchmarks/kernel_static.py``, the tests)."""
    names = list(inspect.signature(_stats_kernel.fn).parameters)
    for (dtype, x_type, bf16), use_flag, from_device in itertools.product(
        (("fp32", "*fp32", False), ("fp16", "*fp16", False), ("bf16", "*i16", True)), (False, True), (False, True)
    ):
        consts = {"K": 4, "UNDER_LIVE": 0b1011, "OVER_LIVE": 0b0111, "IS_BF16": bf16, "USE_FLAG": use_flag,
                  "CALL_FROM_DEVICE": from_device, "BLOCK": BLOCK, "UNROLL": UNROLL,
                  "P_POW2": MAX_PROGRAMS}  # fmt: skip
        signature = {
            n: "constexpr" if n in consts else (x_type if n == "x_ptr" else _SCALARS.get(n, "i32")) for n in names
        }
        # as launched: the caching allocator's blocks are aligned, so Triton specialises every
        # pointer as 16-byte aligned (what lets the loads vectorise)
        aligned = {(names.index(n),): [["tt.divisibility", 16]] for n, t in signature.items() if t.startswith("*")}
        source = ASTSource(
            fn=_stats_kernel,
            signature=signature,
            constexprs={(names.index(n),): v for n, v in consts.items()},
            attrs=aligned,
        )
        yield f"{dtype}/flag={int(use_flag)}/device_call={int(from_device)}", source
