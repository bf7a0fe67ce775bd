"""The CPU kernel's fast and exact paths, the torch-ops path and the accumulators agree."""

from __future__ import annotations

import math

import pytest
import torch
from _strategies import float_tensors
from hypothesis import given

import torchwatch as tw
from torchwatch import _accumulators
from torchwatch._accumulators import HostAccumulator, stats_from_raw, to_module_stats
from torchwatch._casts import cast_plan
from torchwatch._table import DeviceTable
from torchwatch.kernels import cpu, device_stats, host_stats, torch_ops
from torchwatch.stats import DEFAULT_CAST_DTYPES

pytestmark = pytest.mark.skipif(not cpu.available, reason="the C kernel was not built")
NAMES = DEFAULT_CAST_DTYPES


def _close(a: tuple, b: tuple) -> bool:
    """Counts and extremes identical; moments to 1e-6 of the spread."""
    if a[:6] != b[:6] or a[8:] != b[8:]:
        return False
    n = a[0]
    if n == 0:
        return True
    scale = max(math.sqrt(max(b[7], 0.0) / n), abs(b[6]) * 1e-9, 1e-300)
    return (
        abs(a[6] - b[6]) <= 1e-6 * scale + 1e-300
        and abs(math.sqrt(max(a[7], 0) / n) - math.sqrt(max(b[7], 0) / n)) <= 1e-6 * scale + 1e-300
    )


# every vector path this CPU has (AVX2-only and AVX-512 machines both run CI), and the portable one
LEVELS = list(range(1, cpu.simd_levels()[1] + 1)) or [0]


@pytest.mark.parametrize("level", LEVELS, ids=[cpu.LEVELS[level] for level in LEVELS])
@given(x=float_tensors(dtypes=(torch.float16, torch.bfloat16, torch.float32)))
def test_simd_exact_and_torch_ops_paths_agree(level, x):
    big = x.abs().max().item() if x.numel() else 0.0
    if x.numel() and not (1e-150 < big < 1e150 or big == 0 or math.isnan(big)):
        return
    plan = cast_plan(x.dtype, NAMES)
    with cpu.simd_level(level):
        fast = host_stats(x, plan)
    exact = host_stats(x, plan, exact=True)
    if x.numel():
        ints, floats = device_stats(x, plan)
        ops = _accumulators.unpack(ints, floats, len(NAMES))
        assert _close(ops, exact), (ops, exact)
    assert _close(fast, exact), (fast, exact)


@given(
    x=float_tensors(dtypes=(torch.float32,), shapes=((5000,),)),
    y=float_tensors(dtypes=(torch.float32,), shapes=((3,), (2100,))),
)
def test_c_python_and_device_accumulators_merge_identically(x, y):
    plan = cast_plan(torch.float32, NAMES)
    c_acc, py_acc = cpu.new_accumulator(len(NAMES)), HostAccumulator(len(NAMES))
    table = DeviceTable(torch.device("cpu"), len(NAMES), 2)
    table.slot("t")
    for call, t in enumerate((x, y, x)):
        raw = host_stats(t, plan, exact=True)
        c_acc.add(raw)
        py_acc.add(raw)
        torch_ops.merge_into(table, 0, t, plan, call, use_flag=False)
    c, p = (to_module_stats(a, NAMES).to_dict() for a in (c_acc, py_acc))
    d = stats_from_raw(*table.read_active().stats["t"], NAMES).to_dict()
    for key in c:  # same raw inputs, same formula: equal up to the order of float additions
        same = c[key] == p[key] or (isinstance(c[key], float) and math.isclose(c[key], p[key], rel_tol=1e-12))
        assert same or (math.isnan(c[key]) and math.isnan(p[key])), key
    spread = max(c["std"], abs(c["mean"]) * 1e-9) if c["count"] else 0.0
    for key in c:
        if key in ("mean", "std"):
            assert (math.isnan(c[key]) and math.isnan(d[key])) or abs(c[key] - d[key]) <= 1e-6 * spread, key
        else:  # min/max are NaN in both when no value was finite
            assert c[key] == d[key] or (math.isnan(c[key]) and math.isnan(d[key])), key


