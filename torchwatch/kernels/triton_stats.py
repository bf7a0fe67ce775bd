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

from .._casts import CastPlan, float32_bits
from .._table import ENABLED, NO_CALL, mark_static
from .descriptors import GROUPED_BYTES, DescriptorRing
from .triton_tile import N_PART_FIXED, measure_share

NUM_WARPS = 8
BLOCK = 1024  # elements per tile: 4 per thread
# Bytes each thread loads per loop iteration, all issued before the first is used: what keeps
# HBM busy. Little's law on an H200: ~4.8 TB/s x ~0.6 us latency / 132 SMs ~ 22 KB in flight per
# SM; at 16 resident warps, 64 B per thread is 32 KB (benchmarks/kernel_static.py reads it back).
# So UNROLL tiles per iteration: 4 of float32 (a 16-byte load each), 8 of float16/bfloat16.
BYTES_PER_ITERATION = 64
MAX_PROGRAMS = 256
# Grouped launches (one per root call and dtype, for outputs of at most GROUPED_BYTES each): at
# most GROUPED_PROGRAMS programs per tensor, at most GROUPED_ROWS tensors per launch.
GROUPED_PROGRAMS = 16
GROUPED_ROWS = 512
DESCRIPTOR = 4  # a grouped launch's row: address, elements, slot, programs
MAX_CAST_DTYPES = 4  # under/over columns the kernel keeps per launch
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# A @triton.jit function may read only globals that are tl.constexpr (the interpreter does not check).
_ENABLED = tl.constexpr(ENABLED)
N_PART = tl.constexpr(N_PART_FIXED)


def unroll(dtype: torch.dtype) -> int:
    """Tiles per loop iteration for this dtype: ``BYTES_PER_ITERATION`` per thread."""
    return max(1, BYTES_PER_ITERATION // (BLOCK // (32 * NUM_WARPS) * dtype.itemsize))


def group(dtype: torch.dtype) -> int:
    """Elements per loop iteration of a program: its share is whole groups; the tail after the
    last one is read with masks."""
    return BLOCK * unroll(dtype)


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
        measure_share(
            x_ptr, n_elements, tl.program_id(0), tl.num_programs(0), part_ptr, ticket_ptr,
            counts_ptr, moments_ptr, nfcalls_ptr, control_ptr, slot, capacity, call,
            under_ptr, over_ptr, tiny_bits, gate,
            K, UNDER_LIVE, OVER_LIVE, IS_BF16, CALL_FROM_DEVICE, BLOCK, UNROLL, P_POW2,
        )  # fmt: skip


@triton.jit(do_not_specialize=["capacity", "call", "tiny_bits"])
def _grouped_kernel(
    desc_ptr,
    part_ptr, ticket_ptr,
    counts_ptr, moments_ptr, nfcalls_ptr, control_ptr,
    capacity, call,
    under_ptr, over_ptr, tiny_bits, gate,
    X_TYPE: tl.constexpr, K: tl.constexpr, UNDER_LIVE: tl.constexpr, OVER_LIVE: tl.constexpr,
    IS_BF16: tl.constexpr, BLOCK: tl.constexpr, UNROLL: tl.constexpr, ROWS_PER_SLOT: tl.constexpr,
    P_POW2: tl.constexpr,
):  # fmt: skip
    """Many tensors of one dtype in one launch: program (i, j) is program j of the tensor in
    descriptor row i (address, elements, slot, programs), exactly as the one-tensor kernel's
    program j would be. Rows name distinct slots (the caller makes sure), so no two tensors
    share a slot's partial rows or ticket."""
    row = desc_ptr + tl.program_id(0).to(tl.int64) * 4
    nprog = tl.load(row + 3).to(tl.int32)
    pid = tl.program_id(1)
    if pid < nprog:
        x_ptr = tl.load(row + 0).to(tl.pointer_type(X_TYPE))
        x_ptr = tl.multiple_of(x_ptr, 16)  # the caller groups 16-byte-aligned tensors only
        n = tl.load(row + 1).to(tl.int32)
        slot = tl.load(row + 2).to(tl.int32)
        npart = N_PART + 2 * K
        measure_share(
            x_ptr, n, pid, nprog, part_ptr + slot.to(tl.int64) * ROWS_PER_SLOT * npart, ticket_ptr + slot,
            counts_ptr, moments_ptr, nfcalls_ptr, control_ptr, slot, capacity, call,
            under_ptr, over_ptr, tiny_bits, gate,
            K, UNDER_LIVE, OVER_LIVE, IS_BF16, False, BLOCK, UNROLL, P_POW2,
        )  # fmt: skip


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
        self.tiny_bits = {id(plan): float32_bits(plan.tiny) for plan in plans}
        self.live = {id(plan): live_columns(plan) for plan in plans}
        self.gate = {id(plan): gate(plan) for plan in plans}
        self.ring = DescriptorRing(table.device, GROUPED_ROWS, DESCRIPTOR)
        mark_static(self.partials, self.tickets, *(t for pair in self.thresholds.values() for t in pair))


def _bits(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor([*map(float32_bits, values), 0], dtype=torch.int32).to(device)


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
        USE_FLAG=use_flag, CALL_FROM_DEVICE=from_device, BLOCK=BLOCK, UNROLL=unroll(x.dtype), P_POW2=MAX_PROGRAMS,
        num_warps=NUM_WARPS,
    )  # fmt: skip


def groupable(x: torch.Tensor, k: int) -> bool:
    """Whether a grouped launch takes this tensor: a kernel dtype, at most GROUPED_BYTES, dense
    (one flat view without a copy) and 16-byte aligned."""
    return (
        x.dtype in DTYPES
        and k <= MAX_CAST_DTYPES
        and x.numel() * x.element_size() <= GROUPED_BYTES
        and x.data_ptr() % 16 == 0
        and x.is_contiguous()
    )


_X_TYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.int16}


