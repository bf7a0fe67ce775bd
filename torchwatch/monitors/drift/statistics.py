"""The statistics of a drift reference: p-values against the calibration null, the fitted
summary of one module (:class:`ModuleReference`), and the per-window statistics it computes."""

from __future__ import annotations

import math

import numpy as np
import torch

from ...errors import ConfigError
from . import guarantee, mewma


class ModuleReference:
    """The fixed-size summary of one module's reference embeddings (see the module docstring)."""

    ARRAYS = ("mean", "basis", "scale", "omega", "phase", "rff_ref", "resid_floor", "null_mean_shift", "null_mmd",
              "null_novelty", "null_min_p", "center_z", "white_z", "center_phi", "white_phi", "center_spread",
              "white_spread", "pooled", "holdout_level", "guard")  # fmt: skip
    # what the accumulating detectors read: a file without them is from an older torchwatch
    DETECTOR_ARRAYS = ARRAYS[ARRAYS.index("center_z") : ARRAYS.index("guard")]
    # arrays a file from an older torchwatch may lack, and what stands in for them
    OPTIONAL = ("guard",)

    def __init__(self, name: str, arrays: dict[str, np.ndarray], resid_mean: float, resid_std: float) -> None:
        self.name = name
        for key in self.ARRAYS:
            setattr(self, key, np.asarray(arrays[key], dtype=np.float64))
        self.resid_mean = float(resid_mean)
        self.resid_std = float(resid_std)

    @property
    def dim(self) -> int:
        return self.basis.shape[0]

    @property
    def components(self) -> int:
        return self.basis.shape[1]

    @property
    def features(self) -> int:
        return self.omega.shape[1]

    @property
    def detector_dims(self) -> tuple[int, int, int]:
        """Dimensions of the accumulating detectors: PCA mean, random-feature mean, spread."""
        return (self.components, self.features, self.components)

    def detector_columns(self) -> tuple[slice, slice, slice]:
        """Where each accumulating detector reads a :meth:`sample_features` row (or a window's sum
        of them): the PCA coordinates, the random features, their absolute PCA coordinates."""
        return detector_columns(self.components, self.features)

    def unguarded(self) -> np.ndarray:
        """The ``guard`` of a detector calibrated on average only: ``c = 1``, ``ν = d``."""
        return np.array([[1.0, float(d)] for d in self.detector_dims])

    def detector_threshold(self, j: int, arl: float, lam: float) -> float:
        """The threshold of accumulating detector ``j`` for ``arl`` windows between its false
        alarms: the ideal detector's in ``ν`` dimensions scaled by ``c`` (see :mod:`.guarantee`)."""
        c, nu = self.guard[j]
        return float(c) * mewma.threshold_for(arl, float(nu), lam)

    def sample_features(self, x: np.ndarray) -> np.ndarray:
        """Per-sample ``[r, z..., φ..., |z|...]`` rows for embeddings ``x`` (n, d), as the hook computes them."""
        return sample_features(x, self.mean, self.basis, self.scale, self.omega, self.phase, self.resid_floor[0])

    def window_statistics(self, n: np.ndarray, sums: np.ndarray) -> np.ndarray:
        """(windows, 3) statistics from window sizes ``n`` and sums of :meth:`sample_features` rows."""
        return window_statistics(n, sums, self.components, self.rff_ref, self.resid_mean, self.resid_std)

    def standardised_means(self, n: float, sums: np.ndarray, lam: float) -> tuple[np.ndarray, ...]:
        """A window's whitened PCA mean, random-feature mean and mean absolute PCA coordinates
        (the spread along each direction) as ``N(0, I)`` vectors when nothing drifted, for the
        accumulating detectors (:mod:`.mewma`). ``sums``: the window's sums of
        :meth:`sample_features` rows.

        ``sqrt(n)·W(mean - centre)``, ``W`` the inverse square root of the (Ledoit-Wolf) per-sample
        covariance, ``centre`` the mean of the ``pooled`` calibration samples (which samples
        give which covariance: see ``fit_module``);
        divided by ``sqrt(1 + κ)``, ``κ = (n / pooled)(2 - λ)/λ``: the centre's own
        estimation error is a constant offset that the detector's averaging would otherwise
        count as drift (its variance, ``n / pooled`` per window, relative to the detector's
        steady-state variance ``λ/(2 - λ)``).
        """
        n = max(float(n), 1.0)
        fitted = ((self.center_z, self.white_z), (self.center_phi, self.white_phi),
                  (self.center_spread, self.white_spread))  # fmt: skip
        # einsum, not ``@``: a matrix-vector product goes to the BLAS, whose threads fight the
        # model's torch threads for the cores; on 2 cores that made one window in ten take ~3 ms
        # instead of ~0.3 ms (benchmarks/drift_text.py, cost). einsum's own loop uses one thread.
        return tuple(
            np.einsum(
                "ij,j->i",
                white,
                math.sqrt(n / (1.0 + n / pooled * (2.0 - lam) / lam)) * (sums[columns] / n - centre),
            )
            for columns, (centre, white), pooled in zip(
                self.detector_columns(), fitted, self.pooled.tolist(), strict=True
            )
        )

    def p_values(self, stats: np.ndarray) -> np.ndarray:
        """(windows, 3) one-sided p-values (large statistics are unusual) against the null."""
        out = np.empty_like(stats)
        for j, null in enumerate((self.null_mean_shift, self.null_mmd, self.null_novelty)):
            out[:, j] = upper_p(null, stats[:, j])
        return out

    def module_p(self, stats: np.ndarray) -> np.ndarray:
        """Calibrated p-value of the smallest of the three p-values, per window."""
        return lower_p(self.null_min_p, self.p_values(stats).min(axis=1))


