"""Embedding drift: a reference fitted once, then calibrated online detection in the hooks.

:meth:`Reference.fit` runs the model on reference data and keeps, per monitored module, a
fixed-size summary of its embeddings (one vector per sample: 2-D outputs by row, 3-D outputs
averaged over the sequence axis, 4-D and more (convolutions' feature maps) over their spatial
dimensions, or a ``reduce=`` callable):

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
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ... import _safetensors, _validate, formats
from ..._files import atomic_write, parse_json
from ..._pytree import call_batch, tensors_in
from ..._schema import Fields
from ...errors import ConfigError, FormatError
from . import guarantee as _guarantee
from . import mewma as _mewma
from . import sequential as _sequential
from .calibration import CalibrationReport, ks_uniform, simulate_runs, verdict
from .statistics import ModuleReference, Reservoir, fit_module, has_residual, lower_p, predictive_windows, window_sums

FORMAT = formats.REFERENCE


STATISTICS = ("mean_shift", "mmd", "novelty")


Reduce = Callable[[Any], torch.Tensor]


def default_reduce(output: Any) -> torch.Tensor:
    """One vector per sample: 2-D ``(batch, features)`` as is; 3-D ``(batch, sequence, features)``
    averaged over the sequence (dim 1); 4-D and more ``(batch, channels, *spatial)``, the layout
    of convolutions' feature maps whatever their memory format (channels_last included),
    averaged over the spatial dimensions (global average pooling, as a CNN's head does)."""
    t = output if isinstance(output, torch.Tensor) else _first_tensor(output)
    if t is None or not t.is_floating_point():
        raise ConfigError(f"drift needs a floating-point tensor output, got {type(output).__name__}")
    if t.dim() == 2:
        return t
    if t.dim() == 3:
        return t.mean(dim=1)
    if t.dim() >= 4:
        return t.mean(dim=tuple(range(2, t.dim())))
    raise ConfigError(
        f"drift reduces outputs of 2 or more dimensions (batch first), got shape {tuple(t.shape)}; "
        "pass reduce= to map it to (batch, features)"
    )


def _first_tensor(output: Any) -> torch.Tensor | None:
    found = [t for label, t in tensors_in(output) if label == ""]
    return found[0] if found else None


class Reference:
    """What "no drift" looks like for some modules of a model; fit once, saved, loaded.

    Create it with :meth:`fit` or :meth:`load`; pass it to ``tw.attach(model, drift=ref)``.

    Attributes:
        modules: per module name, its :class:`ModuleReference`.
        window: samples per window.
        arl: default target windows between false alarms (``attach(drift_arl=...)`` overrides).
        delta: the CUSUM's drift allowance.
        smoothing: λ of the accumulating detectors (:mod:`.mewma`): about ``2/λ`` windows of memory.
        samples: reference samples it was fit on (after reservoir sampling; 0 if not recorded).
        reduce_name: ``"default"`` or the name of the custom ``reduce`` used at fit time.
        guarantee: the probability, over the draw of the reference samples, that the detector
            false-alarms no more often than its target (0: calibrated on average over draws only;
            see ``fit(guarantee=...)``).
        null_guard: the factor the per-window CUSUM's threshold is raised by (1: set for uniform
            p-values; see :mod:`.guarantee`).
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
        smoothing: float = _mewma.DEFAULT_LAMBDA,
        samples: int = 0,
        guarantee: float = 0.0,
        null_guard: float = 1.0,
    ) -> None:
        self.modules = modules
        self.window = window
        self.arl = arl
        self.delta = delta
        self.smoothing = smoothing
        self.samples = samples
        self.joint_null = np.asarray(joint_null, dtype=np.float64)
        self.holdout_p = np.asarray(holdout_p, dtype=np.float64)
        self.reduce = reduce or default_reduce
        self.reduce_name = reduce_name
        self.guarantee = guarantee
        self.null_guard = null_guard

    def joint_p(self, module_ps: np.ndarray) -> np.ndarray:
        """(windows,) calibrated p-values of the smallest module p-value, per window."""
        return lower_p(self.joint_null, np.asarray(module_ps).min(axis=1))

    def threshold(self, arl: float | None = None) -> float:
        """The CUSUM threshold for ``arl`` windows between false alarms (default: ``self.arl``)."""
        cdf = _sequential.uniform_cdf(self.delta, resolution=self.joint_null.size)
        return self.null_guard * _sequential.threshold_for(arl or self.arl, cdf)

    def detectors(self) -> int:
        """How many detectors share the false-alarm budget (see :func:`detectors_for`)."""
        return detectors_for(len(self.modules))

    # ---- fitting -----------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        model: nn.Module,
        batches: Iterable[Any],
        modules: Sequence[str],
        *,
        window: int = 32,
        components: int | None = None,
        features: int = 128,
        arl: float = 10_000,
        delta: float = _sequential.DEFAULT_DELTA,
        reduce: Reduce | None = None,
        splits: tuple[float, float, float] = (0.5, 0.3, 0.2),
        resamples: int = 10_000,
        max_samples: int = 100_000,
        seed: int = 0,
        guarantee: float | None = _guarantee.DEFAULT,
    ) -> Reference:
        """Run ``model`` on reference data and summarise the embeddings of ``modules``.

        Args:
            model: the model; called as ``model(x)``, ``model(*x)`` or ``model(**x)`` for a tensor,
                a tuple/list or a dict batch.
            batches: reference batches (any iterable; consumed once).
            modules: fully-qualified names of the modules to monitor (e.g. the pooled embedding).
            window: samples per window: the unit of detection.
            components: PCA directions kept (fewer if the data has fewer dimensions). Default: 32,
                or one per 16 fit samples if that is fewer (at least 4), so that the covariances
                the detectors whiten with are estimated from many more samples than directions.
            features: random Fourier features for the distribution-shift statistic.
            arl: default target windows between false alarms (see :func:`arl_windows`).
            delta: CUSUM allowance; larger reacts to strong shifts faster, smaller to weak ones.
            reduce: maps a module output to (batch, features); default: 2-D as is, 3-D
                averaged over dim 1, 4-D and more (batch, channels, *spatial) averaged over the
                spatial dimensions. Not saved with the reference: pass it again to :meth:`load`.
            splits: fractions of samples for fit / calibration / holdout.
            resamples: bootstrap windows for each null distribution.
            max_samples: reference samples kept while fitting (reservoir-sampled beyond).
            seed: seeds the split, the random features and the resampling.
            guarantee: the probability, over the draw of the reference samples from their
                population, that the detector false-alarms no more often than ``arl`` (and any
                ARL given to ``attach``) says: thresholds are raised by a bootstrap of the
                reference (Gandy & Kvaløy, 2013; see :mod:`torchwatch.monitors.drift.guarantee`).
                The price is detection delay, larger for smaller references (measured in
                ``benchmarks/RESULTS.md``). ``None``: thresholds calibrated on average over
                references only (a given reference may false-alarm several times as often).
                The bootstrap makes the fit slower: ~5 s for 5,000 samples and 128 features
                against ~0.4 s without it.

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
        if guarantee is not None:
            _validate.number("Reference.fit", "guarantee (a probability below 1)", guarantee, above=0.0, high=0.999)
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
        if min(len(parts[1]), len(parts[2])) < window or n_fit < 8:
            raise ConfigError(
                f"Reference.fit got {n} samples; with splits {splits} the calibration part and the holdout each "
                f"need at least one window ({window}): give more reference data or a smaller window"
            )
        if components is None:
            components = min(32, max(4, n_fit // 16))
        boot_cal = predictive_windows(rng, len(parts[1]), resamples, window)
        # held-out windows are disjoint, not resampled: each is a genuine window of fresh samples
        hold_windows = np.arange(len(parts[2]) // window * window).reshape(-1, window)
        refs, cal_mod_p, hold_mod_p = {}, [], []
        # the guards draw from their own stream: the rest of the fit is the same with or without them
        guard_rng = np.random.default_rng(None if seed is None else [seed, 1])
        level = None if guarantee is None else _guarantee.per_detector(guarantee, detectors_for(len(embeddings)))
        for name, emb in embeddings.items():
            ref, cal_p, hold_p = fit_module(name, emb[:n], parts, boot_cal, hold_windows, components, features, rng,
                                            _mewma.DEFAULT_LAMBDA, level, guard_rng)  # fmt: skip
            refs[name] = ref
            cal_mod_p.append(cal_p)
            hold_mod_p.append(hold_p)
        joint_null = np.sort(np.stack(cal_mod_p, axis=1).min(axis=1))
        holdout_p = lower_p(joint_null, np.stack(hold_mod_p, axis=1).min(axis=1))
        null_guard = 1.0
        if level is not None:
            cal_rows = {name: refs[name].sample_features(emb[parts[1]]) for name, emb in embeddings.items()}

            def joint_p(index_windows: np.ndarray) -> np.ndarray:
                size = np.full(len(index_windows), float(window))
                module_p = [refs[m].module_p(refs[m].window_statistics(size, window_sums(rows, index_windows)))
                            for m, rows in cal_rows.items()]  # fmt: skip
                return lower_p(joint_null, np.stack(module_p, axis=1).min(axis=1))

            share = float(arl) * detectors_for(len(embeddings))
            nominal = _sequential.threshold_for(share, _sequential.uniform_cdf(delta, resolution=joint_null.size))
            null_guard = _guarantee.cusum_guard(joint_p, len(parts[1]), window, share=share, delta=float(delta),
                                                nominal=nominal, level=level, rng=guard_rng)  # fmt: skip
        return cls(
            refs, window=window, arl=float(arl), delta=float(delta), joint_null=joint_null, holdout_p=holdout_p,
            reduce=reduce, reduce_name="default" if reduce is default_reduce else getattr(reduce, "__name__", "custom"),
            samples=n, guarantee=0.0 if guarantee is None else float(guarantee), null_guard=null_guard,
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
        runs = simulate_runs(self.holdout_p, short_h, self.delta, rng, streams=400, cap=cap)
        uniformity = ks_uniform(self.holdout_p)
        word, needed = verdict(target, lo, hi, uniformity, self.holdout_p)
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
            verdict=word,
            windows_needed=needed,
            samples_needed=self._samples_for(needed),
            accumulating={name: tuple(float(v) for v in m.holdout_level) for name, m in self.modules.items()},
            censored=float((runs >= cap).mean()),
            window=self.window,
            guarantee=self.guarantee,
            allowance={
                name: tuple(float(c * nu / d) for (c, nu), d in zip(m.guard, m.detector_dims, strict=True))
                for name, m in self.modules.items()
            },
        )

    def _samples_for(self, holdout_windows: int) -> int:
        """Reference samples (same splits) whose holdout would make ``holdout_windows`` windows."""
        if not holdout_windows:
            return 0
        if not self.samples:
            return 0
        return math.ceil(self.samples * holdout_windows / max(self.holdout_p.size, 1))

    # ---- files -------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a safetensors file (no pickle): arrays per module plus JSON metadata.

        Written to a temporary name first, fsynced and renamed, so a crash never leaves half a file
        and a failed write (a full disk) leaves the old file and no temporary one.
        """
        from safetensors.numpy import save_file

        tensors: dict[str, np.ndarray] = {"joint_null": self.joint_null, "holdout_p": self.holdout_p,
                                          "null_guard": np.array([self.null_guard])}  # fmt: skip
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
            "smoothing": repr(self.smoothing),
            "samples": str(self.samples),
            "guarantee": repr(self.guarantee),
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
            smoothing = float(metadata.get("smoothing", _mewma.DEFAULT_LAMBDA))
            samples = int(metadata.get("samples", "0"))
            if "m0.mean" in tensors and any(f"m0.{key}" not in tensors for key in ModuleReference.DETECTOR_ARRAYS):
                raise FormatError(
                    f"{where} was fit by an older torchwatch, without what the accumulating drift detectors need; "
                    "fit the reference again (Reference.fit) and save it"
                )
            if not isinstance(meta_modules, list) or not meta_modules:
                raise FormatError(f"{where}, metadata field 'modules': expected a non-empty list of modules")
            modules = {}
            for i, m in enumerate(meta_modules):
                f = Fields(m, f"{where}, module {i}")
                name = f.str("name")
                arrays = {key: tensors[f"m{i}.{key}"].astype(np.float64) for key in ModuleReference.ARRAYS
                          if key not in ModuleReference.OPTIONAL or f"m{i}.{key}" in tensors}  # fmt: skip
                arrays.setdefault("guard", np.zeros((3, 2)))
                modules[name] = ModuleReference(name, arrays, f.number("resid_mean"), f.number("resid_std"))
            # a file fit before guarantees has neither guards nor a guarantee: on average only
            guarded = "null_guard" in tensors and all(f"m{i}.guard" in tensors for i in range(len(meta_modules)))
            if guarded and tensors["null_guard"].size != 1:
                raise FormatError(f"{where}: null_guard has shape {tensors['null_guard'].shape}, expected (1,)")
            guarantee = float(metadata.get("guarantee", "0")) if guarded else 0.0
            null_guard = float(tensors["null_guard"].reshape(-1)[0]) if guarded else 1.0
            if not guarded:
                for module_ref in modules.values():
                    module_ref.guard = module_ref.unguarded()
            joint_null, holdout_p = tensors["joint_null"], tensors["holdout_p"]
        except KeyError as exc:
            raise FormatError(f"{where} lacks {exc.args[0]!r}; it is truncated or not a reference") from None
        except (ValueError, TypeError) as exc:
            if isinstance(exc, FormatError):
                raise
            raise FormatError(f"{where} has unreadable metadata: {exc}") from None
        if window < 1 or not arl > 1 or not delta > 1 or joint_null.ndim != 1 or holdout_p.ndim != 1:
            raise FormatError(f"{where} has window={window}, arl={arl}, delta={delta}: not a valid reference")
        if not 0 < smoothing <= 1:
            raise FormatError(f"{where} has smoothing={smoothing}: not a valid reference (0 < smoothing <= 1)")
        if not (0 <= guarantee < 1 and 1 <= null_guard <= 1e3):
            raise FormatError(
                f"{where} has guarantee={guarantee}, null_guard={null_guard}: not a valid reference "
                "(0 <= guarantee < 1, 1 <= null_guard)"
            )
        for name, ref in modules.items():
            _check_shapes(path, name, ref)
        reduce_name = metadata.get("reduce", "default")
        if reduce_name != "default" and reduce is None:
            raise ConfigError(
                f"{path!r} was fit with a custom reduce {reduce_name!r}, which is not saved; "
                f"pass it again: Reference.load(path, reduce={reduce_name})"
            )
        return cls(modules, window=window, arl=arl, delta=delta, joint_null=joint_null, holdout_p=holdout_p,
                   reduce=reduce, reduce_name=reduce_name, smoothing=smoothing, samples=max(samples, 0),
                   guarantee=guarantee, null_guard=null_guard)  # fmt: skip

    def __repr__(self) -> str:
        dims = ", ".join(f"{n!r}: d={r.dim}, k={r.components}" for n, r in self.modules.items())
        return f"Reference({dims}; window={self.window}, arl={self.arl:g})"


def detectors_for(modules: int) -> int:
    """How many detectors share one false-alarm budget for ``modules`` drift-monitored modules:
    the per-window CUSUM, the test of the window being filled, and three accumulating detectors
    per module (each gets the target ARL times this many windows: false-alarm rates add)."""
    return 2 + 3 * modules


def _check_fit_args(window, components, features, arl, delta, splits, resamples, max_samples, reduce, seed) -> None:
    owner = "Reference.fit"
    if components is not None:
        _validate.integer(owner, "components", components, low=1, high=4096)
    for name, value, low, high in (("window", window, 1, 1 << 20),
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


def _collect(
    model: nn.Module, batches: Iterable[Any], modules: list[str], names: dict[str, nn.Module],
    reduce: Reduce, max_samples: int, seed: int,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Reduced embeddings per module, reservoir-sampled to ``max_samples`` rows as they stream
    in (memory stays bounded however many reference batches there are)."""
    reservoirs: dict[str, Reservoir] = {m: Reservoir(max_samples, seed) for m in modules}
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


def _check_shapes(path: str, name: str, ref: ModuleReference) -> None:
    d, k, m = ref.dim, ref.components, ref.features
    expected = {"mean": (d,), "scale": (k,), "phase": (m,), "rff_ref": (m,), "omega": (k, m), "resid_floor": (1,),
                "center_z": (k,), "white_z": (k, k), "center_phi": (m,), "white_phi": (m, m),
                "center_spread": (k,), "white_spread": (k, k), "pooled": (3,), "holdout_level": (3,),
                "guard": (3, 2)}  # fmt: skip
    for key, shape in expected.items():
        if getattr(ref, key).shape != shape:
            raise FormatError(
                f"reference file {path!r}, module {name!r}: {key} has shape {getattr(ref, key).shape}, "
                f"expected {shape} for dim {d}, {k} components, {m} features"
            )
    for key in ModuleReference.ARRAYS:
        if not np.isfinite(getattr(ref, key)).all():
            raise FormatError(f"reference file {path!r}, module {name!r}: {key} holds NaN/Inf")
    if not ref.guard.min() > 0:
        raise FormatError(f"reference file {path!r}, module {name!r}: guard {ref.guard.tolist()} must be positive")
    if not ref.pooled.min() >= 1:
        raise FormatError(f"reference file {path!r}, module {name!r}: pooled sample count {ref.pooled.min()} < 1")
    if not has_residual(ref.basis) and np.any(ref.null_novelty != 0):
        raise FormatError(
            f"reference file {path!r}, module {name!r}: fit by an older torchwatch whose novelty statistic charted "
            f"rounding noise for embeddings of dimension <= components ({d} <= {k}); fit the reference again"
        )