def merge_group(table, items: list[tuple[torch.Tensor, int]], plan: CastPlan, call: int) -> None:
    """Merge every ``(tensor, slot)`` of ``items`` (one dtype, distinct slots, each
    :func:`groupable`) into its slot: one launch, the same effect as :func:`merge_into` for each.

    When the descriptor buffers are all still in flight (see ``descriptors``), each tensor gets
    its own launch instead. The caller keeps the tensors referenced until this returns; the
    launch is queued on the current stream, so their memory is reused only after it has run.
    """
    ws = table.scratch
    dtype = items[0][0].dtype
    for start in range(0, len(items), GROUPED_ROWS):
        chunk = items[start : start + GROUPED_ROWS]
        values: list[int] = []
        for x, slot in chunk:
            n = x.numel()
            values += (x.data_ptr(), n, slot, max(1, min(GROUPED_PROGRAMS, -(-n // group(dtype)))))

        def run(rows: torch.Tensor, count: int = len(chunk)) -> None:
            under, over = ws.thresholds[id(plan)]
            _grouped_kernel[(count, GROUPED_PROGRAMS)](
                rows, ws.partials, ws.tickets,
                table.counts, table.moments, table.nfcalls, table.control,
                table.capacity, int(min(call, NO_CALL - 1)),
                under, over, ws.tiny_bits[id(plan)], ws.gate[id(plan)],
                X_TYPE=_X_TYPES[dtype], K=len(plan.names), UNDER_LIVE=ws.live[id(plan)][0],
                OVER_LIVE=ws.live[id(plan)][1], IS_BF16=dtype == torch.bfloat16, BLOCK=BLOCK, UNROLL=unroll(dtype),
                ROWS_PER_SLOT=MAX_PROGRAMS, P_POW2=GROUPED_PROGRAMS, num_warps=NUM_WARPS,
            )  # fmt: skip

        if not ws.ring.launch(values, run):
            for x, slot in chunk:
                merge_into(table, slot, x, plan, call, use_flag=False)


_SCALARS = {"part_ptr": "*fp64", "ticket_ptr": "*i32", "counts_ptr": "*i64", "moments_ptr": "*fp64",
            "nfcalls_ptr": "*i64", "control_ptr": "*i64", "under_ptr": "*i32", "over_ptr": "*i32",
            "gate": "fp32"}  # fmt: skip


def variants() -> Iterator[tuple[str, Any]]:
    """``(name, ASTSource)`` for every variant of the kernels the watch launches, to compile
    ahead of time without a GPU (``benchmarks/kernel_static.py``, the tests)."""
    kinds = (("fp32", "*fp32", False, tl.float32, torch.float32), ("fp16", "*fp16", False, tl.float16, torch.float16),
             ("bf16", "*i16", True, tl.int16, torch.bfloat16))  # fmt: skip
    for (dtype, x_type, bf16, _, torch_dtype), use_flag, from_device in itertools.product(
        kinds, (False, True), (False, True)
    ):
        consts = {"K": 4, "UNDER_LIVE": 0b1011, "OVER_LIVE": 0b0111, "IS_BF16": bf16, "USE_FLAG": use_flag,
                  "CALL_FROM_DEVICE": from_device, "BLOCK": BLOCK, "UNROLL": unroll(torch_dtype),
                  "P_POW2": MAX_PROGRAMS}  # fmt: skip
        name = f"{dtype}/flag={int(use_flag)}/device_call={int(from_device)}"
        yield name, _source(_stats_kernel, consts, {"x_ptr": x_type})
    for dtype, _, bf16, x_tl, torch_dtype in kinds:
        consts = {"X_TYPE": x_tl, "K": 4, "UNDER_LIVE": 0b1011, "OVER_LIVE": 0b0111, "IS_BF16": bf16, "BLOCK": BLOCK,
                  "UNROLL": unroll(torch_dtype), "ROWS_PER_SLOT": MAX_PROGRAMS,
                  "P_POW2": GROUPED_PROGRAMS}  # fmt: skip
        yield f"{dtype}/grouped", _source(_grouped_kernel, consts, {"desc_ptr": "*i64"})


def _source(kernel: Any, consts: dict[str, Any], pointers: dict[str, str]) -> Any:
    names = list(inspect.signature(kernel.fn).parameters)
    types = {**_SCALARS, **pointers}
    signature = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
    # as launched: the caching allocator's blocks are aligned, so Triton specialises every
    # pointer as 16-byte aligned (what lets the loads vectorise)
    aligned = {(names.index(n),): [["tt.divisibility", 16]] for n, t in signature.items() if t.startswith("*")}
    constexprs = {(names.index(n),): v for n, v in consts.items()}
    return ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=aligned)
