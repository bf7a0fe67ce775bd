"""Embedding drift: a reference fitted once, then calibrated online detection in the hooks.

:meth:`Reference.fit` runs the model on reference data and keeps, per monitored module, a
fixed-size summary of its embeddings (one vector per sample: 2-D outputs by row, 3-D outputs
averaged over the sequence axis, or a ``reduce=`` callable):

* the mean and a PCA basis (``components`` directions, Ledoit-Wolf-shrunk variances), so a
  sample ``x`` becomes whitened coordinates ``z``;
* ``features`` random Fourier features of ``z`` (an RBF kernel at the median distance) and
  their reference mean;
* the log residual energy of ``x`` outside the PCA basis (mean and spread; the log keeps a few
  outlying samples from dominating a window).

The samples are split three ways. The *fit* part builds the above. The *calibration* part is
resampled into windows of ``window`` samples to get each statistic's distribution when nothing
drifted — the null against which live windows get p-values — and the joint distribution of the
smallest p-value over statistics and modules, which turns "any statistic of any module" into one
calibrated p-value per window without assuming they are independent. The *holdout* part is
cut into disjoint windows, scored the same way, and their p-values kept for
:meth:`Reference.calibration_check`.

Three statistics per window of ``n`` samples: mean shift ``n·|mean(z)|²`` (Hotelling on the
whitened PCA coordinates), distribution shift ``n·|mean(φ) - φ_ref|²`` (random-feature MMD) and
novelty ``√n·(mean(r) - r_ref)/sd(r)`` (``r`` the log residual energy). Online, the hook only adds per-sample
sums into device-side window accumulators; a CUSUM on the windows' joint p-values, with its
threshold set from the target ARL (expected windows between false alarms), decides.

Everything kept is independent of the number of reference samples.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from . import _sequential, _validate
from ._files import atomic_write, parse_json
from ._schema import Fields
from .errors import ConfigError, FormatError

FORMAT = "torchwatch.reference/1"
STATISTICS = ("mean_shift", "mmd", "novelty")
Reduce = Callable[[Any], torch.Tensor]


@dataclass(frozen=True)
class DriftStatus:
    """A monitored module's drift state.

    Attributes:
        score: the detector's statistic after the last window (shared by all modules of the
            reference: one alarm budget); it alarms at ``threshold``.
        p_value: this module's calibrated p-value for the last window (small: unlike reference).
        alarm: an alarm attributed to this module was raised since the last reset.
        windows: windows evaluated since the last reset.
        threshold: the detector's alarm threshold.
    """

    score: float
    p_value: float
    alarm: bool
    windows: int
    threshold: float

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("score", "p_value", "alarm", "windows", "threshold")}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "drift status") -> DriftStatus:
        """Inverse of :meth:`to_dict` (null numbers read as NaN); FormatError naming a bad field."""
        f = Fields(data, where)
        alarm = data.get("alarm", False)
        if not isinstance(alarm, bool):
            raise FormatError(f"{where}: field 'alarm' must be true or false, got {alarm!r}")
        return cls(f.float("score"), f.float("p_value"), alarm, f.count("windows"), f.float("threshold"))


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
        censored: the fraction of simulated streams that never alarmed.
        window: samples per window (to turn windows into samples).
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
    censored: float = 0.0
    window: int = 0

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
        runs = self.run_lengths
        if self.censored >= 1.0:
            lines.append(f"  at a short target of {self.simulated_arl:,.0f}: no simulated stream alarmed within "
                         f"{runs['p50']:,.0f} windows (held-out p-values run large)")  # fmt: skip
        else:
            lines.append(
                f"  at a short target of {self.simulated_arl:,.0f}: run lengths p10 {runs['p10']:,.0f}, median "
                f"{runs['p50']:,.0f}, mean {runs['mean']:,.0f} ({self.censored:.0%} never alarmed)"
            )
        if self.verdict == "unknown":
            lines.append(
                f"  fix: {self.holdout_windows} held-out windows cannot pin an ARL of {self.target_arl:,.0f}; fit "
                f"the reference on enough data for about {self.windows_needed:,} held-out windows "
                f"({self.windows_needed * self.window:,} held-out samples)"
            )
        elif self.verdict == "too many false alarms":
            lines.append(
                "  fix: the held-out reference windows already look unlike the reference: fit it on more, and more "
                "varied, data from the same source; or raise the target ARL"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def arl_windows(*, days: float, requests_per_second: float, window: int) -> float:
    """Windows between false alarms for "at most one false alarm every ``days``", at a rate of
    ``requests_per_second`` samples reaching the monitored modules.

    Example:
        >>> import torchwatch as tw
        >>> tw.arl_windows(days=7, requests_per_second=50, window=32)
        945000.0
    """
    days = _validate.number("arl_windows()", "days", days, above=0.0)
    rate = _validate.number("arl_windows()", "requests_per_second", requests_per_second, above=0.0)
    window = _validate.integer("arl_windows()", "window", window)
    return days * 86400 * rate / window


def default_reduce(output: Any) -> torch.Tensor:
    """One vector per sample: 2-D as is, 3-D averaged over the sequence axis (dim 1)."""
    t = output if isinstance(output, torch.Tensor) else _first_tensor(output)
    if t is None or not t.is_floating_point():
        raise ConfigError(f"drift needs a floating-point tensor output, got {type(output).__name__}")
    if t.dim() == 2:
        return t
    if t.dim() == 3:
        return t.mean(dim=1)
    raise ConfigError(
        f"drift reduces 2-D (batch, features) or 3-D (batch, sequence, features) outputs, got shape "
        f"{tuple(t.shape)}; pass reduce= to map it to (batch, features)"
    )


def _first_tensor(output: Any) -> torch.Tensor | None:
    from ._outputs import tensors_in

    found = [t for label, t in tensors_in(output) if label == ""]
    return found[0] if found else None


class ModuleReference:
    """The fixed-size summary of one module's reference embeddings (see the module docstring)."""

    ARRAYS = ("mean", "basis", "scale", "omega", "phase", "rff_ref", "resid_floor", "null_mean_shift", "null_mmd",
              "null_novelty", "null_min_p")  # fmt: skip

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

    def sample_features(self, x: np.ndarray) -> np.ndarray:
        """Per-sample ``[r, z..., φ...]`` rows for embeddings ``x`` (n, d), as the hook computes them."""
        return _sample_features(x, self.mean, self.basis, self.scale, self.omega, self.phase, self.resid_floor[0])

    def window_statistics(self, n: np.ndarray, sums: np.ndarray) -> np.ndarray:
        """(windows, 3) statistics from window sizes ``n`` and sums of :meth:`sample_features` rows."""
        return _window_statistics(n, sums, self.components, self.rff_ref, self.resid_mean, self.resid_std)

    def p_values(self, stats: np.ndarray) -> np.ndarray:
        """(windows, 3) one-sided p-values (large statistics are unusual) against the null."""
        out = np.empty_like(stats)
        for j, null in enumerate((self.null_mean_shift, self.null_mmd, self.null_novelty)):
            out[:, j] = _upper_p(null, stats[:, j])
        return out

    def module_p(self, stats: np.ndarray) -> np.ndarray:
        """Calibrated p-value of the smallest of the three p-values, per window."""
        return _lower_p(self.null_min_p, self.p_values(stats).min(axis=1))


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


