"""Where statistics are computed: a single-pass C kernel on CPU, torch ops elsewhere.

``host_stats`` returns Python numbers (used for CPU tensors, where reading a result costs no
device sync); ``device_stats`` returns packed tensors on the tensor's own device and never
waits for it.
"""

from __future__ import annotations

import torch

from .._accumulators import Raw
from .._casts import CastPlan
from . import cpu
from .torch_ops import device_stats, unpack

__all__ = ["device_stats", "host_stats", "measurable"]

_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def measurable(x: torch.Tensor) -> bool:
    """Dense, real floating-point, with data: what the statistics are defined on.

    Skipped: int/bool, complex, quantized, sparse and other layouts, nested, meta tensors
    and tensor subclasses (DTensor, FakeTensor, ...), whose memory is not a plain buffer.
    """
    return (
        type(x) in _PLAIN_TENSOR_TYPES
        and x.is_floating_point()
        and x.layout == torch.strided
        and not x.is_nested
        and x.device.type != "meta"
    )


def _dense(x: torch.Tensor) -> torch.Tensor:
    """A tensor whose elements fill ``numel`` consecutive slots; order does not matter here."""
    if x.is_contiguous():
        return x
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return x
    return x.contiguous()


def _empty_raw(k: int) -> Raw:
    return (0, 0, 0, 0, 0, 0, 0.0, 0.0, float("inf"), float("-inf"), (0,) * k, (0,) * k)


def host_stats(x: torch.Tensor, plan: CastPlan, *, exact: bool = False) -> Raw:
    """Raw statistics as Python numbers; for a non-CPU tensor this waits for its device."""
    if x.numel() == 0:
        return _empty_raw(len(plan.names))
    if cpu.available and x.device.type == "cpu" and x.dtype in cpu.DTYPE_CODES:
        return cpu.cpu_stats(_dense(x), plan, exact=exact)
    ints, floats = device_stats(x, plan)
    return unpack(ints.cpu(), floats.cpu(), len(plan.names))
