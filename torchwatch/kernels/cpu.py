"""The compiled single-pass CPU kernel (``_cstats``), split across cores for large tensors.

The extension is optional: where it was not built, :data:`available` is False and callers use
:mod:`torchwatch.kernels.torch_ops` instead (same results, several passes).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from .._accumulators import Raw, merge_raw
from .._casts import CastPlan

try:
    from . import _cstats
except ImportError:  # built without a C compiler: the torch-ops path takes over
    _cstats = None

available = _cstats is not None

DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}

# Below this many elements one core finishes before another could be woken (~100 us).
PARALLEL_MIN_NUMEL = 1 << 18
_ALIGN = 2048  # the kernel's block size: chunks keep whole blocks

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def _workers() -> tuple[ThreadPoolExecutor | None, int]:
    """A pool of (torch threads - 1) helpers; the calling thread takes one part itself."""
    global _pool, _pool_size
    if _pool is None:
        with _pool_lock:
            if _pool is None and torch.get_num_threads() > 1:
                _pool_size = torch.get_num_threads() - 1
                _pool = ThreadPoolExecutor(_pool_size, thread_name_prefix="torchwatch-stats")
    return _pool, _pool_size


def simd() -> bool:
    """Whether the kernel runs its AVX2 path on this CPU."""
    return bool(available and _cstats.simd_available())


def cpu_stats(x: torch.Tensor, plan: CastPlan, *, exact: bool = False) -> Raw:
    """Raw statistics of a contiguous CPU tensor of a dtype in :data:`DTYPE_CODES`.

    Args:
        x: the tensor; it must stay alive until this returns (it does: it is an argument).
        plan: thresholds for ``x.dtype``.
        exact: use the portable scalar path (tests compare both paths).
    """
    n = x.numel()
    code = DTYPE_CODES[x.dtype]
    address = x.data_ptr()
    args = (code, plan.tiny, plan.under, plan.over, exact)
    pool, helpers = _workers() if n >= PARALLEL_MIN_NUMEL else (None, 0)
    if pool is None:
        return _cstats.tensor_stats(address, n, *args)
    parts = helpers + 1
    step = -(-n // parts // _ALIGN) * _ALIGN
    size = x.element_size()
    try:
        futures = [
            pool.submit(_cstats.tensor_stats, address + start * size, min(step, n - start), *args)
            for start in range(step, n, step)
        ]
    except RuntimeError:  # pool shut down at interpreter exit
        return _cstats.tensor_stats(address, n, *args)
    raw = _cstats.tensor_stats(address, min(step, n), *args)
    for future in futures:
        raw = merge_raw(raw, future.result())
    return raw
