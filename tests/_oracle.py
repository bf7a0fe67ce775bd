"""Independent reference for ModuleStats: float64 numpy, math.fsum and real dtype casts."""

from __future__ import annotations

import math

import numpy as np
import torch

from torchwatch.monitors.ids import hashed_bucket


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


U32 = 2.0**-24  # unit roundoff of float32


def gamma(n: int, u: float = U32) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative bound of an n-term floating-point sum or
    dot product, whatever the summation order or FMA use."""
    return n * u / (1 - n * u)


def _straddles(v: np.ndarray, err: np.ndarray, threshold: float) -> np.ndarray:
    """Elements whose |value| could lie on either side of ``threshold`` given the error bound."""
    a = np.abs(v)
    return (a - err <= threshold) & (a + err >= threshold)


def assert_within(
    stats,
    values: torch.Tensor,
    err: torch.Tensor,
    *,
    rel: float = 1e-6,
    cast_dtypes=("float16", "bfloat16", "float8_e4m3fn"),
) -> None:
    """``stats`` were measured on an activation that differs from ``values`` by at most ``err``
    per element (a bound from the arithmetic, e.g. another summation order or vector math
    library computing the same layers).

    Then min/max/absmax and the mean move by at most max(err), the std by at most the RMS of
    the differences <= max(err) (the population std is 1-Lipschitz in the RMS norm); a count
    can change only by the elements whose interval [v - err, v + err] reaches its threshold.
    """
    want = oracle(values, cast_dtypes)
    v = values.detach().reshape(-1).double().numpy()
    e = err.detach().reshape(-1).double().numpy()
    assert np.isfinite(v).all() and np.isfinite(e).all(), "finite activations only"
    tiny = torch.finfo(values.dtype).tiny
    ambiguous = {
        "zeros": int((np.abs(v) <= e).sum()),
        "subnormal": int((_straddles(v, e, tiny) | (np.abs(v) <= e)).sum()),
    }
    for key in ("count", "nan", "posinf", "neginf"):
        assert getattr(stats, key) == want[key], (key, getattr(stats, key), want[key])
    for key, slack in ambiguous.items():
        assert abs(getattr(stats, key) - want[key]) <= slack, (key, getattr(stats, key), want[key], slack)
    for name in cast_dtypes:
        info = torch.finfo(getattr(torch, name))
        # x.to(dtype) is 0 exactly when |x| <= half the smallest subnormal (ties go to even: 0)
        smallest = info.smallest_normal * info.eps
        slack = int((_straddles(v, e, smallest / 2) | (np.abs(v) <= e)).sum())
        assert abs(stats.underflow[name] - want["underflow"][name]) <= slack, ("underflow", name)
        slack = int(_straddles(v, e, info.max).sum())
        assert abs(stats.overflow[name] - want["overflow"][name]) <= slack, ("overflow", name)
    bound = float(e.max())
    for key in ("min", "max", "absmax"):
        assert abs(getattr(stats, key) - want[key]) <= bound, (key, getattr(stats, key), want[key], bound)
    scale = max(want["std"], abs(want["mean"]) * 1e-9, 1e-300)
    assert abs(stats.mean - want["mean"]) <= bound + rel * scale, ("mean", stats.mean, want["mean"], bound)
    assert abs(stats.std - want["std"]) <= bound + rel * scale, ("std", stats.std, want["std"], bound)


def id_counts(values: np.ndarray, exact: int, hashed: int) -> np.ndarray:
    """Exact counts below ``exact``, hashed buckets above: the sketch's counts by plain Python."""
    counts = np.zeros(exact + hashed, dtype=np.int64)
    for v in values.tolist():
        counts[v if 0 <= v < exact else exact + hashed_bucket(v, hashed)] += 1
    return counts


def false_alarm_bound(trials: int, rate: float, confidence: float = 0.999) -> int:
    """The most false alarms ``trials`` independent chances at the advertised ``rate`` give with
    probability ``confidence``: the binomial quantile (summed in log space, no scipy). A test
    that accepts more than this accepts a rate above the advertised one."""
    log_q = math.log1p(-rate)
    total, k = 0.0, 0
    while True:
        log_pmf = (math.lgamma(trials + 1) - math.lgamma(k + 1) - math.lgamma(trials - k + 1)
                   + k * math.log(rate) + (trials - k) * log_q)  # fmt: skip
        total += math.exp(log_pmf)
        if total >= confidence:
            return k
        k += 1


def cusum_arl(h: float, k: float, states: int = 600) -> float:
    """In-control ARL of a one-sided CUSUM S = max(0, S + z - k) of N(0, 1) values signalling at
    S >= h, from Brook & Evans' Markov chain on ``states`` cells of [0, h) (midpoint rule): an
    independent check of the charts' closed-form (Siegmund) thresholds."""
    w = h / states
    mids = (np.arange(states) + 0.5) * w
    edges = np.arange(states + 1) * w

    def cdf(x: np.ndarray) -> np.ndarray:
        return 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))

    # from state i: to cell 0 if S + z - k < w (max(0, .) included), to cell j for edges j..j+1
    shift = edges[None, :] - mids[:, None] + k
    c = cdf(shift)
    p = np.diff(c, axis=1)
    p[:, 0] = c[:, 1]
    arl = np.linalg.solve(np.eye(states) - p, np.ones(states))
    return float(arl[0])
