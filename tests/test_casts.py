"""Underflow thresholds learned by bisection agree with torch's real casts, bit for bit."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import torchwatch as tw
from torchwatch._casts import (
    cast_plan,
    float32_bits,
    float32_value,
    float_dtypes,
    normalize_cast_dtypes,
    underflow_threshold,
)

SOURCES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2)
TARGETS = tuple(getattr(torch, n) for n in float_dtypes())
_INT = {8: torch.uint8, 16: torch.int16, 32: torch.int32, 64: torch.int64}


def _neighbourhood(src: torch.dtype, center: float, radius: int = 300) -> torch.Tensor:
    """Every ``src`` value within ``radius`` bit patterns of ``center`` (positive side)."""
    bits = _INT[torch.finfo(src).bits]
    c = int(torch.tensor([center], dtype=torch.float64).to(src).view(bits))
    top = int(torch.tensor([torch.finfo(src).max], dtype=torch.float64).to(src).view(bits))
    lo, hi = max(c - radius, 1), min(c + radius, top)
    return torch.arange(lo, hi + 1, dtype=torch.int64).to(bits).view(src)


@pytest.mark.parametrize(("src", "dst"), list(itertools.product(SOURCES, TARGETS)), ids=str)
def test_threshold_splits_values_exactly_like_the_cast(src, dst):
    t = underflow_threshold(src, dst)
    probes = [_neighbourhood(src, t if t > 0 else torch.finfo(src).tiny)]
    probes.append(_neighbourhood(src, float(torch.finfo(src).tiny), radius=50))
    values = torch.cat(probes)
    values = torch.cat([values, (-values.to(torch.float64)).to(src)])  # fp8 has no neg kernel
    became_zero = values.to(dst).to(torch.float64) == 0
    predicted = values.to(torch.float64).abs() <= t
    assert torch.equal(became_zero, predicted), (src, dst, t)


def test_known_thresholds():
    f32 = torch.float32
    assert underflow_threshold(f32, torch.float16) == 2.0**-25  # ties round to even: 0
    assert underflow_threshold(f32, torch.bfloat16) == 2.0**-134
    assert underflow_threshold(f32, torch.float8_e4m3fn) == 2.0**-10
    assert underflow_threshold(torch.float16, torch.float16) == 0.0  # nothing underflows into itself
    # float64 -> float16 goes through float32 in torch (double rounding): slightly above 2^-25
    assert underflow_threshold(torch.float64, torch.float16) > 2.0**-25


def test_plan_overflow_is_the_target_max():
    plan = cast_plan(torch.float32, ("float16", "float8_e4m3fn"))
    assert plan.over == (65504.0, 448.0)
    assert plan.tiny == torch.finfo(torch.float32).tiny


def test_normalize_accepts_names_and_dtypes_and_drops_repeats():
    assert normalize_cast_dtypes([torch.float16, "bfloat16", "torch.float16"]) == ("float16", "bfloat16")
    assert normalize_cast_dtypes(()) == ()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("float16", "cast_dtypes must be a sequence of dtypes, got the single value 'float16'; write cast_dtypes=\\('float16',\\)"),
        (["int8"], "cast_dtypes: 'int8' is not a floating-point torch dtype; use one of bfloat16, float16"),
        (["float4_e2m1fn_x2"], "'float4_e2m1fn_x2' is not a floating-point torch dtype"),
        ([torch.float16] * 1 + ["float32", "float64", "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"], "cast_dtypes holds 9 dtypes; at most 8 are supported"),
    ],
)  # fmt: skip
def test_bad_cast_dtypes_are_rejected_with_the_fix(value, message):
    with pytest.raises(tw.ConfigError, match=message):
        normalize_cast_dtypes(value)


@given(bits=st.integers(0, 0x7F7FFFFF), negative=st.booleans())
def test_float32_bit_patterns_round_trip_without_hardware_conversions(bits, negative):
    """float32_bits/float32_value (integer arithmetic, so a thread flushing denormals cannot turn a
    subnormal threshold into 0) agree with numpy's own view of the same bits, subnormals included."""
    value = float(np.array([bits], dtype=np.uint32).view(np.float32)[0])
    assert float32_value(bits) == value
    signed = -value if negative else value
    assert float32_bits(signed) == bits | (0x80000000 if negative else 0)


def test_thresholds_learned_on_a_thread_that_flushes_denormals_are_the_same():
    """torch.set_flush_denormal(True) before the first plan (a CPU service's start-up) once made the
    float32 -> bfloat16 threshold 0.0: no bfloat16 underflow was ever counted. Pairs through float64
    follow the thread's own conversions (documented), so they are left out."""
    pairs = [(s, d) for s, d in itertools.product(SOURCES, TARGETS) if torch.float64 not in (s, d)]
    expected = {pair: underflow_threshold.__wrapped__(*pair) for pair in pairs}
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no denormal flushing (not x86 with SSE3)")
    try:
        learned = {pair: underflow_threshold.__wrapped__(*pair) for pair in pairs}
    finally:
        torch.set_flush_denormal(False)
    assert learned == expected
    assert learned[torch.float32, torch.bfloat16] == 2.0**-134  # half bfloat16's smallest subnormal
