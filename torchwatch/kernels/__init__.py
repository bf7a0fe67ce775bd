"""Where statistics are computed: a single-pass C kernel on CPU, torch ops elsewhere.

``host_stats`` returns Python numbers (used for CPU tensors, where reading a result costs no
device sync); ``device_stats`` returns packed tensors on the tensor's own device and never
waits for it.

Hooks call these for every measured tensor, so the CPU path touches as few tensor attributes
as it can: in a real forward each one is a cache-cold trip through torch's bindings.
"""

from __future__ import annotations

import torch

from .._accumulators import N_INT, Raw, unpack
from .._casts import CastPlan
from . import cpu
from .torch_ops import device_stats

__all__ = ["device_stats", "host_stats", "measurable"]

PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def measurable(x: torch.Tensor) -> bool:
    """Dense, real floating-point, with data: what the statistics are defined on.

    Skipped: int/bool, complex, quantized, sparse and other layouts, meta tensors and tensor
    subclasses (DTensor, FakeTensor, jagged nested tensors, ...) whose memory is not one plain
    buffer. Nested tensors with the strided layout are measured over all their elements on CPU.
    """
    return (
        type(x) in PLAIN_TENSOR_TYPES
        and x.layout is torch.strided
        and x.is_floating_point()
        and not x.is_meta
        and not (x.is_nested and not x.is_cpu)
    )


def _dense(x: torch.Tensor) -> torch.Tensor:
    """A tensor whose elements fill ``numel`` consecutive slots; order does not matter here."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return x
    return x.contiguous()


def host_stats(x: torch.Tensor, plan: CastPlan, *, exact: bool = False) -> Raw:
    """Raw statistics of a :func:`measurable` tensor as Python numbers.

    For a non-CPU tensor this waits for its device.
    """
    if cpu.available and x.is_cpu:
        code = cpu.DTYPE_CODES.get(x.dtype)
        if code is not None:
            if not x.is_contiguous():
                x = _dense(x)
            return cpu.raw_stats(x.data_ptr(), x.numel(), code, plan, exact)
    if x.numel() == 0:
        k = len(plan.names)
        return (*(0,) * N_INT, 0.0, 0.0, float("inf"), float("-inf"), (0,) * k, (0,) * k)
    with torch.no_grad():
        ints, floats = device_stats(x, plan)
    return unpack(ints, floats, len(plan.names))
