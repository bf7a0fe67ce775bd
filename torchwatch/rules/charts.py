"""Control charts: a statistic leaving its own learned baseline (:class:`ControlChart`,
:class:`EdgeChart` for inputs and outputs), each a two-sided CUSUM with a computed threshold, all
series of a model sharing one false-alarm budget (:class:`Budget`)."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import numpy as np

from .. import _validate
from ..alerts import Alert
from ..errors import ConfigError
from ..stats import ModuleStats
from .interval import Interval, where

LOG_ZERO = math.log(1e-30)  # where a log-scale chart puts an exact 0: a constant input is a shift too


def _log_scale(v: float) -> float:
    if not math.isfinite(v):
        return math.nan
    return math.log(v) if v > 0 else LOG_ZERO


def _absmax(s: ModuleStats) -> float:
    return _log_scale(s.absmax)


def _std(s: ModuleStats) -> float:
    return _log_scale(s.std)


def _zeros(s: ModuleStats) -> float:
    return s.zeros / s.count if s.count else math.nan


# statistic -> (how it is charted, the smallest standard deviation the chart assumes, words, sides)
STATISTICS: dict[str, tuple[Callable[[ModuleStats], float], float, str, str]] = {
    # A batch maximum is Gumbel-like (wider floor), and its drops are routine: an interval that
    # lacks the one kind of input that drives a module's extremes (or a clamped activation that
    # did not saturate) sits several warm-up sd below. A rise is the risk (overflow, a x255
    # input); a module that went dead moves its std and zero fraction. So abs-max is charted upward.
    "absmax": (_absmax, 0.10, "log abs-max", "above"),
    "std": (_std, 0.05, "log std", "both"),
    "zero_fraction": (_zeros, 0.01, "fraction of zeros", "both"),
}


def _siegmund_arl(h: float, k: float) -> float:
    """In-control ARL of a one-sided CUSUM of N(0, 1) values with reference ``k`` and threshold ``h``
    (Siegmund's approximation, within a few percent of the exact value for k around 0.5)."""
    delta, b = -k, h + 1.166
    return (math.exp(-2 * delta * b) + 2 * delta * b - 1) / (2 * delta * delta)


@functools.lru_cache(maxsize=64)
def cusum_threshold(arl: float, k: float) -> float:
    """Threshold of a two-sided Gaussian CUSUM (two one-sided charts) with in-control ARL ``arl``."""
    lo, hi = 0.0, 1.0
    while _siegmund_arl(hi, k) < 2 * arl:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _siegmund_arl(mid, k) < 2 * arl else (lo, mid)
    return hi


DEFAULT_MODEL_ARL = 100_000.0  # intervals between false alarms of all a model's charts together


class Budget:
    """One false-alarm budget shared by every series of the charts given it: ``arl`` clean
    intervals between false alarms of them all together (a model-level figure, however many
    modules and statistics are charted).

    Each series gets the threshold of a per-series ARL of ``arl x series`` (a union bound over the
    series, so the model's rate is at most ``1 / arl`` under the charts' model), recomputed as
    series appear. ``rules.defaults()`` shares one budget between its charts.

    Example:
        >>> from torchwatch import rules
        >>> budget = rules.Budget(arl=100_000)
        >>> charts = [rules.ControlChart(s, budget=budget) for s in ("absmax", "std")]
        >>> budget.series  # none yet: series are registered as modules are first charted
        0
    """

    def __init__(self, arl: float = DEFAULT_MODEL_ARL) -> None:
        _validate.number("Budget", "arl", arl, above=1.0)
        self.arl = float(arl)
        self.series = 0

    def series_arl(self) -> float:
        """The ARL each series is charted for: ``arl`` times the series registered so far."""
        return self.arl * max(self.series, 1)

    def __repr__(self) -> str:
        return f"Budget(arl={self.arl:g}, series={self.series})"


def _spread(values: np.ndarray, mu: float, inflate: float, min_sigma: float) -> float:
    """The in-control spread learned from warm-up values: the larger of 1.4826 x MAD and the
    5-95% quantile range / 3.29 (equal for Gaussian values; the second is wider where a minority
    of intervals sits far out, as a batch abs-max does when one kind of input is missing), widened
    by ``inflate`` for the error of a short warm-up, and at least ``min_sigma``."""
    mad = 1.4826 * float(np.median(np.abs(values - mu)))
    q05, q95 = np.quantile(values, (0.05, 0.95))
    return max(inflate * max(mad, float(q95 - q05) / 3.29), min_sigma)


class _Series:
    __slots__ = ("hi", "lo", "mu", "sigma", "warm")

    def __init__(self) -> None:
        self.warm: list[float] = []
        self.mu = self.sigma = math.nan
        self.hi = self.lo = 0.0

    def step(
        self,
        v: float,
        warmup: int,
        min_sigma: float,
        k: float,
        threshold: float,
        inflate: float = 1.0,
        upward: bool = False,
    ) -> tuple[float, str] | None:
        """Feed one value: learn the baseline during warm-up, then run the two-sided CUSUM.
        Returns ``(z, "above" | "below")`` when the chart signals (and restarts it), else None.

        One interval moves the CUSUM by at most ``threshold / 2``: a single outlying interval (a
        heavy tail, one odd batch) never signals alone, two in a row past ``threshold / 2 + k``
        standard deviations always do."""
        if math.isnan(v):
            return None
        if math.isnan(self.mu):
            self.warm.append(v)
            if len(self.warm) >= warmup:
                values = np.asarray(self.warm)
                self.mu = float(np.median(values))
                self.sigma = _spread(values, self.mu, inflate, min_sigma)
                self.warm = []
            return None
        z = (v - self.mu) / self.sigma
        clip = threshold / 2 + k
        zc = min(max(z, -clip), clip)
        self.hi = max(0.0, self.hi + zc - k)
        self.lo = 0.0 if upward else max(0.0, self.lo - zc - k)
        if self.hi < threshold and self.lo < threshold:
            return None
        direction = "above" if self.hi >= threshold else "below"
        self.hi = self.lo = 0.0
        return z, direction


class _Chart:
    """What the charts share: the false-alarm budget, its threshold, and series creation."""

    arl: float | None
    budget: Budget
    k: float
    max_series: int
    warmup: int
    _series: dict

    def _setup(self, owner: str, warmup: object, arl: object, budget: object, k: object, max_series: object,
               trips: object) -> None:  # fmt: skip
        _validate.integer(owner, "warmup", warmup, low=5)
        _validate.optional(_validate.number, owner, "arl", arl, above=1.0)
        if budget is not None and not isinstance(budget, Budget):
            raise ConfigError(f"{owner}: budget must be a torchwatch.rules.Budget, got {type(budget).__name__}")
        if arl is not None and budget is not None:
            raise ConfigError(f"{owner}: pass arl= (per series) or budget= (shared by a model's charts), not both")
        _validate.number(owner, "k", k, above=0.0, high=10.0)
        _validate.integer(owner, "max_series", max_series, low=1)
        _validate.flag(owner, "trips", trips)
        self.warmup = warmup  # type: ignore[assignment]
        self.arl = None if arl is None else float(arl)
        self.budget = Budget() if budget is None else budget
        self.k, self.max_series, self.trips = float(k), max_series, trips
        # A spread learned from a short warm-up is often too small, and a CUSUM's false-alarm rate
        # grows fast with that error: widen it by 1 + 3/sqrt(warmup) (x1.55 at 30 intervals).
        self.inflate = 1.0 + 3.0 / math.sqrt(warmup)  # type: ignore[operator]

    @property
    def threshold(self) -> float:
        """The CUSUM threshold of every series: for ``arl`` per series when given, else for the
        budget's per-series share (it rises, slowly, as series are added)."""
        return cusum_threshold(self.budget.series_arl() if self.arl is None else self.arl, self.k)

    @property
    def series(self) -> int:
        """Series this chart keeps (each counted once in its budget)."""
        return len(self._series)

    def warmup_state(self) -> tuple[int, int, int]:
        """``(series, still learning their baseline, most intervals any of them still needs)``."""
        learning = [self.warmup - len(s.warm) for s in self._series.values() if math.isnan(s.mu)]
        return len(self._series), len(learning), max(learning, default=0)

    def _series_for(self, key: tuple) -> _Series | None:
        """The series of ``key``, made (and counted in the budget) on first use; None past ``max_series``."""
        found = self._series.get(key)
        if found is None and len(self._series) < self.max_series:
            found = self._series[key] = _Series()
            self.budget.series += 1
        return found


class ControlChart(_Chart):
    """A statistic of every module on its own CUSUM chart, baselines learned in warm-up.

    Args:
        stat: ``"absmax"`` (log scale, upward only: a batch maximum's drops are routine, its rises
            are the overflow risk), ``"std"`` (log scale) or ``"zero_fraction"``, both two-sided.
        warmup: intervals per series used to learn its baseline: the median, and a spread that is
            the larger of 1.4826 x MAD and the 5-95% range / 3.29, widened by 1 + 3/sqrt(warmup)
            for the error of a short warm-up.
        arl: target in-control average run length of each series, in intervals; by default
            (None) the series share ``budget`` instead.
        budget: the :class:`Budget` shared with other charts (``rules.defaults()`` gives all its
            charts one); by default a budget of this chart's own, of 100,000 intervals.
        k: CUSUM reference value in standard deviations (0.5 detects shifts of ~1 sd fastest).
        min_sigma: floor on the learned spread (default: 0.10 on the log scale for abs-max, whose
            batch-to-batch spread is Gumbel-like and badly estimated from a short warm-up; 0.05 for
            std; 0.01 for the zero fraction): shifts smaller than that are not worth an alert.
        max_series: series kept (cohorts x modules); later ones are not charted.
        min_elements: intervals in which a module produced fewer elements are not charted (their
            statistics are too noisy to hold a baseline; flush less often to chart them).

    Example:
        >>> from torchwatch import rules
        >>> chart = rules.ControlChart("absmax", warmup=10, arl=1000)
        >>> round(chart.threshold, 2)
        5.75
    """

    def __init__(
        self,
        stat: str,
        *,
        warmup: int = 30,
        arl: float | None = None,
        budget: Budget | None = None,
        k: float = 0.5,
        min_sigma: float | None = None,
        max_series: int = 4096,
        min_elements: int = 4096,
        trips: bool = False,
    ) -> None:
        if not isinstance(stat, str) or stat not in STATISTICS:
            raise ConfigError(f"ControlChart stat={stat!r} is not valid: use one of {', '.join(STATISTICS)}")
        self._setup("ControlChart", warmup, arl, budget, k, max_series, trips)
        _validate.optional(_validate.number, "ControlChart", "min_sigma", min_sigma, above=0.0)
        _validate.integer("ControlChart", "min_elements", min_elements, low=0)
        self.stat = stat
        self.value_of, default_sigma, self.words, sides = STATISTICS[stat]
        self.upward = sides == "above"
        self.min_sigma = default_sigma if min_sigma is None else float(min_sigma)
        self.min_elements = min_elements
        self.name = f"baseline_{stat}"
        self._series: dict[tuple[str | None, str], _Series] = {}

    def evaluate(self, interval: Interval) -> list[Alert]:
        out = []
        threshold = self.threshold
        for module, s in interval.stats.items():
            if s.count < self.min_elements:
                continue
            series = self._series_for((interval.cohort, module))
            if series is None:
                continue
            v = self.value_of(s)
            step = series.step(v, self.warmup, self.min_sigma, self.k, threshold, self.inflate, self.upward)
            if step is not None:
                z, direction = step
                shown, expected = self._shown(v), self._shown(series.mu)
                out.append(interval.alert(
                    self.name, module, self.stat, shown, expected,
                    f"{self.words} of {module!r}{where(interval.cohort)} left its baseline: {shown:.4g} now, "
                    f"{expected:.4g} expected ({z:+.1f} sd, {direction})",
                ))  # fmt: skip
        return out

    def _shown(self, v: float) -> float:
        return v if self.stat == "zero_fraction" else math.exp(v)

    def baseline(self, module: str, cohort: str | None = None) -> tuple[float, float] | None:
        """``(expected value, spread)`` learned for a series, on the charted scale; None in warm-up."""
        series = self._series.get((cohort, module))
        if series is None or math.isnan(series.mu):
            return None
        return series.mu, series.sigma


class EdgeChart(_Chart):
    """What goes in and what comes out, on CUSUM charts with baselines learned in warm-up.

    One series per signal, each learned and charted like :class:`ControlChart`'s:

    * floating-point inputs: their scale (log of the root mean square; a x255 rescale, a dead
      input), charted from 64 values per interval, where :class:`ControlChart` needs 4096;
    * floating-point inputs with few channels: each channel's mean in units of the input's standard
      deviation (a channel swap, a wrong normalisation; a pure rescale leaves these alone);
    * integer inputs: the share of the most frequent value (padding-only or constant batches) and
      the share of distinct values (a surge of one out-of-vocabulary id, a collapsed vocabulary);
    * outputs (``attach(outputs=...)``): mean confidence, margin, normalised entropy, abstention
      rate, and the class mix: the total-variation distance between the interval's predicted-class
      histogram and the warm-up's (its baseline from leave-one-out distances of the warm-up intervals).

    Intervals with fewer than ``min_count`` values (rows for outputs) are not charted. Alerts have
    ``rule="input_shift"`` or ``"output_shift"``; ``stat`` names the signal. ``warmup``, ``arl``,
    ``budget`` and ``k`` are :class:`ControlChart`'s.
    """

    def __init__(
        self, *, warmup: int = 30, arl: float | None = None, budget: Budget | None = None, k: float = 0.5,
        min_count: int = 64, max_series: int = 1024, trips: bool = False,
    ) -> None:  # fmt: skip
        self._setup("EdgeChart", warmup, arl, budget, k, max_series, trips)
        _validate.integer("EdgeChart", "min_count", min_count, low=1)
        self.min_count = min_count
        self.name = "edge_baseline"
        self._series: dict[tuple[str, str], _Series] = {}
        self._class_warm: list[np.ndarray] = []
        self._class_base: np.ndarray | None = None

    def _signals(self, interval: Interval) -> list[tuple[str, str, str, float, float]]:
        """(rule, position, signal, value, smallest spread) for the interval."""
        out = []
        for name, inp in interval.inputs.items():
            means = inp.channel_means
            s = interval.stats.get(name)
            if s is not None and s.count >= self.min_count and s.count - s.nonfinite > 0:
                # the input's scale (log RMS): a x255 or a dead (all-zero) input, also where the input
                # is too small per interval for ControlChart's min_elements
                rms = math.sqrt(max(s.mean * s.mean + s.std * s.std, 0.0))
                out.append(("input_shift", name, "log_rms", _log_scale(rms), 0.05))
            if means is not None and s is not None and s.std > 0 and inp.channel_elements >= self.min_count:
                out += [("input_shift", name, f"channel_mean[{c}]", m / s.std, 0.02) for c, m in enumerate(means)]
            ids = inp.ids
            if ids is not None and ids.count >= self.min_count:
                out.append(("input_shift", name, "top1_fraction", ids.top1_fraction, 0.02))
                out.append(("input_shift", name, "distinct_fraction", ids.distinct / ids.count, 0.02))
        q = interval.outputs
        if q is not None and q.rows - q.nonfinite >= self.min_count:
            for signal in ("confidence", "margin", "normalized_entropy", "abstention_rate"):
                out.append(("output_shift", "<output>", signal, getattr(q, signal), 0.01))
            if q.classes is not None and q.classes.count:
                mix = self._class_mix(q.classes.counts)
                if mix is not None:
                    out.append(("output_shift", "<output>", "class_mix", mix, 0.01))
        return out

    def warmup_state(self) -> tuple[int, int, int]:
        series, learning, left = super().warmup_state()
        if self._class_warm:  # the class mix collects its warm-up before its series exists
            return series + 1, learning + 1, max(left, self.warmup - len(self._class_warm))
        return series, learning, left

    def _class_mix(self, counts: np.ndarray) -> float | None:
        """Total-variation distance to the warm-up class mix; during warm-up, collects the mix."""
        p = counts / counts.sum()
        if self._class_base is not None:
            return 0.5 * float(np.abs(p - self._class_base).sum()) if len(p) == len(self._class_base) else None
        self._class_warm.append(counts.astype(np.float64))
        if len(self._class_warm) == self.warmup:
            total = np.sum(self._class_warm, axis=0)
            series = self._series_for(("<output>", "class_mix"))  # None past max_series: not charted
            for h in self._class_warm if series is not None else ():
                rest = total - h  # leave-one-out distances: the in-control spread of the signal
                distance = 0.5 * float(np.abs(h / h.sum() - rest / rest.sum()).sum())
                series.step(distance, self.warmup, 0.01, self.k, 0, self.inflate)
            self._class_base = total / total.sum()
            self._class_warm = []
        return None

    def evaluate(self, interval: Interval) -> list[Alert]:
        out = []
        threshold = self.threshold
        for rule, position, signal, value, min_sigma in self._signals(interval):
            series = self._series_for((position, signal))
            if series is None:
                continue
            step = series.step(value, self.warmup, min_sigma, self.k, threshold, self.inflate)
            if step is not None:
                z, direction = step
                what = "input" if rule == "input_shift" else "output"
                out.append((z, interval.alert(
                    rule, position, signal, value, series.mu,
                    f"{signal} of {what} {position!r} left its baseline: {value:.4g} now, {series.mu:.4g} expected "
                    f"({z:+.1f} sd, {direction})",
                )))  # fmt: skip
        return _one_per_channel_group(out)

    def baseline(self, position: str, signal: str) -> tuple[float, float] | None:
        """``(expected value, spread)`` of a signal's series; None in warm-up."""
        series = self._series.get((position, signal))
        if series is None or math.isnan(series.mu):
            return None
        return series.mu, series.sigma


def _one_per_channel_group(found: list[tuple[float, Alert]]) -> list[Alert]:
    """One alert per input for its channel means (a unit change in one feature moves the input's
    std and so every channel's standardised mean): the channel that moved most, naming the others."""
    out: list[Alert] = []
    groups: dict[str, list[tuple[float, Alert]]] = {}
    for z, alert in found:
        if alert.stat.startswith("channel_mean["):
            groups.setdefault(alert.module, []).append((z, alert))
        else:
            out.append(alert)
    for items in groups.values():
        items.sort(key=lambda item: -abs(item[0]))
        worst = items[0][1]
        if len(items) > 1:
            others = ", ".join(a.stat.removeprefix("channel_mean") for _, a in items[1:6])
            more = f" and {len(items) - 6} more" if len(items) > 6 else ""
            worst = dataclasses.replace(worst, message=f"{worst.message}; channels {others}{more} moved too")
        out.append(worst)
    return out
