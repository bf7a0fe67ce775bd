"""ModuleStats against an independent oracle (float64 numpy, math.fsum, real casts)."""

from __future__ import annotations

import math

import pytest
import torch
from _oracle import assert_matches, oracle
from _strategies import FLOAT_DTYPES, float_tensors
from hypothesis import given
from hypothesis import strategies as st

import torchwatch as tw
from torchwatch._accumulators import HostAccumulator, stats_from_raw, to_module_stats
from torchwatch._casts import cast_plan
from torchwatch._table import DeviceTable
from torchwatch.kernels import cpu, host_stats, torch_ops
from torchwatch.stats import DEFAULT_CAST_DTYPES, ModuleStats, chan, merge_all

NAMES = DEFAULT_CAST_DTYPES


def stats_via(path: str, x: torch.Tensor, names=NAMES) -> ModuleStats:
    """One tensor measured through each implementation the hooks can use."""
    plan = cast_plan(x.dtype, names)
    if path == "device":
        table = DeviceTable(x.device, len(names), 4)
        if x.numel() == 0:
            return tw.ModuleStats(calls=1, underflow=dict.fromkeys(names, 0), overflow=dict.fromkeys(names, 0))
        torch_ops.merge_into(table, 0, x, plan, 0, use_flag=False)
        table.slot("x")
        return stats_from_raw(*table.read_active().stats["x"], names)
    acc = HostAccumulator(len(names))
    acc.add(host_stats(x, plan, exact=(path == "exact")))
    return to_module_stats(acc, names)


PATHS = ["simd", "exact", "device"] if cpu.available else ["device"]


@pytest.mark.parametrize("path", PATHS)
@given(x=float_tensors())
def test_every_statistic_matches_the_oracle(path, x):
    assert_matches(stats_via(path, x), oracle(x))


@given(x=float_tensors())
def test_public_tensor_stats_matches_the_oracle(x):
    s = tw.tensor_stats(x)
    assert s.calls == 1
    assert_matches(s, oracle(x))


@given(x=float_tensors(shapes=((64,), (3000,), (5, 9))), y=float_tensors(shapes=((1,), (2500,), (0,))))
def test_merge_equals_the_statistics_of_the_concatenation(x, y):
    y = y.to(x.dtype)
    merged = tw.tensor_stats(x).merge(tw.tensor_stats(y))
    assert merged.calls == 2
    assert_matches(merged, oracle(torch.cat([x.reshape(-1), y.reshape(-1)])))


@pytest.mark.parametrize(
    ("dtype", "base", "step"),
    [
        (torch.float16, 1024.0, 1.0),
        (torch.bfloat16, 16384.0, 128.0),
        (torch.float32, 1e6, 0.0625),
        (torch.float64, 1e8, 1e-3),
    ],
)
def test_std_stays_accurate_with_a_large_mean(dtype, base, step):
    # base + k*step is exact in dtype; a sum / sum-of-squares formula loses every digit here
    k = torch.arange(4096, dtype=torch.float64) % 7
    x = (base + k * step).to(dtype)
    assert torch.equal(x.to(torch.float64), base + k * step)
    want = oracle(x)
    for path in PATHS:
        got = stats_via(path, x)
        assert abs(got.std - want["std"]) <= 1e-7 * want["std"], (path, got.std, want["std"])
        ulp = math.ulp(want["mean"])  # the mean itself is a float64
        assert abs(got.mean - want["mean"]) <= max(1e-7 * want["std"], 2 * ulp), (path, got.mean, want["mean"])
    if dtype == torch.float32:  # the data has teeth: single-pass float32 moments are far off here
        naive = float((x**2).mean() - x.mean() ** 2)
        assert abs(max(naive, 0.0) ** 0.5 - want["std"]) > 0.5 * want["std"]


