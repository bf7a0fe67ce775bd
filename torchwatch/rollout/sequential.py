"""Always-valid sequential tests: decisions that may be read after every sample.

A fixed-sample test read again and again ("peeking") rejects a true hypothesis far more often
than its level says. The tests here are **testing by betting** (Shafer 2021; Waudby-Smith &
Ramdas 2024, *Estimating means of bounded random variables by betting*, JRSS-B 86(1), the
"diversified Kelly" mixture of §5): a gambler starts with capital 1 and bets, one sample at a
time, against the null hypothesis at fair odds. Under the null the capital is a nonnegative
supermartingale, so by Ville's inequality the chance that it **ever** reaches ``1/alpha`` is at
most ``alpha`` — however often it is looked at, whatever the stopping rule. Under an alternative
the capital grows exponentially and the null is rejected.

:class:`MeanTest` tests a bound on the mean of values in ``[0, 1]`` (rescale bounded metrics to
it): the capital is the average of ``K`` constant bets ``lambda_k`` on a geometric grid, each a
product of ``1 + lambda_k (x_i - m)`` (null ``mean <= m``) or ``1 - lambda_k (x_i - m)`` (null
``mean >= m``). An average of supermartingales is one, so the mixture keeps the guarantee and
adapts to the effect's size at a cost of ``ln K`` in the threshold. The null may also hold for a
mean that changes over time (traffic that drifts): the guarantee only needs the conditional mean
of every sample, given those before, to satisfy the null.

:class:`QuantileBounds` gives time-uniform bounds on a quantile from a histogram of counts
(Howard & Ramdas 2022, *Sequential estimation of quantiles with applications to A/B-testing and
best-arm identification*, Bernoulli 28(3)): at a threshold ``x``, the indicators
``1{X <= x}`` have mean ``F(x)``, and ``Q(p) <= x`` iff ``F(x) >= p``. With constant bets the
capital is monotone in ``x``, so testing every histogram edge at the full level ``alpha`` gives a
bound that misses the true quantile with probability at most ``alpha`` (the test at the true
quantile dominates every test beyond it).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["EmpiricalBernstein", "MeanTest", "QuantileBounds"]

LAMBDAS = 16  # constant bets in the mixture: 2^0 ... 2^-15 of the largest
TRUNCATE = 0.5  # the largest bet risks half the capital on the worst outcome (Waudby-Smith & Ramdas)


def _grid(largest: float) -> np.ndarray:
    return largest * TRUNCATE * 2.0 ** -np.arange(LAMBDAS, dtype=np.float64)


def _log_mean_exp(log_capital: np.ndarray, axis: int = -1) -> np.ndarray:
    top = np.max(log_capital, axis=axis, keepdims=True)
    out = top + np.log(np.mean(np.exp(log_capital - top), axis=axis, keepdims=True))
    return np.squeeze(out, axis=axis)


class MeanTest:
    """Sequential test of ``H0: mean <= m`` (``side="above"`` rejects it: the mean is above ``m``)
    or ``H0: mean >= m`` (``side="below"``) for values in ``[0, 1]``, at level ``alpha``.

    ``update(values)`` adds samples in the order they came (shape ``(n,)``, or ``(n, width)`` for
    ``width`` independent tests side by side). A test is rejected once its capital has reached
    ``1/alpha`` and stays so (Ville: under H0 that happens with probability at most ``alpha``,
    whenever it is read). ``rejected_at`` / ``rejected_at_each``: samples when it was rejected
    (0: not yet).
    """

    def __init__(self, m: float, side: str, alpha: float, *, width: int = 1) -> None:
        if not 0.0 < m < 1.0:
            raise ValueError(f"MeanTest boundary must be in (0, 1), got {m!r}")
        if side not in ("above", "below"):
            raise ValueError(f"MeanTest side must be 'above' or 'below', got {side!r}")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"MeanTest alpha must be in (0, 1), got {alpha!r}")
        self.m, self.side, self.alpha, self.width = m, side, alpha, width
        # a bet above risks lambda * m on x = 0; a bet below risks lambda * (1 - m) on x = 1
        sign = 1.0 if side == "above" else -1.0
        self._lambdas = sign * _grid(1.0 / m if side == "above" else 1.0 / (1.0 - m))
        self._log_capital = np.zeros((width, LAMBDAS))
        self._threshold = math.log(1.0 / alpha)
        self.n = 0
        self.rejected_at_each = np.zeros(width, dtype=np.int64)

    @property
    def rejected(self) -> bool:
        return bool(self.rejected_at_each.all())

    @property
    def rejected_at(self) -> int:
        """Samples when every test had been rejected (0: not yet)."""
        return int(self.rejected_at_each.max()) if self.rejected else 0

    @property
    def log_capital(self) -> np.ndarray:
        return _log_mean_exp(self._log_capital)

    def update(self, values: np.ndarray) -> None:
        """Add samples; the capital is read after the last of them (a valid look: Ville's bound
        holds for any times of reading, a batch's end among them)."""
        x = np.asarray(values, dtype=np.float64).reshape(-1, self.width)
        if x.shape[0] == 0:
            return
        # each sample multiplies bet k's capital by 1 + lambda_k * (x - m) > 0 (lambda < 0 below)
        self._log_capital = self._log_capital + np.log1p((x - self.m)[:, :, None] * self._lambdas).sum(axis=0)
        self.n += x.shape[0]
        crossed = (self.rejected_at_each == 0) & (self.log_capital >= self._threshold)
        self.rejected_at_each[crossed] = self.n

    def update_counts(self, levels: np.ndarray, counts: np.ndarray) -> None:
        """Add ``counts[j, i]`` samples of value ``levels[i]`` to test ``j`` (``counts``: ``(width,
        len(levels))``, the same number of samples for every test). The capital is read once, after
        all of them: a valid look, slightly later than one after every sample."""
        counts = np.asarray(counts, dtype=np.float64).reshape(self.width, -1)
        n = counts.sum(axis=1)
        if not n.any():
            return
        if not np.all(n == n[0]):
            raise ValueError("update_counts: every test must get the same number of samples")
        steps = np.log1p((np.asarray(levels, dtype=np.float64) - self.m)[:, None] * self._lambdas)  # (levels, K)
        self._log_capital = self._log_capital + counts @ steps
        self.n += int(n[0])
        open_ = self.rejected_at_each == 0
        crossed = open_ & (self.log_capital >= self._threshold)
        self.rejected_at_each[crossed] = self.n


class EmpiricalBernstein:
    """A confidence sequence for the mean of values in ``[0, 1]`` with O(1) work per sample: the
    predictable plug-in empirical-Bernstein sequence of Waudby-Smith & Ramdas (2024, Theorem 2),
    each side at ``alpha/2``, intersected over time (a running intersection stays valid).

    With ``lambda_i = min(sqrt(2 ln(2/alpha) / (s2_{i-1} i ln(1+i))), 1/2)`` (``s2`` a running
    variance with a prior of 1/4 at one sample), ``psi(l) = (-ln(1-l) - l)/4`` and
    ``v_i = 4 (x_i - mean_{i-1})^2``, the interval at ``t`` is
    ``(sum l_i x_i ± (ln(2/alpha) + sum v_i psi(l_i))) / sum l_i``.
    """

    def __init__(self, alpha: float) -> None:
        self.log_term = math.log(2.0 / alpha)
        self.n = 0
        self._sum = 0.0  # of x, for the running mean
        self._sq = 0.0  # of (x - running mean)^2, for the running variance
        self._lam = self._lam_x = self._penalty = 0.0
        self.lower, self.upper = 0.0, 1.0

    def update(self, values: np.ndarray) -> None:
        x = np.asarray(values, dtype=np.float64).reshape(-1)
        if x.size == 0:
            return
        i = self.n + np.arange(1, x.size + 1, dtype=np.float64)  # 1-based sample numbers
        # running mean and variance before each sample (prior: mean 1/2, variance 1/4 as one sample)
        sums_before = self._sum + np.concatenate([[0.0], np.cumsum(x)[:-1]])
        mean_before = (0.5 + sums_before) / i
        dev = (x - mean_before) ** 2
        sq_before = self._sq + np.concatenate([[0.0], np.cumsum(dev)[:-1]])
        var_before = (0.25 + sq_before) / i
        lam = np.minimum(np.sqrt(2 * self.log_term / (var_before * i * np.log1p(i))), TRUNCATE)
        psi = (-np.log1p(-lam) - lam) / 4
        self._lam += float(lam.sum())
        self._lam_x += float((lam * x).sum())
        self._penalty += float((4 * dev * psi).sum())
        self._sum += float(x.sum())
        self._sq += float(dev.sum())
        self.n += x.size
        centre = self._lam_x / self._lam
        half = (self.log_term + self._penalty) / self._lam
        self.lower = max(self.lower, centre - half)
        self.upper = min(self.upper, centre + half)

    def bounds(self) -> tuple[float, float]:
        if self.lower > self.upper:  # the running intersection emptied: a miss the level allows
            return (self.upper, self.lower)
        return max(0.0, self.lower), min(1.0, self.upper)


class QuantileBounds:
    """Time-uniform bounds on the ``p``-quantile of positive values, from counts on log-spaced edges.

    ``add(values)`` counts samples into bins; ``bounds()`` returns ``(lower, upper)``: the lower
    bound is ever above the true quantile with probability at most ``alpha_lower``, the upper ever
    below it with at most ``alpha_upper``, however often they are read. The bounds
    lie on bin edges (relative resolution ``ratio - 1``); values outside ``[low, high]`` count in
    the end bins, so a bound there is reported as 0 or infinity.
    """

    def __init__(self, p: float, *, alpha_lower: float, alpha_upper: float, low: float = 1e-6, high: float = 1e4,
                 ratio: float = 1.005) -> None:  # fmt: skip
        if not 0.0 < p < 1.0:
            raise ValueError(f"quantile level must be in (0, 1), got {p!r}")
        self.p = p
        steps = math.ceil(math.log(high / low) / math.log(ratio))
        self.edges = low * ratio ** np.arange(steps + 1, dtype=np.float64)
        self.counts = np.zeros(steps + 2, dtype=np.int64)  # below low, the bins, above high
        self._below = _grid(1.0 / (1.0 - p))  # bets that F(x) < p
        self._above = _grid(1.0 / p)  # bets that F(x) > p
        self._lower_threshold, self._upper_threshold = math.log(1.0 / alpha_lower), math.log(1.0 / alpha_upper)
        self._lower_edge = -1  # running bounds: edge indices, never loosened
        self._upper_edge = len(self.edges)
        self._cached: tuple[int, tuple[float, float]] = (0, (0.0, math.inf))
        self.n = 0

    def add(self, values: np.ndarray) -> None:
        x = np.asarray(values, dtype=np.float64).reshape(-1)
        if x.size:
            np.add.at(self.counts, np.searchsorted(self.edges, x, side="left"), 1)
            self.n += x.size

    def bounds(self) -> tuple[float, float]:
        if self.n == 0:
            return 0.0, math.inf
        if self._cached[0] == self.n:
            return self._cached[1]
        at_or_below = np.cumsum(self.counts)[:-1]  # samples <= edges[i] (bins are (e[i-1], e[i]])
        p = self.p
        # Q(p) > x once "F(x) >= p" is rejected (bets that the indicator's mean is below p); the
        # capital falls as x grows, so the rejected edges are a prefix: found by bisection
        low_in, low_out = np.log1p(-self._below * (1 - p)), np.log1p(self._below * p)
        # Q(p) <= x once "F(x) < p" is rejected (bets above p): rejected edges are a suffix
        high_in, high_out = np.log1p(self._above * (1 - p)), np.log1p(-self._above * p)

        def capital(i: int, inside: np.ndarray, outside: np.ndarray) -> float:
            k = float(at_or_below[i])
            return float(_log_mean_exp(k * inside + (self.n - k) * outside))

        lo, hi = self._lower_edge + 1, len(self.edges)  # first edge not rejected lies in [lo, hi]
        while lo < hi:
            mid = (lo + hi) // 2
            if capital(mid, low_in, low_out) >= self._lower_threshold:
                lo = mid + 1
            else:
                hi = mid
        self._lower_edge = lo - 1
        lo, hi = -1, self._upper_edge - 1  # last edge not rejected lies in [lo, hi]
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if capital(mid, high_in, high_out) >= self._upper_threshold:
                hi = mid - 1
            else:
                lo = mid
        self._upper_edge = lo + 1
        lower = float(self.edges[self._lower_edge]) if self._lower_edge >= 0 else 0.0
        upper = float(self.edges[self._upper_edge]) if self._upper_edge < len(self.edges) else math.inf
        self._cached = (self.n, (lower, upper))
        return lower, upper

    def estimate(self) -> float:
        """The empirical quantile (a bin edge)."""
        if self.n == 0:
            return math.nan
        i = int(np.searchsorted(np.cumsum(self.counts), self.p * self.n, side="left"))
        return float(self.edges[min(max(i, 0), len(self.edges) - 1)])
