"""The CPU kernel on the inputs a serving process gives it: bfloat16 blocks read as they are (no float32
copy), float16 converted exactly, and threads on which torch flushes denormals. Every count and
extreme against the float64 oracle, at every vector level and the portable one."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _oracle import assert_matches, oracle

from torchwatch import _accumulators
from torchwatch._accumulators import stats_from_raw
from torchwatch._casts import cast_plan
from torchwatch.kernels import cpu, host_stats, torch_ops
from torchwatch.stats import DEFAULT_CAST_DTYPES

pytestmark = pytest.mark.skipif(not cpu.available, reason="the C kernel was not built")
NAMES = DEFAULT_CAST_DTYPES
ALL_LEVELS = list(range(cpu.simd_levels()[1] + 1))  # the portable path and every vector path this CPU has
BLOCK = cpu.BLOCK  # elements per block of the kernel


def _blocks_of_every_kind(dtype: torch.dtype) -> torch.Tensor:
    """One chunk (its blocks run in order on one thread, each learning from the one before) whose
    blocks take each of the kernel's routes: plain; the first zero (counted by a pass of its own);
    ReLU outputs (x read as |x|) then a ReLU block with negatives (read again); values below the
    dtype's smallest normal; values over fp8's and fp16's largest; a NaN and infinities (the exact
    path); a mean far from the samples' (moments read again); and a tail shorter than a vector. The
    special values sit at odd and even positions: a bfloat16 vector holds the even elements in one
    register and the odd ones in another."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(10 * BLOCK + 21, generator=g, dtype=torch.float64)
    b = [slice(k * BLOCK, (k + 1) * BLOCK) for k in range(10)]
    x[b[1]][[6, 9]] = 0.0
    x[b[1]][11] = -0.0
    x[b[2]] = x[b[2]].clamp(min=0)
    x[b[3]] = x[b[3]].clamp(min=0)
    x[b[3]][[100, 301]] = -0.0
    x[b[4]] = x[b[4]].clamp(min=0)
    x[b[4]][[7, 1500]] = torch.tensor([-3.0, -2e-3], dtype=torch.float64)
    tiny = torch.finfo(dtype).tiny
    x[b[5]][[4, 13, 1001]] = torch.tensor([tiny / 4, -tiny / 2, tiny / 1024], dtype=torch.float64)
    x[b[6]][[10, 33]] = torch.tensor([500.0, -70000.0 if dtype != torch.float16 else -60000.0], dtype=torch.float64)
    x[b[7]][[2, 5, 8]] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=torch.float64)
    x[b[8]] = x[b[8]] + torch.where(torch.arange(BLOCK) % 64 < 32, 40.0, -40.0).to(torch.float64)
    x[b[9]] = x[b[9]] * 1e-30 if dtype != torch.float16 else x[b[9]] * 1e-3
    x[-21:] = torch.linspace(-2, 3, 21, dtype=torch.float64)
    x[-4] = 0.0
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("level", ALL_LEVELS, ids=[cpu.LEVELS[level] for level in ALL_LEVELS])
def test_every_kind_of_block_matches_the_oracle(dtype, level):
    x = _blocks_of_every_kind(dtype)
    assert x.isnan().any() and (x == 0).any() and x[x.isfinite()].abs().max() > 448
    with cpu.simd_level(level):
        raw = host_stats(x, cast_plan(dtype, NAMES))
    assert_matches(stats_from_raw(1, raw, NAMES), oracle(x, NAMES))


@pytest.mark.parametrize("level", ALL_LEVELS, ids=[cpu.LEVELS[level] for level in ALL_LEVELS])
def test_every_float16_converts_exactly(level):
    """All 65,536 float16 bit patterns, each a tensor of its own (so each goes through the scalar
    conversion every path uses for a tail) and all of them in one tensor (the vector conversion):
    min and max are the value as torch converts it, NaN and infinities counted as such."""
    halves = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    wide = halves.to(torch.float32)
    plan = cast_plan(torch.float16, NAMES)
    with cpu.simd_level(level):
        singles = [stats_from_raw(1, host_stats(halves[i : i + 1], plan), NAMES) for i in range(halves.numel())]
        whole = stats_from_raw(1, host_stats(halves, plan), NAMES)
    for s, v in zip(singles, wide.tolist(), strict=True):
        if v != v:
            assert s.nan == 1, s
        elif abs(v) == float("inf"):
            assert (s.posinf, s.neginf) == ((1, 0) if v > 0 else (0, 1)), (v, s)
        else:
            assert s.min == s.max == v, (v, s.min, s.max)
    assert_matches(whole, oracle(halves, NAMES))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_threads_that_flush_denormals_measure_the_same(dtype):
    """torch.set_flush_denormal(True) turns on DAZ/FTZ on the calling thread only: a subnormal would read
    as zero there and not on torch's other threads. The kernel reads with both off on every thread, so
    the statistics are the oracle's whatever the mode and the thread count, and the caller's mode is
    left as it was. The torch-ops path (float8 on CPU, or no C compiler) compares bit patterns, so it
    is the oracle's too."""
    x = _large_with_subnormals(dtype)
    expected = oracle(x, NAMES)
    assert expected["subnormal"] > 1000 and (dtype != torch.float32 or expected["underflow"]["bfloat16"] > 1000)
    before = torch.get_num_threads()
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no denormal flushing (not x86 with SSE3)")
    try:
        # a plan of its own, parsed by the kernel on this thread: float32 -> bfloat16's threshold is
        # subnormal in float32, and a flushing conversion would make it 0
        plan = dataclasses.replace(cast_plan(dtype, NAMES))
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for level in ALL_LEVELS:
                with cpu.simd_level(level):
                    raw = host_stats(x, plan)
                assert_matches(stats_from_raw(1, raw, NAMES), expected)
            ops = _accumulators.unpack(*torch_ops.device_stats(x, plan), len(NAMES))
            assert_matches(stats_from_raw(1, ops, NAMES), expected)
        # still flushing on this thread: a subnormal times one is zero
        assert (torch.tensor([1e-40]) * 1.0).item() == 0.0
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(before)


def _large_with_subnormals(dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(9)
    x = torch.randn(40 * BLOCK, generator=g, dtype=torch.float64)
    x[::17] = torch.finfo(dtype).tiny / 8 * torch.sign(x[::17])
    x[3::29] = 1e-41 * torch.sign(x[3::29])  # float32: would underflow in bfloat16
    return x.to(dtype)