# Below this many null samples in the tail, p-values come from a fitted tail rather than counts.
TAIL_COUNT = 50


# Float rounding must never read as novelty (embeddings that lie inside the PCA basis have a
# residual energy |c|^2 - |p|^2 made of rounding alone, computed in float32 by the hooks and in
# float64 at fit time). Rounding moves |c|^2 - |p|^2 by at most 2 gamma_d |c|^2 ~ 2 d u |c|^2
# (u = 2^-24); the residual is floored at ROUNDING_MARGIN times that (of the mean |c|^2), so its
# log moves by at most 1/ROUNDING_MARGIN per sample (about that for a window's mean, whose
# |c|^2 averages to the mean), and window means closer than RESIDUAL_RESOLUTION to the
# reference's are not evidence (both at fit and online). RESIDUAL_SPREAD floors the spread the
# novelty statistic divides by.
ROUNDING_MARGIN = 64


RESIDUAL_RESOLUTION = 2.0 / ROUNDING_MARGIN


RESIDUAL_SPREAD = 0.05


def upper_p(sorted_null: np.ndarray, values: np.ndarray) -> np.ndarray:
    """P(null >= value): counted in the bulk (with the +1 correction that keeps it a valid
    p-value), and from a Pearson III fit (mean, variance, skewness of the null) beyond the
    ``TAIL_COUNT`` largest null values, joined continuously, so that p-values keep shrinking
    past what a finite null sample can count."""
    b = sorted_null.size
    above = b - np.searchsorted(sorted_null, values, side="left")
    p = (1.0 + above) / (1.0 + b)
    tail = above < TAIL_COUNT
    if tail.any():
        edge = sorted_null[b - TAIL_COUNT]
        ratio = pearson3_sf(sorted_null, values[tail]) / max(pearson3_sf(sorted_null, np.array([edge]))[0], 1e-300)
        p[tail] = np.minimum(p[tail], (1.0 + TAIL_COUNT) / (1.0 + b) * np.minimum(ratio, 1.0))
    return p


