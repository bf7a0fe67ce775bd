"""False-alarm rates that hold for the reference a user has, not only on average over references.

A reference is a sample, so everything fitted from it is off by sampling error, and a detector
calibrated *on average* over reference draws can, for one unlucky draw, false-alarm several times
as often as its target (measured: no-drift run lengths of 100-498 windows for a target of 200 over
five 5,000-sample references of real sentence embeddings, 50-1,898 over five of 500).

Following Gandy & Kvaløy ("Guaranteed conditional performance of control charts via bootstrap
methods", Scand. J. Statist. 40, 2013), each threshold is raised so that the detector's run
length reaches its target with a stated probability over the draw of the reference: resample the
reference, refit what the detector estimates, read what threshold each refit would need against
the reference (which plays the population), and take that threshold's upper quantile.

* **Accumulating detectors** (:mod:`.mewma`) estimate a centre and a whitening. Against the
  population, a fitted detector's standardised window means are ``N(b, Σ)`` with ``b`` the
  centre's error and ``Σ`` the whitening's; its steady statistic ``T = |g + b'|²`` (``g ~ N(0, Σ)``,
  ``b' = sqrt((2-λ)/λ)·b``) is matched by moments to ``c·χ²_ν`` (Patnaik, 1949), so the
  detector behaves like an ideal one in ``ν`` dimensions whose threshold is scaled by ``c``. Each
  bootstrap refit gives a ``(c, ν)``; the threshold it needs is ranked through the chi-square
  quantile (Wilson-Hilferty) and the guard keeps the upper quantile as one ``(c, ν)``.
* **The per-window CUSUM** reads p-values from a null built on the calibration samples. Windows of
  a resample of those samples, scored against that null, give the p-values a refit null would
  see; the CUSUM's ARL on each resample's p-values is computed exactly, and the threshold is
  raised until their lower quantile reaches the target (a factor on the threshold, kept for any
  ARL given at attach).

The stated probability (``Reference.fit(guarantee=...)``, default 0.9) is split evenly over the
detectors (Bonferroni): with probability at least that, every detector keeps to its share of the
false-alarm budget, so the whole keeps to the target. It assumes what the reference assumes:
live clean traffic drawn from the same population as the reference samples. Not guarded: the
test of the window being filled (it keeps its p-value bound of one per share; it reads the same
null as the CUSUM and is counted in the split), and the guards are computed at the fit's ARL and
carried to another one given at attach (a factor on the CUSUM's threshold, ``(c, ν)`` on the
accumulating ones), which the approximations above make close but not exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from . import sequential

DEFAULT = 0.9
# Bootstrap refits of the accumulating detectors: the guard is a far quantile, read from the
# refits' mean, spread and skewness (Cornish-Fisher), which 100 pin well enough; each refit of a
# 128-feature whitening on 4,000 samples takes ~10 ms.
REFITS = 100
# The upper-tail z-score at which refits are ranked through the chi-square quantile: the
# thresholds of the default budgets sit 3-5 standard deviations out; the ranking barely moves
# with it (refits differ in dimension by a few percent).
RANK_Z = 4.0
# Resamples of the calibration samples for the CUSUM's guard, and windows scored per resample.
NULL_REFITS = 30
NULL_WINDOWS = 4000


def per_detector(guarantee: float, detectors: int) -> float:
    """The probability each of ``detectors`` must be guarded at for all of them to hold with
    probability ``guarantee`` (Bonferroni): ``1 - (1 - guarantee)/detectors``."""
    return 1.0 - (1.0 - guarantee) / max(detectors, 1)


def upper_quantile(values: np.ndarray, level: float) -> float:
    """The ``level`` quantile of the distribution ``values`` sample, by Cornish-Fisher from their
    mean, spread and skewness (a far quantile from ~100 draws, where counting would rest on one)."""
    mu, sd = float(values.mean()), float(values.std())
    if sd == 0:
        return mu
    skew = float(((values - mu) ** 3).mean() / sd**3)
    z = float(torch.special.ndtri(torch.tensor(level, dtype=torch.float64)))
    return mu + sd * (z + (z * z - 1.0) * skew / 6.0)


def chi2_quantile(nu: np.ndarray, z: float = RANK_Z) -> np.ndarray:
    """Wilson-Hilferty's approximation of the chi-square quantile ``z`` standard deviations out."""
    nu = np.asarray(nu, dtype=np.float64)
    return nu * (1.0 - 2.0 / (9.0 * nu) + z * np.sqrt(2.0 / (9.0 * nu))) ** 3


