"""One fused Triton kernel: every statistic of an activation in one read, merged into its slot.

Each program walks a strided share of the (dense, flattened) tensor in tiles. A tile only updates
per-lane accumulators: integer counts of NaN/+Inf/-Inf/zeros/subnormals/would-underflow/
would-overflow (classified on the bits of |x|), min/max over finite values, and float64 sums of
x - shift and its square, where the shift is the program's first-tile mean (so the variance does
not cancel however large the mean is). Each program reduces its lanes once, writes its partial
result to the slot's workspace and takes a ticket; the program holding the last ticket reduces
all partials (Chan again, as a tree) and merges them into the slot of the active half of the
:class:`~torchwatch._table.DeviceTable`, then returns the ticket counter to zero. One launch, one
read of the activation, no atomics on the statistics, no host sync; the launch can be captured
in a CUDA graph or a compiled region, where the sampling flag on the device decides whether a
replay counts.

Tested on CPU tensors with ``TRITON_INTERPRET=1`` against the torch oracle.
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

BLOCK = 1024
MAX_PROGRAMS = 256
NUM_WARPS = 8
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
def _count_below(acc, nz, ab, t_ptr, J: tl.constexpr, LIVE: tl.constexpr):
    """Add this tile's nonzero finite lanes with |x| <= threshold J (bits) to ``acc``."""
    if (LIVE >> J) & 1:
        acc += (nz & (ab <= tl.load(t_ptr + J))).to(tl.int32)
    return acc


@triton.jit
def _count_above(acc, fin, ab, t_ptr, J: tl.constexpr, LIVE: tl.constexpr):
    """Add this tile's finite lanes with |x| > threshold J (bits) to ``acc``."""
    if (LIVE >> J) & 1:
        acc += (fin & (ab > tl.load(t_ptr + J))).to(tl.int32)
    return acc