def pearson3_sf(sample: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Survival function of the shifted gamma (or normal) with the sample's first three moments."""
    mu, sd = sample.mean(), sample.std()
    if sd == 0:
        return np.where(t > mu, 0.0, 1.0)
    skew = float(((sample - mu) ** 3).mean() / sd**3)
    t64 = torch.as_tensor(np.asarray(t, dtype=np.float64))
    if skew < 0.05:  # (near-)symmetric or left-skewed: a normal upper tail
        return torch.special.ndtr(-(t64 - mu) / sd).numpy()
    shape = 4.0 / skew**2
    scale = sd * skew / 2.0
    x = ((t64 - (mu - shape * scale)) / scale).clamp(min=0.0)
    return torch.special.gammaincc(torch.full_like(x, shape), x).numpy()


def lower_p(sorted_null: np.ndarray, values: np.ndarray) -> np.ndarray:
    """P(null <= value) for minima of p-values: counted in the bulk, linear below the
    ``TAIL_COUNT``-th smallest null value (the minimum of m uniforms has P(min <= x) ≈ m_eff·x
    for small x, with m_eff read off the null)."""
    b = sorted_null.size
    below = np.searchsorted(sorted_null, values, side="right")
    p = (1.0 + below) / (1.0 + b)
    edge = sorted_null[min(TAIL_COUNT, b) - 1]
    tail = values < edge
    if tail.any() and edge > 0:
        slope = (TAIL_COUNT / b) / edge  # m_eff
        p[tail] = np.minimum(p[tail], np.maximum(slope * values[tail], values[tail]))
    return p


class Reservoir:
    """A uniform sample of at most ``size`` rows from a stream (Vitter's algorithm R, by chunk)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seen = 0
        self.buf: np.ndarray | None = None
        self.rng = np.random.default_rng(seed)

    def add(self, rows: np.ndarray) -> None:
        if rows.ndim != 2:
            raise ConfigError(f"Reference.fit: reduce must give (batch, features), got shape {rows.shape}")
        if self.buf is None:
            self.buf = np.empty((self.size, rows.shape[1]))
        elif rows.shape[1] != self.buf.shape[1]:
            raise ConfigError(f"Reference.fit: embedding width changed from {self.buf.shape[1]} to {rows.shape[1]}")
        room = max(0, min(self.size - self.seen, rows.shape[0]))
        self.buf[self.seen : self.seen + room] = rows[:room]
        rest = rows[room:]
        if rest.shape[0]:
            t = self.seen + room + np.arange(rest.shape[0])  # stream index of each remaining row
            j = (self.rng.random(rest.shape[0]) * (t + 1)).astype(np.int64)  # uniform on [0, t]
            keep = j < self.size
            self.buf[j[keep]] = rest[keep]  # in stream order: a later row wins, as in the sequential algorithm
        self.seen += rows.shape[0]

    def rows(self) -> np.ndarray | None:
        return None if self.buf is None else self.buf[: min(self.seen, self.size)]


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Sample covariance of centred ``x`` and the Ledoit-Wolf shrinkage intensity toward a scaled identity."""
    n, d = x.shape
    s = x.T @ x / n
    m = np.trace(s) / d
    d2 = ((s - m * np.eye(d)) ** 2).sum()
    sq = (x * x).sum(1)
    b2 = (sq**2 - 2 * ((x @ s) * x).sum(1) + (s**2).sum()).sum() / n**2
    return s, float(min(b2, d2) / d2) if d2 > 0 else 1.0


def inverse_sqrt(x: np.ndarray) -> np.ndarray:
    """``S^(-1/2)`` of the Ledoit-Wolf-shrunk covariance of the rows of ``x`` (well conditioned
    even with fewer rows than columns)."""
    centred = x - x.mean(0)
    cov, alpha = ledoit_wolf(centred)
    d = cov.shape[0]
    shrunk = (1 - alpha) * cov + alpha * np.trace(cov) / d * np.eye(d)
    evals, evecs = np.linalg.eigh(shrunk)
    evals = np.maximum(evals, 1e-9 * max(float(evals.max()), 1e-300))
    return (evecs / np.sqrt(evals)) @ evecs.T


def has_residual(basis: np.ndarray | torch.Tensor) -> bool:
    """Whether a (dim, components) basis leaves a space outside it: with components == dim the
    residual energy is rounding noise, and the novelty statistic is not computed (it is 0)."""
    return basis.shape[1] < basis.shape[0]


def sample_features(
    x: np.ndarray, mean: np.ndarray, basis: np.ndarray, scale: np.ndarray, omega: np.ndarray, phase: np.ndarray,
    floor: float,
) -> np.ndarray:  # fmt: skip
    c = x - mean
    p = c @ basis
    z = p * scale
    phi = math.sqrt(2.0 / omega.shape[1]) * np.cos(z @ omega + phase)
    # log of the energy outside the PCA basis: a few outlying samples do not dominate a window's mean
    outside = np.maximum((c * c).sum(1) - (p * p).sum(1), 0.0)
    r = np.log(outside + floor) if has_residual(basis) else np.zeros(len(x))
    # the spread as |z|, not z²: real embeddings are heavy-tailed, and the window means of z² were
    # far from Gaussian (on sentence embeddings a window's 99.9% quantile was twice the chi-square
    # one), so the spread detector false-alarmed five times as often as its share; |z| moves as
    # much with a change of spread (E|z| = σ·sqrt(2/π)) with tails no heavier than z's
    return np.concatenate([r[:, None], z, phi, np.abs(z)], axis=1)


def window_statistics(
    n: np.ndarray, sums: np.ndarray, k: int, rff_ref: np.ndarray, resid_mean: float, resid_std: float
) -> np.ndarray:
    n = np.maximum(np.asarray(n, dtype=np.float64), 1.0)
    r_bar = sums[:, 0] / n
    z_bar = sums[:, 1 : 1 + k] / n[:, None]
    phi_bar = sums[:, 1 + k : 1 + k + rff_ref.size] / n[:, None]
    mean_shift = n * (z_bar**2).sum(1)
    mmd = n * ((phi_bar - rff_ref) ** 2).sum(1)
    moved = r_bar - resid_mean
    moved = np.sign(moved) * np.maximum(np.abs(moved) - RESIDUAL_RESOLUTION, 0.0)  # rounding is not evidence
    novelty = np.sqrt(n) * moved / max(resid_std, 1e-300)
    return np.stack([mean_shift, mmd, novelty], axis=1)


def fit_module(
    name: str, emb: np.ndarray, parts: tuple[np.ndarray, ...], boot_cal: np.ndarray, boot_hold: np.ndarray,
    components: int, features: int, rng: np.random.Generator, lam: float, guard_level: float | None,
    guard_rng: np.random.Generator,
) -> tuple[ModuleReference, np.ndarray, np.ndarray]:  # fmt: skip
    """One module's summary, and the module-level p-values of the calibration and holdout windows.

    ``guard_level``: the probability each accumulating detector's threshold is guarded at
    (:mod:`.guarantee`), or None for thresholds calibrated on average over references.
    """
    fit, cal, hold = (emb[p] for p in parts)
    mean = fit.mean(0)
    cov, alpha = ledoit_wolf(fit - mean)
    evals, evecs = np.linalg.eigh(cov)
    k = min(components, emb.shape[1], fit.shape[0] - 1)
    top = np.argsort(evals)[::-1][:k]
    shrunk = (1 - alpha) * evals[top] + alpha * np.trace(cov) / emb.shape[1]
    basis = evecs[:, top]
    scale = 1.0 / np.sqrt(np.maximum(shrunk, 1e-12 * max(shrunk.max(), 1e-300)))
    z_fit = ((fit - mean) @ basis) * scale
    sub = z_fit[rng.choice(len(z_fit), min(len(z_fit), 500), replace=False)]
    dists = np.sqrt(((sub[:, None, :] - sub[None, :, :]) ** 2).sum(-1))
    bandwidth = float(np.median(dists[np.triu_indices(len(sub), 1)])) or 1.0  # the median heuristic
    omega = rng.normal(0.0, 1.0 / bandwidth, size=(k, features))
    phase = rng.uniform(0, 2 * np.pi, size=features)
    centred = fit - mean
    energy = float((centred**2).sum(1).mean())
    outside = (centred**2).sum(1) - ((centred @ basis) ** 2).sum(1)
    # keeps the log finite for samples inside the basis, and rounding far below it (ROUNDING_MARGIN)
    floor = max(0.01 * float(outside.mean()), ROUNDING_MARGIN * 2 * emb.shape[1] * 2.0**-24 * energy, 1e-30)
    rows_fit = sample_features(fit, mean, basis, scale, omega, phase, floor)
    rff_ref = rows_fit[:, 1 + k : 1 + k + features].mean(0)
    resid_mean = float(rows_fit[:, 0].mean())
    resid_std = max(float(rows_fit[:, 0].std()), RESIDUAL_SPREAD) if has_residual(basis) else 1.0

    def stats(x: np.ndarray, boot: np.ndarray) -> np.ndarray:
        rows = sample_features(x, mean, basis, scale, omega, phase, floor)
        return window_statistics(
            np.full(len(boot), boot.shape[1]), window_sums(rows, boot), k, rff_ref, resid_mean, resid_std
        )

    cal_stats, hold_stats = stats(cal, boot_cal), stats(hold, boot_hold)
    nulls = {key: np.sort(cal_stats[:, j]) for j, key in enumerate(("null_mean_shift", "null_mmd", "null_novelty"))}
    # Centres from the calibration samples, whitenings (but the PCA mean's) from the fit and
    # calibration samples. The fit samples chose the basis, so their coordinates run large along
    # its top directions, and a centre on them carries that bias as a persistent offset, which
    # ~2/λ windows of averaging read as drift and no resampling of the reference can size (it is
    # the same in every resample); the calibration samples are exchangeable with fresh ones, so
    # their centre's error is what the guarantee's bootstrap measures (:mod:`.guarantee`). The
    # whitenings want every sample they can get (the 128 random features whitened from 1,500
    # calibration samples alone had fresh-data variances of 0.5-1.9 on real embeddings; see
    # benchmarks/drift_text.py); the bias moves a covariance far less than a centre. The PCA
    # mean's covariance stays on the calibration samples alone: the fit samples' whitened
    # coordinates have variance 1 by construction, which fresh ones do not.
    rows_cal = sample_features(cal, mean, basis, scale, omega, phase, floor)
    both = np.concatenate([rows_fit, rows_cal])
    z_part, phi_part, q_part = detector_columns(k, features)
    arrays = {"mean": mean, "basis": basis, "scale": scale, "omega": omega, "phase": phase, "rff_ref": rff_ref,
              "resid_floor": np.array([floor]),
              **nulls, "null_min_p": np.zeros(1),
              "center_z": rows_cal[:, z_part].mean(0), "white_z": inverse_sqrt(rows_cal[:, z_part]),
              "center_phi": rows_cal[:, phi_part].mean(0), "white_phi": inverse_sqrt(both[:, phi_part]),
              "center_spread": rows_cal[:, q_part].mean(0), "white_spread": inverse_sqrt(both[:, q_part]),
              "pooled": np.full(3, float(len(rows_cal))),
              "holdout_level": np.zeros(3), "guard": np.zeros((3, 2))}  # fmt: skip
    ref = ModuleReference(name, arrays, resid_mean, resid_std)
    ref.guard = ref.unguarded()
    if guard_level is not None:
        ref.guard = _guards(ref, both, len(rows_fit), boot_cal.shape[1], lam, guard_level, guard_rng)
    ref.null_min_p = np.sort(ref.p_values(cal_stats).min(axis=1))
    rows_hold = window_sums(sample_features(hold, mean, basis, scale, omega, phase, floor), boot_hold)
    ref.holdout_level = steady_levels(ref, boot_hold.shape[1], rows_hold, lam)
    return ref, ref.module_p(cal_stats), ref.module_p(hold_stats)


def _guards(
    ref: ModuleReference, both: np.ndarray, n_fit: int, window: int, lam: float, level: float,
    rng: np.random.Generator,
) -> np.ndarray:  # fmt: skip
    """Each accumulating detector's ``(c, ν)`` (:func:`.guarantee.mewma_guard`), refitting its
    centre and whitening from the same rows the fit used for them."""
    out = np.empty((3, 2))
    for j, columns in enumerate(ref.detector_columns()):
        rows = both[:, columns]
        if j == 0:  # the PCA mean is whitened by the calibration rows alone (see fit_module)

            def whitening(pick: np.ndarray, rows: np.ndarray = rows) -> np.ndarray:
                return inverse_sqrt(rows[pick[pick >= n_fit]])

        else:

            def whitening(pick: np.ndarray, rows: np.ndarray = rows) -> np.ndarray:
                return inverse_sqrt(rows[pick])

        kappa = window / ref.pooled[j] * (2.0 - lam) / lam
        out[j] = guarantee.mewma_guard(rows, n_fit, whitening, window=window, scale=math.sqrt(window / (1.0 + kappa)),
                                       lam=lam, level=level, rng=rng)  # fmt: skip
    return out


def steady_levels(ref: ModuleReference, n: int, window_sums: np.ndarray, lam: float) -> np.ndarray:
    """Each accumulating detector's steady-state statistic on these (held-out) windows, over its
    no-drift mean: 1 when calibrated, above 1 when the windows sit away from the reference (more
    false alarms than the target), below when they run calmer (fewer).

    The steady state of ``e`` fed windows ``v_i`` has mean ``v̄`` and variance ``λ/(2-λ)`` of
    the windows' spread, so ``E[T] = (2-λ)/λ·(|v̄|² - s²/H) + s²`` (``s²`` the windows' mean squared
    deviation from ``v̄``, ``H`` windows; ``s²/H`` is the noise in ``|v̄|²``), over ``d``.
    """
    vs = [ref.standardised_means(n, row, lam) for row in window_sums]
    levels = []
    for j in range(3):
        v = np.array([parts[j] for parts in vs])
        mean = v.mean(0)
        spread = float(((v - mean) ** 2).sum(1).mean())
        bias = max(float(mean @ mean) - spread / len(v), 0.0)
        levels.append(((2 - lam) / lam * bias + spread) / v.shape[1])
    return np.array(levels)


def detector_columns(k: int, m: int) -> tuple[slice, slice, slice]:
    """The accumulating detectors' columns of a ``[r, z (k), φ (m), |z| (k)]`` row."""
    return slice(1, 1 + k), slice(1 + k, 1 + k + m), slice(1 + k + m, 1 + 2 * k + m)


def window_sums(rows: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """(windows, columns) sums of ``rows`` over each row of index ``windows`` (windows, size).

    ``rows[windows].sum(1)`` materialises every window's rows first (gigabytes for the tens of
    thousands of windows a null is made of); an embedding bag sums as it gathers, ~20x faster.
    """
    out = torch.nn.functional.embedding_bag(torch.from_numpy(windows), torch.from_numpy(rows), mode="sum")
    return out.numpy()


def predictive_windows(rng: np.random.Generator, n: int, count: int, window: int) -> np.ndarray:
    """Index windows for the null: each drawn from a bootstrap resample of the ``n`` calibration
    samples, not from the calibration samples themselves (a two-stage bootstrap).

    Live data comes from the population, which the calibration set only estimates; the second
    stage adds that estimation error (about 1/n of a sample's variance to a window mean) so the
    null does not assume the population *is* the calibration set. Drawn without materialising
    the resamples: window positions that pick the same resample slot share one draw.
    """
    slots = rng.integers(0, n, size=(count, window))
    draws = rng.integers(0, n, size=(count, window))
    first = (slots[:, :, None] == slots[:, None, :]).argmax(axis=2)  # first position holding the same slot
    return np.take_along_axis(draws, first, axis=1)