def test_counts_are_exact_beyond_float32_integer_range():
    n = 2**24 + 11
    x = torch.zeros(n)
    x[::3] = 1e-44  # a float32 subnormal: underflows in every cast dtype
    x[5] = math.nan
    s = tw.tensor_stats(x)
    tiny = len(range(0, n, 3))
    assert s.count == n
    assert s.nan == 1
    assert s.zeros == n - tiny - 1
    assert s.subnormal == tiny
    assert s.underflow == {"float16": tiny, "bfloat16": tiny, "float8_e4m3fn": tiny}


def test_all_nonfinite_gives_nan_moments_and_exact_counts():
    s = tw.tensor_stats(torch.tensor([math.nan, math.inf, -math.inf, math.inf]))
    assert (s.count, s.nan, s.posinf, s.neginf, s.finite) == (4, 1, 2, 1, 0)
    assert all(math.isnan(v) for v in (s.mean, s.std, s.min, s.max, s.absmax))


def test_empty_and_zero_dim_tensors():
    empty = tw.tensor_stats(torch.empty(0, 3))
    assert (empty.calls, empty.count) == (1, 0) and math.isnan(empty.mean)
    scalar = tw.tensor_stats(torch.tensor(-2.5))
    assert (scalar.count, scalar.min, scalar.max, scalar.absmax, scalar.std) == (1, -2.5, -2.5, 2.5, 0.0)


def test_merging_with_an_empty_measurement_changes_nothing_but_calls():
    a = tw.tensor_stats(torch.randn(100))
    merged = a.merge(tw.tensor_stats(torch.empty(0)))
    assert merged.calls == 2
    assert merged.to_dict() | {"calls": 1} == a.to_dict()


def test_merge_all_of_nothing_is_empty():
    assert merge_all([]) == ModuleStats()


@given(
    n_a=st.integers(0, 10**6), n_b=st.integers(0, 10**6),
    mean_a=st.floats(-1e6, 1e6), mean_b=st.floats(-1e6, 1e6),
    var_a=st.floats(0, 1e4), var_b=st.floats(0, 1e4),
)  # fmt: skip
def test_chan_merge_matches_the_pooled_moments(n_a, n_b, mean_a, mean_b, var_a, var_b):
    n, mean, m2 = chan(n_a, mean_a, var_a * n_a, n_b, mean_b, var_b * n_b)
    assert n == n_a + n_b
    if n == 0:
        return
    want_mean = (n_a * mean_a + n_b * mean_b) / n
    want_m2 = var_a * n_a + var_b * n_b + n_a * (mean_a - want_mean) ** 2 + n_b * (mean_b - want_mean) ** 2
    assert math.isclose(mean, want_mean, rel_tol=1e-9, abs_tol=1e-6)
    assert math.isclose(m2, want_m2, rel_tol=1e-7, abs_tol=1e-3)


def test_round_trip_through_dict_keeps_nan_and_counts():
    s = tw.tensor_stats(torch.tensor([1.0, math.nan, 70000.0]), cast_dtypes=["float16"])
    back = ModuleStats.from_dict(
        {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in s.to_dict().items()}
    )
    assert back.to_dict()["overflow"] == {"float16": 1}
    assert back.count == 3 and back.nan == 1 and back.max == 70000.0


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_non_contiguous_and_channels_last_tensors_are_measured_whole(dtype):
    base = torch.randn(2, 3, 4, 5).to(dtype)
    for x in (base.transpose(1, 3), base[:, :, ::2], base.to(memory_format=torch.channels_last)):
        assert_matches(tw.tensor_stats(x), oracle(x))


def test_tensor_stats_rejects_what_it_cannot_measure():
    for bad, what in (
        (torch.arange(3), "int64"),
        (torch.randn(3, 3).to_sparse(), "sparse"),
        (torch.randn(2, dtype=torch.complex64), "complex64"),
        ([1.0, 2.0], "list"),
    ):
        with pytest.raises(tw.ConfigError, match=f"tensor_stats needs a dense floating-point tensor, got .*{what}"):
            tw.tensor_stats(bad)


def test_unknown_cast_dtype_is_a_config_error():
    with pytest.raises(tw.ConfigError, match="'float17' is not a floating-point torch dtype; use one of"):
        tw.tensor_stats(torch.ones(2), cast_dtypes=["float17"])