# Integers that change from call to call are not specialised on (Triton would compile a variant
# for 1 and for multiples of 16: a JIT stall on root call 16 in production).
@triton.jit(do_not_specialize=["iters", "slot", "capacity", "call", "tiny_bits"])
def _stats_kernel(
    x_ptr, n_elements, iters,
    part_ptr, ticket_ptr,
    counts_ptr, moments_ptr, nfcalls_ptr, control_ptr,
    slot, capacity, call,
    under_ptr, over_ptr, tiny_bits,
    K: tl.constexpr, UNDER_LIVE: tl.constexpr, OVER_LIVE: tl.constexpr, IS_BF16: tl.constexpr,
    USE_FLAG: tl.constexpr, CALL_FROM_DEVICE: tl.constexpr, BLOCK: tl.constexpr, P_POW2: tl.constexpr,
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
        # Tiles only update per-lane accumulators; each program reduces once, at the end. The
        # cast columns are separate accumulators, and only those whose threshold some value of
        # the source dtype can cross are counted at all (UNDER_LIVE/OVER_LIVE bits).
        # Moments are taken of x - shift, shift the mean of this program's first tile: computed
        # here, once, so the loop below holds no block reduction (it cost ~30 shuffles and their
        # bookkeeping per iteration; benchmarks/kernel_static.py).
        first = pid.to(tl.int64) * BLOCK + lanes
        first_in = first < n_elements
        if IS_BF16:
            raw0 = tl.load(x_ptr + first, mask=first_in, other=0).to(tl.int32) & 0xFFFF
            v0 = (raw0 << 16).to(tl.float32, bitcast=True)
        else:
            v0 = tl.load(x_ptr + first, mask=first_in, other=0.0).to(tl.float32)
        fin0 = first_in & ((v0.to(tl.int32, bitcast=True) & 0x7FFFFFFF) < 0x7F800000)
        shift = tl.sum(tl.where(fin0, v0.to(tl.float64), 0.0), axis=0) / tl.maximum(
            tl.sum(fin0.to(tl.float64), axis=0), 1.0
        )
        s1 = tl.zeros((BLOCK,), tl.float64)
        s2 = tl.zeros((BLOCK,), tl.float64)
        lo = tl.full((BLOCK,), inf, tl.float32)
        hi = tl.full((BLOCK,), -inf, tl.float32)
        n_in = tl.zeros((), tl.int64)
        c_nan = tl.zeros((BLOCK,), tl.int32)
        c_pinf = tl.zeros((BLOCK,), tl.int32)
        c_ninf = tl.zeros((BLOCK,), tl.int32)
        c_zero = tl.zeros((BLOCK,), tl.int32)
        c_sub = tl.zeros((BLOCK,), tl.int32)
        u0 = tl.zeros((BLOCK,), tl.int32)
        u1 = tl.zeros((BLOCK,), tl.int32)
        u2 = tl.zeros((BLOCK,), tl.int32)
        u3 = tl.zeros((BLOCK,), tl.int32)
        o0 = tl.zeros((BLOCK,), tl.int32)
        o1 = tl.zeros((BLOCK,), tl.int32)
        o2 = tl.zeros((BLOCK,), tl.int32)
        o3 = tl.zeros((BLOCK,), tl.int32)
        for i in range(0, iters):  # this program's tiles: pid, pid + nprog, ...
            start = (pid + i * nprog).to(tl.int64) * BLOCK
            offs = start + lanes
            inside = offs < n_elements
            n_in += tl.minimum(tl.maximum(n_elements - start, 0), BLOCK)
            if IS_BF16:  # widened by hand: exact for subnormals on every backend
                raw = tl.load(x_ptr + offs, mask=inside, other=0).to(tl.int32) & 0xFFFF
                v = (raw << 16).to(tl.float32, bitcast=True)
            else:
                v = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
            # Classify on the bits of |x|: they order like |x|, and no flush-to-zero can touch them.
            bits = v.to(tl.int32, bitcast=True)
            ab = bits & 0x7FFFFFFF
            fin = ab < 0x7F800000  # masked-off lanes read 0: finite, counted out of zeros below
            nz = fin & (ab != 0)
            c_nan += (ab > 0x7F800000).to(tl.int32)
            c_pinf += (bits == 0x7F800000).to(tl.int32)
            c_ninf += (bits == -8388608).to(tl.int32)  # 0xFF800000 as int32
            c_zero += (inside & (ab == 0)).to(tl.int32)
            c_sub += (nz & (ab < tiny_bits)).to(tl.int32)
            u0 = _count_below(u0, nz, ab, under_ptr, 0, UNDER_LIVE)
            u1 = _count_below(u1, nz, ab, under_ptr, 1, UNDER_LIVE)
            u2 = _count_below(u2, nz, ab, under_ptr, 2, UNDER_LIVE)
            u3 = _count_below(u3, nz, ab, under_ptr, 3, UNDER_LIVE)
            o0 = _count_above(o0, fin, ab, over_ptr, 0, OVER_LIVE)
            o1 = _count_above(o1, fin, ab, over_ptr, 1, OVER_LIVE)
            o2 = _count_above(o2, fin, ab, over_ptr, 2, OVER_LIVE)
            o3 = _count_above(o3, fin, ab, over_ptr, 3, OVER_LIVE)
            fin_in = fin & inside
            lo = tl.minimum(lo, tl.where(fin_in, v, inf))
            hi = tl.maximum(hi, tl.where(fin_in, v, -inf))
            d = tl.where(fin_in, v.to(tl.float64) - shift, 0.0)
            s1 += d
            s2 += d * d

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
        tl.store(row + 8, tl.sum(c_zero, axis=0).to(tl.float64))
        tl.store(row + 9, tl.sum(c_sub, axis=0).to(tl.float64))
        under = row + _N_PART
        over = row + _N_PART + K
        tl.store(under + 0, tl.sum(u0, axis=0).to(tl.float64))
        tl.store(over + 0, tl.sum(o0, axis=0).to(tl.float64))
        if K > 1:
            tl.store(under + 1, tl.sum(u1, axis=0).to(tl.float64))
            tl.store(over + 1, tl.sum(o1, axis=0).to(tl.float64))
        if K > 2:
            tl.store(under + 2, tl.sum(u2, axis=0).to(tl.float64))
            tl.store(over + 2, tl.sum(o2, axis=0).to(tl.float64))
        if K > 3:
            tl.store(under + 3, tl.sum(u3, axis=0).to(tl.float64))
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
    programs = max(1, min(MAX_PROGRAMS, triton.cdiv(n, BLOCK)))
    under, over = ws.thresholds[id(plan)]
    from_device = isinstance(call, torch.Tensor)
    _stats_kernel[(programs,)](
        flat, n, triton.cdiv(triton.cdiv(n, BLOCK), programs),
        ws.partials[slot], ws.tickets[slot:],
        table.counts, table.moments, table.nfcalls, table.control,
        slot, table.capacity, 0 if from_device else int(min(call, NO_CALL - 1)),
        under, over, ws.tiny_bits[id(plan)],
        K=len(plan.names), UNDER_LIVE=ws.live[id(plan)][0], OVER_LIVE=ws.live[id(plan)][1], IS_BF16=is_bf16,
        # P_POW2 fixed at the workspace's row count: one compiled variant per dtype, whatever the size
        USE_FLAG=use_flag, CALL_FROM_DEVICE=from_device, BLOCK=BLOCK, P_POW2=MAX_PROGRAMS,
        num_warps=NUM_WARPS,
    )  # fmt: skip


_POINTERS = {"part_ptr": "*fp64", "ticket_ptr": "*i32", "counts_ptr": "*i64", "moments_ptr": "*fp64",
             "nfcalls_ptr": "*i64", "control_ptr": "*i64", "under_ptr": "*i32", "over_ptr": "*i32"}  # fmt: skip


def variants() -> Iterator[tuple[str, Any]]:
    """``(name, ASTSource)`` for every variant of the kernel the watch launches, to compile
    ahead of time without a GPU (``benchmarks/kernel_static.py``, the tests)."""
    names = list(inspect.signature(_stats_kernel.fn).parameters)
    for (dtype, x_type, bf16), use_flag, from_device in itertools.product(
        (("fp32", "*fp32", False), ("fp16", "*fp16", False), ("bf16", "*i16", True)), (False, True), (False, True)
    ):
        consts = {"K": 4, "UNDER_LIVE": 0b1011, "OVER_LIVE": 0b0111, "IS_BF16": bf16, "USE_FLAG": use_flag,
                  "CALL_FROM_DEVICE": from_device, "BLOCK": BLOCK, "P_POW2": MAX_PROGRAMS}  # fmt: skip
        signature = {
            n: "constexpr" if n in consts else (x_type if n == "x_ptr" else _POINTERS.get(n, "i32")) for n in names
        }
        source = ASTSource(
            fn=_stats_kernel, signature=signature, constexprs={(names.index(n),): v for n, v in consts.items()}
        )
        yield f"{dtype}/flag={int(use_flag)}/device_call={int(from_device)}", source
