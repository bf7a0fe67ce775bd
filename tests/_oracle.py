"""Independent reference for ModuleStats: float64 numpy, math.fsum and real dtype casts."""

from __future__ import annotations

import math

import numpy as np
import torch


def oracle(x: torch.Tensor, cast_dtypes=("float16", "bfloat16", "float8_e4m3fn")) -> dict:
    v = x.detach().cpu().reshape(-1)
    x64 = v.to(torch.float64).numpy()  # exact: every float dtype widens exactly to float64
    finite = np.isfinite(x64)
    f = x64[finite]
    n = int(finite.sum())
    mean = std = math.nan
    if n:
        # in units of the largest power of two <= max|x|: nothing overflows or goes subnormal
        e = math.frexp(float(np.abs(f).max()))[1] if np.abs(f).max() > 0 else 0
        fs = np.ldexp(f, -e)
        mean_s = math.fsum(fs.tolist()) / n
        mean = math.ldexp(mean_s, e)
        std = math.ldexp(math.sqrt(math.fsum(((fs - mean_s) ** 2).tolist()) / n), e)
    tiny = torch.finfo(x.dtype).tiny
    nonzero_finite = finite & (x64 != 0)
    under, over = {}, {}
    for name in cast_dtypes:
        dst = getattr(torch, name)
        became_zero = (v.to(dst).to(torch.float64) == 0).numpy()
        under[name] = int((nonzero_finite & became_zero).sum())
        over[name] = int((np.abs(f) > torch.finfo(dst).max).sum())
    return {
        "count": v.numel(),
        "nan": int(np.isnan(x64).sum()),
        "posinf": int((x64 == np.inf).sum()),
        "neginf": int((x64 == -np.inf).sum()),
        "zeros": int((x64 == 0).sum()),
        "subnormal": int((nonzero_finite & (np.abs(x64) < tiny)).sum()),
        "mean": mean,
        "std": std,
        "min": float(f.min()) if n else math.nan,
        "max": float(f.max()) if n else math.nan,
        "absmax": float(np.abs(f).max()) if n else math.nan,
        "underflow": under,
        "overflow": over,
    }


def assert_matches(stats, expected: dict, *, rel: float = 1e-6) -> None:
    """Counts exactly; min/max/absmax exactly; mean/std to `rel` of the data's spread."""
    for key in ("count", "nan", "posinf", "neginf", "zeros", "subnormal", "underflow", "overflow"):
        assert getattr(stats, key) == expected[key], (key, getattr(stats, key), expected[key])
    for key in ("min", "max", "absmax"):
        got, want = getattr(stats, key), expected[key]
        assert (math.isnan(got) and math.isnan(want)) or got == want, (key, got, want)
    if math.isnan(expected["mean"]):
        assert math.isnan(stats.mean) and math.isnan(stats.std)
        return
    if not 1e-150 <= expected["absmax"] <= 1e150 and expected["absmax"] != 0:
        # float64 only: a variance outside float64's range saturates (documented limitation)
        return
    scale = max(expected["std"], abs(expected["mean"]) * 1e-9, 1e-300)
    if math.isinf(expected["std"]):
        assert math.isinf(stats.std)
        return
    assert abs(stats.mean - expected["mean"]) <= rel * scale + 1e-300, ("mean", stats.mean, expected["mean"])
    assert abs(stats.std - expected["std"]) <= rel * scale + 1e-300, ("std", stats.std, expected["std"])