def _upper_p(sorted_null: np.ndarray, values: np.ndarray) -> np.ndarray:
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
        ratio = _pearson3_sf(sorted_null, values[tail]) / max(_pearson3_sf(sorted_null, np.array([edge]))[0], 1e-300)
        p[tail] = np.minimum(p[tail], (1.0 + TAIL_COUNT) / (1.0 + b) * np.minimum(ratio, 1.0))
    return p


def _pearson3_sf(sample: np.ndarray, t: np.ndarray) -> np.ndarray:
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


def _lower_p(sorted_null: np.ndarray, values: np.ndarray) -> np.ndarray:
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


class Reference:
    """What "no drift" looks like for some modules of a model; fit once, saved, loaded.

    Create it with :meth:`fit` or :meth:`load`; pass it to ``tw.attach(model, drift=ref)``.

    Attributes:
        modules: per module name, its :class:`ModuleReference`.
        window: samples per window.
        arl: default target windows between false alarms (``attach(drift_arl=...)`` overrides).
        delta: the CUSUM's drift allowance.
        reduce_name: ``"default"`` or the name of the custom ``reduce`` used at fit time.
    """

    def __init__(
        self,
        modules: dict[str, ModuleReference],
        *,
        window: int,
        arl: float,
        delta: float,
        joint_null: np.ndarray,
        holdout_p: np.ndarray,
        reduce: Reduce | None = None,
        reduce_name: str = "default",
    ) -> None:
        self.modules = modules
        self.window = window
        self.arl = arl
        self.delta = delta
        self.joint_null = np.asarray(joint_null, dtype=np.float64)
        self.holdout_p = np.asarray(holdout_p, dtype=np.float64)
        self.reduce = reduce or default_reduce
        self.reduce_name = reduce_name

    def joint_p(self, module_ps: np.ndarray) -> np.ndarray:
        """(windows,) calibrated p-values of the smallest module p-value, per window."""
        return _lower_p(self.joint_null, np.asarray(module_ps).min(axis=1))

    def threshold(self, arl: float | None = None) -> float:
        """The CUSUM threshold for ``arl`` windows between false alarms (default: ``self.arl``)."""
        cdf = _sequential.uniform_cdf(self.delta, resolution=self.joint_null.size)
        return _sequential.threshold_for(arl or self.arl, cdf)

    # ---- fitting -----------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        model: nn.Module,
        batches: Iterable[Any],
        modules: Sequence[str],
        *,
        window: int = 32,
        components: int = 32,
        features: int = 128,
        arl: float = 10_000,
        delta: float = _sequential.DEFAULT_DELTA,
        reduce: Reduce | None = None,
        splits: tuple[float, float, float] = (0.5, 0.3, 0.2),
        resamples: int = 10_000,
        max_samples: int = 100_000,
        seed: int = 0,
    ) -> Reference:
        """Run ``model`` on reference data and summarise the embeddings of ``modules``.

        Args:
            model: the model; called as ``model(x)``, ``model(*x)`` or ``model(**x)`` for a tensor,
                a tuple/list or a dict batch.
            batches: reference batches (any iterable; consumed once).
            modules: fully-qualified names of the modules to monitor (e.g. the pooled embedding).
            window: samples per window: the unit of detection.
            components: PCA directions kept (fewer if the data has fewer dimensions).
            features: random Fourier features for the distribution-shift statistic.
            arl: default target windows between false alarms (see :func:`arl_windows`).
            delta: CUSUM allowance; larger reacts to strong shifts faster, smaller to weak ones.
            reduce: maps a module output to (batch, features); default: 2-D as is, 3-D
                averaged over dim 1. Not saved with the reference: pass it again to :meth:`load`.
            splits: fractions of samples for fit / calibration / holdout.
            resamples: bootstrap windows for each null distribution.
            max_samples: reference samples kept while fitting (reservoir-sampled beyond).
            seed: seeds the split, the random features and the resampling.

        Returns:
            The Reference (its size does not grow with the number of reference samples).

        Raises:
            ConfigError: a module name not in the model, too few samples, bad arguments, or an
                output that is not a floating-point (batch, features) or (batch, seq, features).

        Example:
            >>> import torch, torchwatch as tw
            >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh())
            >>> data = [torch.randn(64, 8) for _ in range(20)]
            >>> ref = tw.Reference.fit(model, data, modules=["1"], window=16, components=4, resamples=500)
            >>> ref.modules["1"].dim, ref.window
            (8, 16)
        """
        _check_fit_args(window, components, features, arl, delta, splits, resamples, max_samples, reduce, seed)
        _validate.instance("Reference.fit", "model", model, nn.Module, "a torch.nn.Module")
        modules = _validate.strings("Reference.fit", "modules", modules)
        names = dict(model.named_modules())
        missing = [m for m in modules if m not in names]
        if not modules or missing:
            raise ConfigError(f"Reference.fit needs modules of the model; not found: {missing or '(none given)'}")
        reduce = reduce or default_reduce
        embeddings = _collect(model, batches, list(modules), names, reduce, max_samples, seed)
        n = min(e.shape[0] for e in embeddings.values())
        rng = np.random.default_rng(seed)
        order = rng.permutation(n)
        n_fit, n_cal = int(splits[0] * n), int(splits[1] * n)
        parts = (order[:n_fit], order[n_fit : n_fit + n_cal], order[n_fit + n_cal :])
        if min(len(parts[1]), len(parts[2]) // 4) < window or n_fit < 8:
            raise ConfigError(
                f"Reference.fit got {n} samples; with splits {splits} the calibration part needs at least one "
                f"window ({window}) and the holdout at least four: give more reference data or a smaller window"
            )
        boot_cal = _predictive_windows(rng, len(parts[1]), resamples, window)
        # held-out windows are disjoint, not resampled: each is a genuine window of fresh samples
        hold_windows = np.arange(len(parts[2]) // window * window).reshape(-1, window)
        refs, cal_mod_p, hold_mod_p = {}, [], []
        for name, emb in embeddings.items():
            ref, cal_p, hold_p = _fit_module(name, emb[:n], parts, boot_cal, hold_windows, components, features, rng)
            refs[name] = ref
            cal_mod_p.append(cal_p)
            hold_mod_p.append(hold_p)
        joint_null = np.sort(np.stack(cal_mod_p, axis=1).min(axis=1))
        holdout_p = _lower_p(joint_null, np.stack(hold_mod_p, axis=1).min(axis=1))
        return cls(
            refs, window=window, arl=float(arl), delta=float(delta), joint_null=joint_null, holdout_p=holdout_p,
            reduce=reduce, reduce_name="default" if reduce is default_reduce else getattr(reduce, "__name__", "custom"),
        )  # fmt: skip

    # ---- checking ------------------------------------------------------------------------

    def calibration_check(
        self, arl: float | None = None, *, simulated_arl: float = 200, seed: int = 0
    ) -> CalibrationReport:
        """Replay the held-out reference windows through the detector.

        Their p-values should be uniform; the detector's ARL on them (computed exactly for their
        empirical distribution) should match the target, and run lengths simulated at a short
        target (``simulated_arl``, by resampling the held-out p-values) should average it.

        Example:
            >>> import torch, torchwatch as tw
            >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh())
            >>> ref = tw.Reference.fit(model, [torch.randn(64, 8) for _ in range(40)], modules=["1"],
            ...                        window=8, components=4, resamples=1000)
            >>> report = ref.calibration_check(arl=100)
            >>> low, high = report.expected_arl_interval
            >>> low < report.expected_arl < high
            True
        """
        target = float(arl or self.arl)
        threshold = self.threshold(target)
        expected = _sequential.arl(threshold, _sequential.empirical_cdf(self.holdout_p, self.delta))
        rng = np.random.default_rng(seed)
        resampled = (rng.choice(self.holdout_p, self.holdout_p.size) for _ in range(200))
        boot = [_sequential.arl(threshold, _sequential.empirical_cdf(p, self.delta), cells=200) for p in resampled]
        lo = float(np.quantile(boot, 0.05, method="lower"))
        hi = float(np.quantile(boot, 0.95, method="higher"))
        short_h = self.threshold(simulated_arl)
        cap = int(20 * simulated_arl)
        runs = _simulate_runs(self.holdout_p, short_h, self.delta, rng, streams=400, cap=cap)
        uniformity = _ks_uniform(self.holdout_p)
        verdict, needed = _verdict(target, lo, hi, uniformity, self.holdout_p)
        return CalibrationReport(
            target_arl=target,
            expected_arl=expected,
            expected_arl_interval=(lo, hi),
            false_alarms_per_window=0.0 if math.isinf(expected) else 1.0 / expected,
            uniformity_p_value=uniformity,
            run_lengths={
                "p10": float(np.quantile(runs, 0.1)),
                "p50": float(np.median(runs)),
                "p90": float(np.quantile(runs, 0.9)),
                "mean": float(runs.mean()),
            },
            simulated_arl=float(simulated_arl),
            holdout_windows=int(self.holdout_p.size),
            verdict=verdict,
            windows_needed=needed,
            censored=float((runs >= cap).mean()),
            window=self.window,
        )

    # ---- files -------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a safetensors file (no pickle): arrays per module plus JSON metadata.

        Written to a temporary name first, fsynced and renamed, so a crash never leaves half a file
        and a failed write (a full disk) leaves the old file and no temporary one.
        """
        from safetensors.numpy import save_file

        tensors: dict[str, np.ndarray] = {"joint_null": self.joint_null, "holdout_p": self.holdout_p}
        meta_modules = []
        for i, (name, ref) in enumerate(self.modules.items()):
            for key in ModuleReference.ARRAYS:
                tensors[f"m{i}.{key}"] = np.ascontiguousarray(getattr(ref, key))
            meta_modules.append({"name": name, "resid_mean": ref.resid_mean, "resid_std": ref.resid_std})
        metadata = {
            "format": FORMAT,
            "modules": json.dumps(meta_modules),
            "window": str(self.window),
            "arl": repr(self.arl),
            "delta": repr(self.delta),
            "reduce": self.reduce_name,
            "torch": torch.__version__,
        }
        atomic_write(
            _validate.path("Reference.save", "path", path), lambda tmp: save_file(tensors, tmp, metadata=metadata)
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, reduce: Reduce | None = None) -> Reference:
        """Read a file written by :meth:`save`.

        Args:
            path: the ``.safetensors`` file.
            reduce: the custom reduce the reference was fit with, if any (callables are not saved).

        Raises:
            FormatError: missing, unreadable or corrupt file, unknown format version, or arrays
                whose shapes do not fit together (the message names the file and the key).
            ConfigError: the reference was fit with a custom reduce and none is given.
        """
        from .integrity import _safetensors

        if not isinstance(path, (str, os.PathLike)):
            raise ConfigError(f"Reference.load needs a path, got {type(path).__name__}")
        path = os.fspath(path)
        where = f"reference file {path!r}"
        raw, metadata = _safetensors.load(path, "reference")  # layout checked first; a FIFO or directory is refused
        if metadata.get("format") != FORMAT:
            raise FormatError(
                f"{path!r} is not a torchwatch reference (format {metadata.get('format')!r}, expected {FORMAT!r})"
            )
        tensors = {key: t.numpy() for key, t in raw.items()}
        try:
            meta_modules = parse_json(metadata["modules"], f"{where}, metadata field 'modules'")
            window, arl, delta = int(metadata["window"]), float(metadata["arl"]), float(metadata["delta"])
            if not isinstance(meta_modules, list) or not meta_modules:
                raise FormatError(f"{where}, metadata field 'modules': expected a non-empty list of modules")
            modules = {}
            for i, m in enumerate(meta_modules):
                f = Fields(m, f"{where}, module {i}")
                name = f.str("name")
                arrays = {key: tensors[f"m{i}.{key}"].astype(np.float64) for key in ModuleReference.ARRAYS}
                modules[name] = ModuleReference(name, arrays, f.number("resid_mean"), f.number("resid_std"))
            joint_null, holdout_p = tensors["joint_null"], tensors["holdout_p"]
        except KeyError as exc:
            raise FormatError(f"{where} lacks {exc.args[0]!r}; it is truncated or not a reference") from None
        except (ValueError, TypeError) as exc:
            if isinstance(exc, FormatError):
                raise
            raise FormatError(f"{where} has unreadable metadata: {exc}") from None
        if window < 1 or not arl > 1 or not delta > 1 or joint_null.ndim != 1 or holdout_p.ndim != 1:
            raise FormatError(f"{where} has window={window}, arl={arl}, delta={delta}: not a valid reference")
        for name, ref in modules.items():
            _check_shapes(path, name, ref)
        reduce_name = metadata.get("reduce", "default")
        if reduce_name != "default" and reduce is None:
            raise ConfigError(
                f"{path!r} was fit with a custom reduce {reduce_name!r}, which is not saved; "
                f"pass it again: Reference.load(path, reduce={reduce_name})"
            )
        return cls(modules, window=window, arl=arl, delta=delta, joint_null=joint_null, holdout_p=holdout_p,
                   reduce=reduce, reduce_name=reduce_name)  # fmt: skip

    def __repr__(self) -> str:
        dims = ", ".join(f"{n!r}: d={r.dim}, k={r.components}" for n, r in self.modules.items())
        return f"Reference({dims}; window={self.window}, arl={self.arl:g})"


# ---- fitting helpers ---------------------------------------------------------------------


def _check_fit_args(window, components, features, arl, delta, splits, resamples, max_samples, reduce, seed) -> None:
    owner = "Reference.fit"
    for name, value, low, high in (("window", window, 1, 1 << 20), ("components", components, 1, 4096),
                                   ("features", features, 2, 1 << 16), ("resamples", resamples, 100, 10**7),
                                   ("max_samples", max_samples, 1, 10**9)):  # fmt: skip
        _validate.integer(owner, name, value, low=low, high=high)
    if features % 2:
        raise ConfigError(f"{owner}: features must be an even integer >= 2, got {features}")
    _validate.number(owner, "arl (windows between false alarms)", arl, above=1.0)
    _validate.number(owner, "delta (the detector's downward drift)", delta, above=1.0, high=20.0)
    _validate.function(owner, "reduce", reduce, optional=True)
    _validate.seed(owner, "seed", seed)
    ok = isinstance(splits, (tuple, list)) and len(splits) == 3
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in splits)
    if not ok or abs(sum(splits) - 1) > 1e-6:
        raise ConfigError(f"{owner}: splits must be three positive fractions summing to 1, got {splits!r}")


def call_batch(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on one batch the way torchwatch always does: a mapping as ``model(**batch)``
    (a tokenizer's ``BatchEncoding`` too), a tuple or list as ``model(*batch)``, else ``model(batch)``."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _collect(
    model: nn.Module, batches: Iterable[Any], modules: list[str], names: dict[str, nn.Module],
    reduce: Reduce, max_samples: int, seed: int,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Reduced embeddings per module, reservoir-sampled to ``max_samples`` rows as they stream
    in (memory stays bounded however many reference batches there are)."""
    reservoirs: dict[str, _Reservoir] = {m: _Reservoir(max_samples, seed) for m in modules}
    errors: list[str] = []

    def keep(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            try:
                e = reduce(output)
            except ConfigError as exc:
                errors.append(f"{name!r}: {exc}")
                return
            reservoirs[name].add(e.detach().to(torch.float64).cpu().numpy())

        return hook

    handles = [names[m].register_forward_hook(keep(m)) for m in modules]
    try:
        with torch.inference_mode():
            for batch in batches:
                call_batch(model, batch)
                if errors:
                    raise ConfigError(f"Reference.fit cannot use the output of {errors[0]}")
    finally:
        for h in handles:
            h.remove()
    out = {}
    for m, reservoir in reservoirs.items():
        emb = reservoir.rows()
        if emb is None:
            raise ConfigError(f"Reference.fit: module {m!r} never ran on the reference batches")
        if not np.isfinite(emb).all():
            raise ConfigError(f"Reference.fit: module {m!r} produced NaN/Inf on the reference data")
        out[m] = emb
    return out


class _Reservoir:
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


def _ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Sample covariance of centred ``x`` and the Ledoit-Wolf shrinkage intensity toward a scaled identity."""
    n, d = x.shape
    s = x.T @ x / n
    m = np.trace(s) / d
    d2 = ((s - m * np.eye(d)) ** 2).sum()
    sq = (x * x).sum(1)
    b2 = (sq**2 - 2 * ((x @ s) * x).sum(1) + (s**2).sum()).sum() / n**2
    return s, float(min(b2, d2) / d2) if d2 > 0 else 1.0


def has_residual(basis: np.ndarray | torch.Tensor) -> bool:
    """Whether a (dim, components) basis leaves a space outside it: with components == dim the
    residual energy is rounding noise, and the novelty statistic is not computed (it is 0)."""
    return basis.shape[1] < basis.shape[0]


def _sample_features(
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
    return np.concatenate([r[:, None], z, phi], axis=1)


def _window_statistics(
    n: np.ndarray, sums: np.ndarray, k: int, rff_ref: np.ndarray, resid_mean: float, resid_std: float
) -> np.ndarray:
    n = np.maximum(np.asarray(n, dtype=np.float64), 1.0)
    r_bar = sums[:, 0] / n
    z_bar = sums[:, 1 : 1 + k] / n[:, None]
    phi_bar = sums[:, 1 + k :] / n[:, None]
    mean_shift = n * (z_bar**2).sum(1)
    mmd = n * ((phi_bar - rff_ref) ** 2).sum(1)
    moved = r_bar - resid_mean
    moved = np.sign(moved) * np.maximum(np.abs(moved) - RESIDUAL_RESOLUTION, 0.0)  # rounding is not evidence
    novelty = np.sqrt(n) * moved / max(resid_std, 1e-300)
    return np.stack([mean_shift, mmd, novelty], axis=1)


def _fit_module(
    name: str, emb: np.ndarray, parts: tuple[np.ndarray, ...], boot_cal: np.ndarray, boot_hold: np.ndarray,
    components: int, features: int, rng: np.random.Generator,
) -> tuple[ModuleReference, np.ndarray, np.ndarray]:  # fmt: skip
    """One module's summary, and the module-level p-values of the calibration and holdout windows."""
    fit, cal, hold = (emb[p] for p in parts)
    mean = fit.mean(0)
    cov, alpha = _ledoit_wolf(fit - mean)
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
    rows_fit = _sample_features(fit, mean, basis, scale, omega, phase, floor)
    rff_ref = rows_fit[:, 1 + k :].mean(0)
    resid_mean = float(rows_fit[:, 0].mean())
    resid_std = max(float(rows_fit[:, 0].std()), RESIDUAL_SPREAD) if has_residual(basis) else 1.0

    def stats(x: np.ndarray, boot: np.ndarray) -> np.ndarray:
        rows = _sample_features(x, mean, basis, scale, omega, phase, floor)
        return _window_statistics(
            np.full(len(boot), boot.shape[1]), rows[boot].sum(1), k, rff_ref, resid_mean, resid_std
        )

    cal_stats, hold_stats = stats(cal, boot_cal), stats(hold, boot_hold)
    nulls = {key: np.sort(cal_stats[:, j]) for j, key in enumerate(("null_mean_shift", "null_mmd", "null_novelty"))}
    arrays = {"mean": mean, "basis": basis, "scale": scale, "omega": omega, "phase": phase, "rff_ref": rff_ref,
              "resid_floor": np.array([floor]),
              **nulls, "null_min_p": np.zeros(1)}  # fmt: skip
    ref = ModuleReference(name, arrays, resid_mean, resid_std)
    ref.null_min_p = np.sort(ref.p_values(cal_stats).min(axis=1))
    return ref, ref.module_p(cal_stats), ref.module_p(hold_stats)


def _predictive_windows(rng: np.random.Generator, n: int, count: int, window: int) -> np.ndarray:
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


def _check_shapes(path: str, name: str, ref: ModuleReference) -> None:
    d, k, m = ref.dim, ref.components, ref.features
    expected = {"mean": (d,), "scale": (k,), "phase": (m,), "rff_ref": (m,), "omega": (k, m), "resid_floor": (1,)}
    for key, shape in expected.items():
        if getattr(ref, key).shape != shape:
            raise FormatError(
                f"reference file {path!r}, module {name!r}: {key} has shape {getattr(ref, key).shape}, "
                f"expected {shape} for dim {d}, {k} components, {m} features"
            )
    for key in ModuleReference.ARRAYS:
        if not np.isfinite(getattr(ref, key)).all():
            raise FormatError(f"reference file {path!r}, module {name!r}: {key} holds NaN/Inf")
    if not has_residual(ref.basis) and np.any(ref.null_novelty != 0):
        raise FormatError(
            f"reference file {path!r}, module {name!r}: fit by an older torchwatch whose novelty statistic charted "
            f"rounding noise for embeddings of dimension <= components ({d} <= {k}); fit the reference again"
        )


def _simulate_runs(
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


def _verdict(target: float, lo: float, hi: float, uniformity: float, p: np.ndarray) -> tuple[str, int]:
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


def _ks_uniform(p: np.ndarray) -> float:
    """Two-sided Kolmogorov-Smirnov p-value of ``p`` against Uniform(0, 1) (asymptotic)."""
    x = np.sort(p)
    n = x.size
    i = np.arange(1, n + 1)
    stat = max((i / n - x).max(), (x - (i - 1) / n).max())
    lam = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * stat
    return float(min(1.0, max(0.0, 2 * sum((-1) ** (j - 1) * math.exp(-2 * j * j * lam * lam) for j in range(1, 101)))))
