"""Statistics as plain torch ops: runs on any device, never waits for it.

This is the path for tensors on accelerators (until a fused kernel takes over) and the CPU
fallback where the compiled kernel is unavailable. It reads the tensor several times; the
results match the single-pass CPU kernel exactly in every count and to rounding in the moments.
"""

from __future__ import annotations

import functools
import math
import struct

import torch

from .._casts import CastPlan, float32_bits
from .._table import ACTIVE, C_FINITE, CALL_NONFINITE, ENABLED
from .descriptors import GROUPED_BYTES

_INF = math.inf


def device_stats(x: torch.Tensor, plan: CastPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed statistics of a non-empty floating-point tensor, computed on its device.

    Returns:
        ``ints``: int64 ``[finite, nan, posinf, neginf, zeros, subnormal, *under, *over]``;
        ``floats``: float64 ``[mean, m2, min, max]`` over finite elements (``0, 0, inf, -inf``
        when there are none).
    """
    # float16/bfloat16/fp8 widen exactly to float32; float64 keeps its own precision.
    v = x.reshape(-1)
    if v.dtype not in (torch.float32, torch.float64):
        v = v.to(torch.float32)
    # |x| compared as its bit pattern (ordered like |x| for floats): a CPU thread on which
    # torch.set_flush_denormal(True) is on would compare a subnormal as zero.
    ints = torch.int64 if v.dtype == torch.float64 else torch.int32
    mag = v.view(ints) & torch.iinfo(ints).max
    finite = torch.isfinite(v)
    nonzero = mag != 0
    n_finite = finite.sum()
    counts = [
        n_finite,
        torch.isnan(v).sum(),
        (v == _INF).sum(),
        (v == -_INF).sum(),
        (~nonzero).sum(),
    ]
    tiny, under, over = _threshold_bits(plan, v.dtype)
    counts.append(((mag < tiny) & nonzero).sum())
    counts += [((mag <= t) & nonzero).sum() for t in under]
    counts += [((mag > t) & finite).sum() for t in over]

    # Two passes in float64 over finite values: no sum/sum-of-squares cancellation.
    vd = torch.where(finite, v, 0.0).to(torch.float64)
    n = n_finite.clamp(min=1).to(torch.float64)
    mean = vd.sum() / n
    dev = torch.where(finite, vd - mean, 0.0)
    floats = torch.stack(
        (
            mean,
            (dev * dev).sum(),
            torch.where(finite, v, _INF).amin().to(torch.float64),
            torch.where(finite, v, -_INF).amax().to(torch.float64),
        )
    )
    return torch.stack(counts), floats


@functools.lru_cache(maxsize=64)
def _threshold_bits(plan: CastPlan, dtype: torch.dtype) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """``plan``'s subnormal, underflow and overflow thresholds as bit patterns in ``dtype`` (worked out
    once per plan, not on every call)."""
    return (
        _bits(plan.tiny, dtype),
        tuple(_bits(t, dtype) for t in plan.under),
        tuple(_bits(t, dtype) for t in plan.over),
    )


def _bits(value: float, dtype: torch.dtype) -> int:
    """The bit pattern of ``value`` in ``dtype`` (float32 or float64), as an integer: a threshold of
    the source dtype is exact in either, so comparing patterns compares the values."""
    if dtype == torch.float64:
        return struct.unpack("<q", struct.pack("<d", value))[0]  # a copy of the bits
    return float32_bits(value)  # no hardware conversion, which a flushing thread would make 0


def _at_most(t: torch.Tensor, bound: int | torch.Tensor) -> torch.Tensor:
    return torch.minimum(t, bound) if isinstance(bound, torch.Tensor) else t.clamp(max=bound)


def _at_least(t: torch.Tensor, bound: int | torch.Tensor) -> torch.Tensor:
    return torch.maximum(t, bound) if isinstance(bound, torch.Tensor) else t.clamp(min=bound)


def merge_into(table, slot: int, x: torch.Tensor, plan: CastPlan, call: int | torch.Tensor, *, use_flag: bool) -> None:
    """Measure a non-empty tensor and merge it into ``table``'s slot, with tensor ops only.

    The same effect as the Triton kernel: one more call, counts added, moments Chan-merged,
    the non-finite call range widened, all in the active half (and only when the sampling
    flag is set, with ``use_flag``). ``call`` is the root-call index (an int, or a device
    tensor under graph capture). Nothing waits for the device.
    """
    ints, floats = device_stats(x, plan)
    control = table.control
    sel = torch.arange(2, device=control.device) == control[ACTIVE]  # [2] halves
    if use_flag:
        sel = sel & (control[ENABLED] != 0)
    counts = table.counts[:, slot]  # [2, 7 + 2K] view
    n_a = counts[:, C_FINITE].to(torch.float64)
    n_b = ints[0].to(torch.float64)
    counts.add_(sel.to(torch.int64)[:, None] * torch.cat((torch.ones_like(ints[:1]), ints))[None, :])

    moments = table.moments[:, slot]  # [2, 4]
    w_b = n_b / (n_a + n_b).clamp(min=1.0)
    delta = floats[0] - moments[:, 0]
    merged = torch.stack(
        (
            moments[:, 0] + delta * w_b,
            moments[:, 1] + floats[1] + delta * delta * n_a * w_b,
            torch.minimum(moments[:, 2], floats[2]),
            torch.maximum(moments[:, 3], floats[3]),
        ),
        dim=1,
    )
    moments.copy_(torch.where(sel[:, None], merged, moments))

    nonfinite = ints[1] + ints[2] + ints[3]
    hit = sel & (nonfinite > 0)
    nfcalls = table.nfcalls[:, slot]  # [2, 2]
    widened = torch.stack((_at_most(nfcalls[:, 0], call), _at_least(nfcalls[:, 1], call)), dim=1)
    nfcalls.copy_(torch.where(hit[:, None], widened, nfcalls))
    control[CALL_NONFINITE] += nonfinite * sel.any().to(torch.int64)


def groupable(x: torch.Tensor, k: int) -> bool:
    """The twin of ``triton_stats.groupable``: small and dense (the twin takes any float dtype)."""
    return x.numel() * x.element_size() <= GROUPED_BYTES and x.is_contiguous()


def merge_group(table, items: list[tuple[torch.Tensor, int]], plan: CastPlan, call: int) -> None:
    """The twin of ``triton_stats.merge_group``: :func:`merge_into` for each ``(tensor, slot)``."""
    for x, slot in items:
        merge_into(table, slot, x, plan, call, use_flag=False)
