"""The compiled single-pass CPU kernel (``_cstats``).

The extension is optional: where it was not built, :data:`available` is False and callers use
:mod:`torchwatch.kernels.torch_ops` instead (same results, several passes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .._accumulators import HostAccumulator, Raw
from .._casts import CastPlan

try:
    from . import _cstats
except ImportError:  # built without a C compiler: the torch-ops path takes over
    _cstats = None

available = _cstats is not None
# The kernel itself, for callers that hold ``native_plan(plan)`` already (the hooks):
# tensor_stats(address, numel, code, native_plan, exact) -> raw tuple.
tensor_stats = _cstats.tensor_stats if available else None
# The id sketch and logit-quality passes of the input and output monitors (None without the kernel).
id_counts = _cstats.id_counts if available else None
logit_quality = _cstats.logit_quality if available else None
# Per-channel float64 sums of float32 inputs (the input monitor's channel means).
channel_sums = _cstats.channel_sums if available else None

# Elements per block (each block's moments take their own shift and scale; the counts' rare
# passes re-read a block) and per chunk at least (the unit of work torch's threads share).
BLOCK = _cstats.BLOCK if available else 0
CHUNK = _cstats.CHUNK if available else 0

DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}

_native: dict[int, tuple[CastPlan, object]] = {}


def native_plan(plan: CastPlan) -> object:
    """The kernel's parsed copy of ``plan`` (plans are few and live for the process)."""
    entry = _native.get(id(plan))
    if entry is None:
        entry = _native[id(plan)] = (plan, _cstats.Plan(plan.tiny, plan.under, plan.over))
    return entry[1]


def new_accumulator(k: int) -> object:
    """A C accumulator of raw measurements with ``k`` cast dtypes."""
    return _cstats.Accumulator(k)


LEVELS = ("portable", "avx2", "avx512")  # the kernel's paths, by vector level


def simd() -> bool:
    """Whether the kernel runs a vector path (AVX2 or AVX-512) on this CPU."""
    return bool(available and _cstats.simd_available())


def simd_levels() -> tuple[int, int]:
    """``(level in use, best level of this CPU)``, indices into :data:`LEVELS`; the kernel picks
    the best at import (runtime detection: one build serves AVX2-only and AVX-512 machines)."""
    return _cstats.simd_level() if available else (0, 0)


@contextlib.contextmanager
def simd_level(level: int) -> Iterator[None]:
    """Run the kernel at vector ``level`` inside the block (tests compare the paths; benchmarks
    time them). Process-wide: not for use while a watched model serves on another thread.

    Raises:
        ValueError: this CPU (or a build without the kernel) lacks that level.
    """
    with _switched("set_simd_level", level):
        yield


def parallel_info() -> tuple[str | None, int]:
    """``(OpenMP runtime, threads)``: the runtime torch loaded, whose threads the kernel shares for
    large tensors, and how many a call from this thread may use (``torch.get_num_threads()``
    sets it); ``(None, 1)`` where no such runtime was found or the kernel was not built."""
    return _cstats.parallel_info() if available else (None, 1)


def rereads() -> int:
    """Blocks (:data:`BLOCK` elements) whose moments the kernel read a second time since
    import, because the shift it took from a few samples of the block, or the scale from the
    block before, proved poor; 0 without the kernel. Benchmarks report it per forward."""
    return _cstats.read_again()[0] if available else 0


def route_misses() -> int:
    """Blocks the kernel's pass read a second time since import because the route it guessed from
    the block before and the block's samples was wrong: a block taken for a ReLU output (x read as
    its own |x|) that held a negative value, or a block whose zeros the pass did not count (none
    before it, none among its samples) and that held one; 0 without the kernel."""
    return _cstats.read_again()[1] if available else 0


@contextlib.contextmanager
def threads(enabled: bool) -> Iterator[None]:
    """Let large tensors use torch's threads (the default) or not, inside the block (benchmarks
    compare). Process-wide, like :func:`simd_level`. Results are the same bit for bit either way."""
    with _switched("set_threads", enabled):
        yield


@contextlib.contextmanager
def shares(count: int) -> Iterator[None]:
    """Cut each large call into at least ``count`` contiguous shares inside the block (one per
    thread by default; tests use more shares than threads, so that threads finish their own and
    take the others'). Process-wide, like :func:`simd_level`. Results are the same bit for bit."""
    with _switched("set_shares", count):
        yield


@contextlib.contextmanager
def _switched(setter: str, value: object) -> Iterator[None]:
    """A process-wide kernel setting (``_cstats.<setter>`` returns the one before) for a block."""
    if not available:
        raise ValueError("the C kernel was not built")
    set_value = getattr(_cstats, setter)
    before = set_value(value)
    try:
        yield
    finally:
        set_value(before)


def raw_stats(address: int, numel: int, code: int, plan: CastPlan, exact: bool = False) -> Raw:
    """Raw statistics of ``numel`` dense elements at ``address`` (a tensor's ``data_ptr()``).

    Args:
        address, numel: the caller keeps the tensor alive for the duration of the call.
        code: ``DTYPE_CODES[dtype]``.
        plan: thresholds for that dtype.
        exact: use the portable scalar path (tests compare both paths).

    Tensors of more than one chunk (:data:`CHUNK` elements) are measured on torch's
    own OpenMP threads, the same ones its operators use (:func:`parallel_info`); chunks are merged
    in a fixed order, so the result does not depend on the number of threads.
    """
    return _cstats.tensor_stats(address, numel, code, native_plan(plan), exact)


def new_host_accumulator(k: int) -> object:
    """An accumulator for raw host measurements (in C where the kernel was built)."""
    return new_accumulator(k) if available else HostAccumulator(k)
