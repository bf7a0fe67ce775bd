"""Hypothesis strategies: float tensors with the values that break statistics code."""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import strategies as st

from torchwatch.kernels import cpu

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Block boundaries of the CPU kernel (cpu.BLOCK elements) and SIMD tails (8, 16) are in here on purpose.
_B = cpu.BLOCK or 4096
SHAPES = ((), (0,), (1,), (7,), (16,), (3, 5), (2, 0, 3), (_B - 1,), (_B + 1,), (2 * _B + 4,), (33, 65), (2, 3, 700))


def special_values(dtype: torch.dtype) -> list[float]:
    fi = torch.finfo(dtype)
    tiny, top = fi.tiny, fi.max
    values = [0.0, -0.0, math.nan, math.inf, -math.inf, tiny, -tiny, tiny / 2, tiny / 4, top, -top, fi.eps, 1.0]
    # just around the cast thresholds: fp16 (2^-25, 65504), bf16 (2^-134), fp8 e4m3fn (2^-10, 448)
    for t in (2.0**-25, 2.0**-24, 2.0**-134, 2.0**-133, 2.0**-10, 2.0**-9, 448.0, 464.0, 65504.0, 65520.0, 1e5):
        values += [t, -t, t * (1 + 2**-12), t * (1 - 2**-12)]
    return values


@st.composite
def float_tensors(draw, dtypes=FLOAT_DTYPES, shapes=SHAPES) -> torch.Tensor:
    dtype = draw(st.sampled_from(dtypes))
    shape = draw(st.sampled_from(shapes))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    n = math.prod(shape)
    max_exp = {torch.float16: 4, torch.bfloat16: 37, torch.float32: 37, torch.float64: 100}[dtype]
    min_exp = {torch.float16: -7, torch.bfloat16: -39, torch.float32: -44, torch.float64: -320}[dtype]
    scale = 10.0 ** draw(st.integers(min_exp, max_exp))
    offset = draw(st.sampled_from([0.0, 1.0, -3.0, 1000.0, 1e4])) * (scale if draw(st.booleans()) else 1.0)
    data = rng.standard_normal(n) * scale + offset
    if draw(st.booleans()):
        data = np.maximum(data, 0.0)  # ReLU-like: many exact zeros
    special_fraction = draw(st.sampled_from([0.0, 0.01, 0.2, 1.0]))
    if n and special_fraction:
        specials = np.array(special_values(dtype))
        mask = rng.random(n) < special_fraction
        data[mask] = rng.choice(specials, size=int(mask.sum()))
    with np.errstate(over="ignore"):
        return torch.from_numpy(data).to(dtype).reshape(shape)
