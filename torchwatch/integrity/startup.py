"""The startup self-test: prove the loaded model is the validated one before it serves."""

from __future__ import annotations

import os
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch

from .. import _validate
from ..errors import CanaryError, ConfigError, IntegrityError
from .canary import MODES, Canary, CanaryReport, Tolerances
from .fingerprinting import Fingerprint
from .fingerprinting import fingerprint as take_fingerprint
from .manifest import Key, Manifest
from .verify import WeightReport, ignore_matcher, verify_weights

__all__ = ["SelfTestReport", "selftest"]


@dataclass
class SelfTestReport:
    """What :func:`selftest` found.

    Attributes:
        ok: every check that ran passed.
        weights: the :class:`WeightReport`, or None without a manifest.
        canary: the :class:`CanaryReport`, or None without a canary.
        fingerprint: the in-memory fingerprint taken after the checks passed: the baseline for
            :meth:`torchwatch.Watch.verify_fingerprint_every`; None if not asked for or failed.
        seconds: wall time of the whole self-test.
    """

    ok: bool
    weights: WeightReport | None
    canary: CanaryReport | None
    fingerprint: Fingerprint | None
    seconds: float

    def summary(self) -> str:
        lines = [f"self-test {'PASSED' if self.ok else 'FAILED'} in {self.seconds:.2f} s"]
        if self.weights is not None:
            lines.append(self.weights.summary())
        if self.canary is not None:
            lines.append(self.canary.summary())
        if self.fingerprint is not None:
            lines.append(
                f"fingerprint baseline {self.fingerprint.digest[:16]}… over {self.fingerprint.nbytes / 1e6:.1f} MB"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "weights": self.weights.to_dict() if self.weights else None,
            "canary": self.canary.to_dict() if self.canary else None,
            "fingerprint": self.fingerprint.digest if self.fingerprint else None,
            "seconds": self.seconds,
        }


def selftest(
    model: torch.nn.Module,
    *,
    manifest: Manifest | str | os.PathLike[str] | None = None,
    canary: Canary | str | os.PathLike[str] | None = None,
    expected_digest: str | None = None,
    key: Key | None = None,
    ignore: str | Collection[str] | None = None,
    canary_mode: str = "auto",
    tolerances: Tolerances | None = None,
    fingerprint: bool = True,
    raise_on_failure: bool = True,
) -> SelfTestReport:
    """Check weights against a manifest and outputs against a canary; take a fingerprint baseline.

    Args:
        model: the loaded model, on the device and in the dtype it will serve in.
        manifest: a :class:`Manifest` or its path.
        canary: a :class:`Canary` or its path.
        expected_digest, key: pin the manifest's digest / verify its HMAC signature
            (see :func:`verify_weights`).
        ignore: tensor names to leave out of the weight check (a regex or a list; see
            :func:`verify_weights`, which also honours a transformers model's loader lists).
        canary_mode, tolerances: passed to :meth:`Canary.verify`.
        fingerprint: after the checks pass, fingerprint the weights in memory as a baseline.
        raise_on_failure: raise on the first failed check (weights before canary).

    Returns:
        A :class:`SelfTestReport`.

    Raises:
        ConfigError: neither a manifest nor a canary, a bad argument, or a canary recorded for
            other weights than the manifest describes (a canary binds to the weights, so one
            recorded with the checkpoint's manifest fits the model's manifest and vice versa).
        FormatError: an unreadable manifest or canary file.
        IntegrityError: weights do not match (``report`` attribute: this report).
        CanaryError: outputs do not match (``report`` attribute: this report).

    Example:
        >>> import torch, torchwatch as tw
        >>> model = torch.nn.Linear(4, 2).eval()
        >>> m = tw.Manifest.from_model(model)
        >>> c = tw.Canary.record(model, torch.ones(3, 4), manifest=m)
        >>> tw.selftest(model, manifest=m, canary=c).ok
        True
    """
    start = time.perf_counter()
    _validate.instance("selftest()", "model", model, torch.nn.Module, "a torch.nn.Module")
    if manifest is None and canary is None:
        raise ConfigError("selftest() needs manifest= or canary= (or both): there is nothing to check against")
    _validate.instance("selftest()", "tolerances", tolerances, Tolerances, "a torchwatch.Tolerances", optional=True)
    if canary_mode not in MODES:
        raise ConfigError(f"canary_mode={canary_mode!r} is not valid: use one of {', '.join(MODES)}")
    ignore_matcher(ignore)  # a bad ignore= fails before anything runs
    if manifest is not None and not isinstance(manifest, Manifest):
        manifest = Manifest.load(manifest)
    if canary is not None and not isinstance(canary, Canary):
        canary = Canary.load(canary)
    if manifest is not None and canary is not None and not canary.belongs_to(manifest, model):
        recorded = canary.weights_digest or canary.manifest_digest or ""
        raise ConfigError(
            f"the canary was recorded for weights with manifest digest {recorded[:16]}…, but the manifest given "
            f"({manifest.digest[:16]}…) describes other weights: they belong to different models; record the "
            "canary again with this manifest"
        )

    def report(
        ok: bool, weights: WeightReport | None, canary_r: CanaryReport | None, fp: Fingerprint | None
    ) -> SelfTestReport:
        return SelfTestReport(ok, weights, canary_r, fp, time.perf_counter() - start)

    weights = None
    if manifest is not None:
        weights = verify_weights(model, manifest, expected_digest=expected_digest, key=key, ignore=ignore)
        if not weights.ok and raise_on_failure:
            r = report(False, weights, None, None)
            raise IntegrityError(r.summary(), report=r)
    canary_report = None
    if canary is not None:
        canary_report = canary.verify(model, mode=canary_mode, tolerances=tolerances)
        if not canary_report.ok and raise_on_failure:
            r = report(False, weights, canary_report, None)
            raise CanaryError(r.summary(), report=r)
    ok = (weights is None or weights.ok) and (canary_report is None or canary_report.ok)
    fp = take_fingerprint(model) if fingerprint and ok else None
    return report(ok, weights, canary_report, fp)