def test_the_best_vector_level_is_in_use_and_others_are_refused():
    used, best = cpu.simd_levels()
    assert used == best and cpu.simd() == (best > 0)
    with pytest.raises(ValueError, match="not available on this CPU"):
        with cpu.simd_level(best + 1):
            pass
    assert cpu.simd_levels() == (used, best)


def test_without_the_c_kernel_everything_still_works(monkeypatch):
    monkeypatch.setattr(cpu, "available", False)
    x = torch.randn(1000) * 100
    x[3] = math.nan
    s = tw.tensor_stats(x)
    assert s.nan == 1 and s.count == 1000 and math.isclose(s.mean, x[~x.isnan()].double().mean().item(), rel_tol=1e-9)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    with tw.attach(model) as watch:
        model(torch.randn(3, 4))
        assert watch.snapshot()["1"].count == 12


def test_plan_and_accumulator_reject_bad_input():
    with pytest.raises(ValueError, match="at most 8 cast dtypes, got 9"):
        cpu._cstats.Plan(1e-38, [0.0] * 9, [1.0] * 9)
    with pytest.raises(ValueError, match="1 underflow but 2 overflow thresholds"):
        cpu._cstats.Plan(1e-38, [0.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="k must be in \\[0, 8\\], got 9"):
        cpu._cstats.Accumulator(9)
    acc = cpu._cstats.Accumulator(1)
    with pytest.raises(ValueError, match="expected 1 underflow and overflow counts"):
        acc.add((0, 0, 0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0, (), ()))
    plan = cpu.native_plan(cast_plan(torch.float32, ()))
    with pytest.raises(ValueError, match="bad dtype code 9"):
        cpu._cstats.tensor_stats(0, 0, 9, plan, False)


def test_simd_path_is_used_where_the_cpu_has_avx2():
    import platform

    if platform.machine() in ("x86_64", "AMD64"):
        flags = open("/proc/cpuinfo").read() if platform.system() == "Linux" else ""
        assert cpu.simd() == ("avx2" in flags and "fma" in flags and "f16c" in flags) or not flags


# ---- chunks on torch's threads, and the single pass's guessed shift and scale --------------

BLOCK, CHUNK = cpu.BLOCK, cpu.CHUNK  # elements per block, and per chunk at least (_cstats.c)


def _large(dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Several chunks whose blocks differ a lot: a jump of the mean by 1e4 standard deviations,
    values near the bottom and the top of float32's range, ReLU zeros, NaN/Inf, a tail."""
    g = torch.Generator().manual_seed(seed)
    n = 9 * CHUNK + 4097
    x = torch.randn(n, generator=g, dtype=torch.float64)
    x[CHUNK : 2 * CHUNK] += 1e4  # the shift guessed from the block before is far off
    x[3 * CHUNK : 3 * CHUNK + 5000] *= 1e-30  # the scale guessed from the block before is far off
    x[4 * CHUNK : 5 * CHUNK] = x[4 * CHUNK : 5 * CHUNK].clamp(min=0)  # zeros counted inline
    x[5 * CHUNK : 5 * CHUNK + 3000] = 0.0  # whole blocks of zeros
    x[6 * CHUNK : 6 * CHUNK + 4096] *= 1e30
    x[7 * CHUNK + 17] = math.nan
    x[8 * CHUNK + 5] = math.inf
    x[-3] = 1e-3  # an fp8 underflow in the tail
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_large_tensors_match_the_oracle_and_do_not_depend_on_the_thread_count(dtype):
    from _oracle import assert_matches, oracle

    x = _large(dtype, seed=3)
    plan = cast_plan(dtype, NAMES)
    before = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            for level in LEVELS:
                with cpu.simd_level(level):
                    results[threads, level] = host_stats(x, plan)
            with cpu.threads(False):
                results[threads, "serial"] = host_stats(x, plan)
            # more shares than threads: a thread that finishes its own takes what is left of the others'
            # (another tensor measured just before, so that a chunk left unread cannot show a stale result)
            host_stats(-3 * x, plan)
            with cpu.shares(7):
                results[threads, "shares"] = host_stats(x, plan)
        host_stats(-3 * x, plan)
        with cpu.threads(False), cpu.shares(5):
            results[1, "serial shares"] = host_stats(x, plan)
    finally:
        torch.set_num_threads(before)
    for level in LEVELS:  # bit for bit: chunks are merged in one order whatever runs them
        assert results[1, level] == results[2, level] == results[4, level], level
    shared = [results[t, "shares"] for t in (1, 2, 4)] + [results[1, "serial shares"]]
    assert all(raw == results[1, LEVELS[-1]] for raw in shared)
    # the serial runs use the best level too, on the calling thread alone
    assert results[1, LEVELS[-1]] == results[1, "serial"] == results[4, "serial"] == results[4, LEVELS[-1]]
    for (_, level), raw in results.items():
        if level in LEVELS:
            assert_matches(stats_from_raw(1, raw, NAMES), oracle(x, NAMES))


def test_threads_are_torchs_own():
    runtime, threads = cpu.parallel_info()
    import platform

    if platform.system() == "Linux" and "OpenMP" in torch.__config__.parallel_info():
        assert runtime is not None and "omp" in runtime.rsplit("/", 1)[-1]
        before = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            assert cpu.parallel_info()[1] == 1
            torch.set_num_threads(3)
            assert cpu.parallel_info()[1] == 3
        finally:
            torch.set_num_threads(before)
    else:
        assert threads >= 1


@pytest.mark.parametrize("level", LEVELS, ids=[cpu.LEVELS[level] for level in LEVELS])
@pytest.mark.parametrize(
    "blocks",
    [
        (0.0, 1.0, 1e6, 1.0),  # the mean jumps by 1e6 sd between blocks
        (1e6, 1.0, 0.0, 1e-3),  # and back, with a spread 1000x smaller
        (0.0, 1e20, 0.0, 1e-20),  # the scale falls by 2^133
        (0.0, 1e-20, 0.0, 1e20),  # and rises
        (5.0, 0.0, 5.0, 1.0),  # a constant block, then a spread around the same value
    ],
)
def test_a_poor_guess_from_the_block_before_is_corrected(level, blocks):
    from _oracle import assert_matches, oracle

    mean_a, sd_a, mean_b, sd_b = blocks
    g = torch.Generator().manual_seed(5)
    x = torch.cat(
        [torch.randn(BLOCK, generator=g) * sd_a + mean_a, torch.randn(BLOCK + 37, generator=g) * sd_b + mean_b]
    )
    plan = cast_plan(torch.float32, NAMES)
    with cpu.simd_level(level):
        raw = host_stats(x, plan)
    assert_matches(stats_from_raw(1, raw, NAMES), oracle(x, NAMES))
    second = host_stats(x[BLOCK:], plan)  # the second block alone, with its own guess
    assert_matches(stats_from_raw(1, second, NAMES), oracle(x[BLOCK:], NAMES))


@pytest.mark.parametrize("level", LEVELS, ids=[cpu.LEVELS[level] for level in LEVELS])
@pytest.mark.parametrize("jump", [1e3, 1e4])
def test_a_block_after_a_poor_shift_guess_is_as_exact_as_one_measured_alone(level, jump):
    """The second block's shift is guessed from the first (mean 0) while its own mean is `jump`
    sd away. The whole tensor's std is dominated by the jump, so the oracle cannot see a block's
    own error; the Chan merge of the two blocks measured alone (each with its own guess) can: its
    second moment differs from the whole call's only by float32 rounding of squares taken within
    half a block sd of the block's mean (~1e-7 of the blocks' own m2, allowed 1e-5) and float64
    rounding of the jump's term (allowed 1e-13 of it). Squares taken around the guessed shift
    instead lose ~1e-7 of jump^2 each: 1e3 to 1e6 times that allowance."""
    plan = cast_plan(torch.float32, NAMES)

    def measured(t: torch.Tensor):
        with cpu.simd_level(level):
            s = stats_from_raw(1, host_stats(t, plan), NAMES)
        return s.count, s.mean, s.std**2 * s.count  # n, mean, m2

    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        a, b = torch.randn(BLOCK, generator=g), torch.randn(BLOCK + 37, generator=g) + jump
        (_, _, m2), (na, ma, m2a), (nb, mb, m2b) = measured(torch.cat([a, b])), measured(a), measured(b)
        merged = m2a + m2b + (mb - ma) ** 2 * na * nb / (na + nb)
        assert abs(m2 - merged) <= 1e-5 * (m2a + m2b) + 1e-13 * merged, (seed, m2, merged)


def _sample_positions(n: int) -> list[int]:
    """The elements whose mean is a block's shift guess (``_cstats.c``: TW_SAMPLES = 32, odd stride)."""
    stride = (n // 32) | 1 if n >= 32 else 1
    return list(range(stride // 2, n, stride))


def _assert_moments_exact(s, x: torch.Tensor, what: object) -> None:
    """Read again around its own mean, a block's m2 is within 16 float32 ulps of the float64
    oracle's (each lane sums 16 positive squares before going to float64): 1e-6 allows it; squares
    taken around a shift many block sds away carry that many times more rounding."""
    x64 = x.double()
    m2 = ((x64 - x64.mean()) ** 2).sum().item()
    assert abs(s.std**2 * s.count - m2) <= 1e-6 * m2, (what, s.std**2 * s.count, m2)
    assert abs(s.mean - x64.mean().item()) <= 1e-6 * math.sqrt(m2 / x.numel()), what


@pytest.mark.parametrize("level", LEVELS, ids=[cpu.LEVELS[level] for level in LEVELS])
@pytest.mark.parametrize("period", [32, 64, 128, 768])
def test_periodic_data_does_not_mislead_the_samples(level, period):
    """A block's moments are taken around the mean of 32 elements spread over it. Rows of real
    activations are a multiple of a power of two long, and an even stride between the samples
    lands on the same few features of every row: a spike every `period` elements (the features
    of a 768-wide row, one of them large) then fooled the shift for the phases that put the
    samples on the spikes, and those blocks were read again (BERT-base: 11% of its blocks). With
    an odd stride the samples meet every phase: no phase of any of these periods is read again,
    and the moments are exact."""
    g = torch.Generator().manual_seed(period)
    base = torch.randn(BLOCK, generator=g)
    plan = cast_plan(torch.float32, NAMES)
    before = cpu.rereads()
    for phase in range(period):
        x = base.clone()
        x[phase::period] += 30.0
        with cpu.simd_level(level):
            _assert_moments_exact(stats_from_raw(1, host_stats(x, plan), NAMES), x, phase)
    assert cpu.rereads() == before


@pytest.mark.parametrize("level", LEVELS, ids=[cpu.LEVELS[level] for level in LEVELS])
def test_a_block_whose_samples_mislead_the_shift_is_read_again_with_its_own_mean(level):
    """Spikes on exactly the sampled elements (the one pattern any sampling misses) put the shift
    ~30 away from the block's mean while its spread is ~30 / sqrt(128): squares taken around it
    would be ~128 times the block's own m2 and carry that many times its float32 rounding. The
    block is read again around its own mean, and its moments are exact."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(BLOCK, generator=g)
    x[_sample_positions(BLOCK)] += 30.0
    plan = cast_plan(torch.float32, NAMES)
    before = cpu.rereads()
    with cpu.simd_level(level):
        _assert_moments_exact(stats_from_raw(1, host_stats(x, plan), NAMES), x, "samples on spikes")
    assert cpu.rereads() - before == (1 if level else 0)


def test_the_shift_from_samples_suits_convolution_outputs():
    """In an NCHW output a block often spans two channels or more whose means differ by several
    of their sd, so the block before is a poor shift (28% of EfficientNet-Lite0's 2,048-element
    blocks at batch 8); the mean of samples spread over the block itself is poor for ~0.3% of them. Here
    144 channels of 56 x 56 with means ~ N(0, 3^2) and sd in [0.5, 2]: at most 2% may be read
    again, and the result matches the oracle."""
    from _oracle import assert_matches, oracle

    g = torch.Generator().manual_seed(0)
    means, sds = torch.randn(1, 144, 1, 1, generator=g) * 3, torch.rand(1, 144, 1, 1, generator=g) * 1.5 + 0.5
    x = torch.randn(2, 144, 56, 56, generator=g) * sds + means
    blocks = -(-x.numel() // BLOCK)
    with cpu.simd_level(LEVELS[-1]):
        before = cpu.rereads()
        raw = host_stats(x, cast_plan(torch.float32, NAMES))
        again = cpu.rereads() - before
    assert_matches(stats_from_raw(1, raw, NAMES), oracle(x, NAMES))
    assert again <= 0.02 * blocks, (again, blocks)


@pytest.mark.parametrize("level", LEVELS, ids=[cpu.LEVELS[level] for level in LEVELS])
def test_relu_blocks_holding_a_negative_value_are_measured_with_their_absolute_values(level):
    """After a block with zeros and no negative value (ReLU outputs), the AVX2 and AVX-512 loops take
    x as its own |x|; a block that then holds negatives must be read again with |x|. Here block 4 of a ReLU
    output holds the smallest |x| (a negative subnormal), a negative fp8 underflow and a large
    negative value; later blocks hold -0.0, which is a zero, not a negative value. Every count and
    extreme must equal the float64 oracle's."""
    from _oracle import assert_matches, oracle

    g = torch.Generator().manual_seed(11)
    x = torch.randn(CHUNK, generator=g).clamp(min=0)  # one chunk: its blocks run in order on one thread
    block4 = slice(4 * BLOCK, 5 * BLOCK)
    x[block4][7] = -1e-39  # the smallest nonzero |x| of the tensor: a subnormal
    x[block4][300] = -1e-4  # below fp8 e4m3's underflow threshold
    x[block4][1500] = -5.0  # a plain negative value: not an underflow
    x[6 * BLOCK + 3 : 6 * BLOCK + 40] = -0.0
    assert CHUNK >= 8 * BLOCK and (x[: 4 * BLOCK] == 0).any() and (x[: 4 * BLOCK] >= 0).all()
    plan = cast_plan(torch.float32, NAMES)
    before = cpu.route_misses()
    with cpu.simd_level(level):
        raw = host_stats(x, plan)
    assert_matches(stats_from_raw(1, raw, NAMES), oracle(x, NAMES))
    assert cpu.route_misses() - before == (1 if level else 0)  # block 4 alone was read twice


@pytest.mark.parametrize("level", LEVELS, ids=[cpu.LEVELS[level] for level in LEVELS])
def test_a_chunks_first_block_takes_its_route_from_its_samples(level):
    """A chunk's first block has no block before it to learn from: its samples tell whether to count
    zeros in the pass and take x as its own |x|. A ReLU output of several chunks is then read once
    everywhere (before, each chunk's first block took a second pass for its zeros); a first block
    whose samples are zeros and positive values but which holds a negative value elsewhere is read
    again with |x| (one route miss), and one with a negative sample is not taken for a ReLU block at
    all. Every count and extreme must equal the float64 oracle's, whatever the number of threads."""
    from _oracle import assert_matches, oracle

    g = torch.Generator().manual_seed(12)
    relu = torch.randn(4 * CHUNK, generator=g).clamp(min=0)
    plan = cast_plan(torch.float32, NAMES)
    with cpu.simd_level(level):
        before = cpu.route_misses()
        assert_matches(stats_from_raw(1, host_stats(relu, plan), NAMES), oracle(relu, NAMES))
        assert cpu.route_misses() == before

        x = relu.clone()
        hidden = [7, 300, 1500]  # no sample among them
        x[CHUNK + torch.tensor(hidden)] = torch.tensor([-1e-39, -1e-4, -5.0])
        assert not set(hidden) & set(_sample_positions(BLOCK))
        x[2 * CHUNK + _sample_positions(BLOCK)[5]] = -2.0  # seen by the samples: no ReLU route
        threads_before = torch.get_num_threads()
        try:
            for threads in (1, 2):
                torch.set_num_threads(threads)
                before = cpu.route_misses()
                assert_matches(stats_from_raw(1, host_stats(x, plan), NAMES), oracle(x, NAMES))
                assert cpu.route_misses() - before == (1 if level else 0)
        finally:
            torch.set_num_threads(threads_before)
