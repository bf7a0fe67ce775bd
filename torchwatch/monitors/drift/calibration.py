"""Whether a reference's false-alarm rate holds: :class:`CalibrationReport` from held-out windows."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class CalibrationReport:
    """How well the detector's false-alarm rate matches its target, on held-out reference data.

    Read :attr:`verdict` (or print the report): ``"on target"``, ``"too many false alarms"``,
    ``"fewer false alarms than the target"`` (conservative: slower detection) or
    ``"unknown"`` (too few held-out windows to tell; :attr:`windows_needed` says how many would).

    Attributes:
        target_arl: windows between false alarms the threshold was set for.
        expected_arl: the ARL the detector has when fed the held-out windows' p-values (computed
            exactly for their empirical distribution; ``inf`` when beyond 1e12 windows or never).
        expected_arl_interval: a 90% bootstrap interval for ``expected_arl`` (the held-out
            windows are few, so the estimate is rough: the target should lie inside).
        false_alarms_per_window: ``1 / expected_arl``.
        uniformity_p_value: Kolmogorov-Smirnov p-value of the held-out p-values against uniform.
        run_lengths: quantiles (10%, 50%, 90%) and mean of simulated run lengths at a short
            target (``simulated_arl``) drawn from the held-out p-values; streams that never
            alarmed count at the simulation's length (see ``censored``).
        simulated_arl: the short target used for ``run_lengths``.
        holdout_windows: how many held-out windows the figures rest on.
        verdict: the reading of all of the above (see the class docstring).
        windows_needed: held-out windows that would settle an ``"unknown"`` verdict (0 otherwise).
        samples_needed: reference samples in all (same splits) that would give that many (0 otherwise).
        accumulating: per module, each accumulating detector's steady-state level on the held-out
            windows over its no-drift mean (PCA mean, random-feature mean, spread): 1 is on target,
            above 1 means false alarms sooner than the target (a rough figure from few windows).
        censored: the fraction of simulated streams that never alarmed.
        window: samples per window (to turn windows into samples).
        guarantee: the probability, over the draw of the reference samples, with which the
            thresholds keep false alarms at or below the target (0: calibrated on average over
            reference draws only; see ``Reference.fit(guarantee=...)``).
        allowance: per module, the steady level (as in ``accumulating``) each accumulating
            detector's guarded threshold allows for at the target: the level this reference's
            bootstrap puts at the guaranteed quantile (1 when unguarded).
    """

    target_arl: float
    expected_arl: float
    expected_arl_interval: tuple[float, float]
    false_alarms_per_window: float
    uniformity_p_value: float
    run_lengths: dict[str, float]
    simulated_arl: float
    holdout_windows: int
    verdict: str = "unknown"
    windows_needed: int = 0
    samples_needed: int = 0
    accumulating: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    censored: float = 0.0
    window: int = 0
    guarantee: float = 0.0
    allowance: dict[str, tuple[float, float, float]] = field(default_factory=dict)

    def summary(self) -> str:
        """A few lines a person can act on."""

        def arl(x: float) -> str:
            return "never (beyond 1e12)" if math.isinf(x) else f"{x:,.0f}"

        lo, hi = self.expected_arl_interval
        lines = [
            f"drift calibration: {self.verdict.upper()} (target: one false alarm per {self.target_arl:,.0f} windows)",
            f"  held-out windows: {self.holdout_windows} ({self.holdout_windows * self.window:,} samples); their "
            f"p-values vs uniform: KS p = {self.uniformity_p_value:.2g}",
            f"  expected windows between false alarms on them: {arl(self.expected_arl)} "
            f"(90% interval {arl(lo)} to {arl(hi)})",
        ]
        if self.guarantee > 0:
            lines.append(
                f"  guarantee: with probability {self.guarantee:.0%} over the draw of the reference samples, "
                "false alarms no more often than the target (thresholds from a bootstrap of the reference)"
            )
        else:
            lines.append(
                "  guarantee: none (thresholds calibrated on average over reference draws; one reference may "
                "false-alarm several times as often): fit with guarantee=0.9"
            )
        runs = self.run_lengths
        if self.censored >= 1.0:
            lines.append(f"  at a short target of {self.simulated_arl:,.0f}: no simulated stream alarmed within "
                         f"{runs['p50']:,.0f} windows (held-out p-values run large)")  # fmt: skip
        else:
            lines.append(
                f"  at a short target of {self.simulated_arl:,.0f}: run lengths p10 {runs['p10']:,.0f}, median "
                f"{runs['p50']:,.0f}, mean {runs['mean']:,.0f} ({self.censored:.0%} never alarmed)"
            )
        for name, levels in self.accumulating.items():
            allowed = self.allowance.get(name, (1.0, 1.0, 1.0))
            over = max(level / allow for level, allow in zip(levels, allowed, strict=True))
            flag = "  <- 1.5 times what the thresholds allow: false alarms sooner than the target" if over > 1.5 else ""
            lines.append(
                f"  accumulating detectors of {name!r} on the held-out windows (1 = no-drift mean; thresholds allow "
                f"{allowed[0]:.2f} / {allowed[1]:.2f} / {allowed[2]:.2f}): PCA mean {levels[0]:.2f}, random features "
                f"{levels[1]:.2f}, spread {levels[2]:.2f}{flag}"
            )
        if self.verdict == "unknown":
            lines.append(
                f"  fix: {self.holdout_windows} held-out windows cannot pin an ARL of {self.target_arl:,.0f}; fit "
                f"the reference on enough data for about {self.windows_needed:,} held-out windows "
                f"({self.windows_needed * self.window:,} held-out samples; about {self.samples_needed:,} reference "
                "samples in all with the same splits)"
            )
        elif self.verdict == "too many false alarms":
            lines.append(
                "  fix: the held-out reference windows already look unlike the reference: fit it on more, and more "
                "varied, data from the same source; or raise the target ARL"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def simulate_runs(
    p_values: np.ndarray, h: float, delta: float, rng: np.random.Generator, *, streams: int, cap: int
) -> np.ndarray:
    """Run lengths of ``streams`` CUSUMs fed i.i.d. draws from ``p_values`` (censored at ``cap``)."""
    inc = -np.log(np.clip(p_values, 1e-300, 1.0)) - delta
    s = np.zeros(streams)
    runs = np.full(streams, cap, dtype=np.float64)
    alive = np.ones(streams, dtype=bool)
    for t in range(1, cap + 1):
        s = np.maximum(0.0, s + inc[rng.integers(0, inc.size, streams)])
        hit = alive & (s >= h)
        runs[hit] = t
        alive &= ~hit
        if not alive.any():
            break
    return runs


# Held-out windows that pin the lower tail of the p-values well enough for an ARL verdict: alarm
# paths are made of p-values around 0.1 (-log p ~ 2.4 under the tilted walk), so about 100 of them
# below 0.1 are wanted; with p-values uniform that is 1,000 windows.
WINDOWS_FOR_A_VERDICT = 1000


def verdict(target: float, lo: float, hi: float, uniformity: float, p: np.ndarray) -> tuple[str, int]:
    """(verdict, held-out windows needed) from the bootstrap interval of the ARL and uniformity."""
    # Too many is shown even by few windows: small p-values that should be rare are there. The
    # rest needs the lower tail pinned: a bootstrap of a few windows cannot make the small
    # p-values they lack, so it would call any small sample conservative.
    if (uniformity < 0.01 and float(np.mean(p)) < 0.5) or hi < target / 3:
        return "too many false alarms", 0
    if p.size < WINDOWS_FOR_A_VERDICT:
        return "unknown", WINDOWS_FOR_A_VERDICT
    if uniformity < 0.01 or lo > 3 * target:
        return "fewer false alarms than the target", 0
    if lo >= target / 3 and hi <= 3 * target:
        return "on target", 0
    if math.isinf(hi) or lo < 1:
        return "unknown", 4 * p.size
    # the interval's width in log space shrinks about as 1/sqrt(windows): scale to a factor of 3 each side
    return "unknown", math.ceil(p.size * (math.log(hi / lo) / math.log(9.0)) ** 2)


def ks_uniform(p: np.ndarray) -> float:
    """Two-sided Kolmogorov-Smirnov p-value of ``p`` against Uniform(0, 1) (asymptotic)."""
    x = np.sort(p)
    n = x.size
    i = np.arange(1, n + 1)
    stat = max((i / n - x).max(), (x - (i - 1) / n).max())
    lam = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * stat
    return float(min(1.0, max(0.0, 2 * sum((-1) ** (j - 1) * math.exp(-2 * j * j * lam * lam) for j in range(1, 101)))))