def patnaik(mean: np.ndarray, var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(c, ν)`` of the scaled chi-square ``c·χ²_ν`` with this mean and variance."""
    c = var / (2.0 * mean)
    return c, mean / c


def mewma_guard(
    rows: np.ndarray, fresh_from: int, whitening: Callable[[np.ndarray], np.ndarray], *,
    window: int, scale: float, lam: float, level: float, rng: np.random.Generator, refits: int = REFITS,
) -> tuple[float, float]:  # fmt: skip
    """``(c, ν)`` such that ``c`` times the ideal threshold in ``ν`` dimensions keeps one
    accumulating detector to its false-alarm share with probability ``level`` over the reference.

    Args:
        rows: (samples, d) the fit samples' rows, then (from ``fresh_from`` on) the calibration
            samples'. The calibration rows give the detector's centre and stand in for the
            population: the fit did not otherwise use them, so they are exchangeable with fresh
            samples' (the fit samples' are not: they chose the PCA basis, and their coordinates
            run large along the directions they chose).
        whitening: maps row indices (a resample: fit and calibration rows drawn separately) to the
            whitening refit from them as the fit does it (from all of them, or the calibration
            part).
        window: samples per window (``n``).
        scale: ``sqrt(n / (1 + κ))``: what a window's mean difference is multiplied by.
        lam: the detector's λ.
        level: the probability the guard holds with.
    """
    n_rows, d = rows.shape
    fresh = rows[fresh_from:]
    truth_mean = fresh.mean(0)
    truth_cov = np.cov(fresh, rowvar=False, bias=True).reshape(d, d)
    per_window = scale * scale / window  # a window mean's covariance is Σ/n; Σ_v = scale² W Σ W / n
    amplify = (2.0 - lam) / lam
    cs, nus = np.empty(refits), np.empty(refits)
    for i in range(refits):
        cal = rng.integers(fresh_from, n_rows, n_rows - fresh_from)
        pick = np.concatenate((rng.integers(0, fresh_from, fresh_from), cal))
        white = whitening(pick)
        offset = scale * (white @ (truth_mean - rows[cal].mean(0)))
        sigma = white @ truth_cov @ white * per_window
        mean = float(np.trace(sigma)) + amplify * float(offset @ offset)
        var = 2.0 * float((sigma * sigma).sum()) + 4.0 * amplify * float(offset @ sigma @ offset)
        cs[i], nus[i] = patnaik(mean, var)
    need = cs * chi2_quantile(nus)  # the threshold each refit needs, in the ranking's units
    nu = float(np.median(nus))
    c = upper_quantile(need, level) / float(chi2_quantile(np.array([nu]))[0])
    return max(c, 1e-6), max(nu, 1e-3)


def cusum_guard(
    joint_p: Callable[[np.ndarray], np.ndarray], n_cal: int, window: int, *, share: float, delta: float,
    nominal: float, level: float, rng: np.random.Generator, refits: int = NULL_REFITS, windows: int = NULL_WINDOWS,
) -> float:  # fmt: skip
    """How much the CUSUM's threshold is raised (a factor, at least 1) so that the CUSUM keeps to
    its ``share`` with probability ``level`` over the calibration samples.

    ``joint_p`` maps (windows, window) index windows into the calibration samples to the joint
    p-values the live detector would compute for them; ``nominal`` is the threshold for uniform
    p-values at ``share``. Each refit draws windows from a resample of the calibration samples;
    the CUSUM's ARL on each refit's p-values is computed exactly for their empirical distribution
    (the chain of :mod:`.sequential`: alarm paths are made of moderately small p-values, which a
    few thousand windows pin), and the threshold is raised until the ``1 - level`` quantile of the
    refits' log-ARLs (normal: a far quantile from a few dozen refits) reaches ``share``. The log of
    a CUSUM's ARL grows about linearly with its threshold, so the factor carries to other ARLs.
    """
    halves = []  # per refit, two independent sets of windows: their disagreement is the scoring noise
    for _ in range(refits):
        resample = rng.integers(0, n_cal, n_cal)
        p = joint_p(resample[rng.integers(0, n_cal, (windows, window))])
        halves.append((sequential.empirical_cdf(p[::2], delta), sequential.empirical_cdf(p[1::2], delta)))
    z = float(torch.special.ndtri(torch.tensor(level, dtype=torch.float64)))
    top = math.log(sequential.MAX_ARL)

    def guaranteed_arl(h: float) -> float:
        logs = np.array([[min(math.log(max(sequential.arl(h, cdf, cells=200), 1.0)), top) for cdf in pair]
                         for pair in halves])  # fmt: skip
        per_refit = logs.mean(1)
        # the spread over calibration sets: the refits' spread less what scoring a finite number of
        # windows adds (the variance of a mean of two halves is a quarter of their difference's)
        noise = float(((logs[:, 0] - logs[:, 1]) ** 2).mean()) / 4.0
        between = max(float(per_refit.var()) - noise, 0.0)
        return math.exp(float(per_refit.mean()) - z * math.sqrt(between))

    if guaranteed_arl(nominal) >= share:
        return 1.0
    lo, hi = nominal, 2.0 * nominal
    while guaranteed_arl(hi) < share:
        lo, hi = hi, 2.0 * hi
        if hi > 64 * nominal:
            return hi / nominal  # beyond any useful threshold: the calibration set is far too small
    return sequential.solve_threshold(guaranteed_arl, share, lo, hi) / nominal
