"""Statistics as plain torch ops: runs on any device, never waits for it.

This is the path for tensors on accelerators (until a fused kernel takes over) and the CPU
fallback where the compiled kernel is unavailable. It reads the tensor several times; the
results match the single-pass CPU kernel exactly in every count and to rounding in the moments.
"""

from __future__ import annotations

import math

import torch

from .._casts import CastPlan

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
    a = v.abs()
    finite = torch.isfinite(v)
    nonzero = a != 0
    n_finite = finite.sum()
    counts = [
        n_finite,
        torch.isnan(v).sum(),
        (v == _INF).sum(),
        (v == -_INF).sum(),
        (v == 0).sum(),
        ((a < plan.tiny) & nonzero).sum(),
    ]
    counts += [((a <= t) & nonzero).sum() for t in plan.under]
    counts += [((a > t) & finite).sum() for t in plan.over]

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
