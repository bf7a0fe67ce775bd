"""``tw.Capture``: what to capture when an alert fires, where, and within which bounds."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

from .. import _validate
from ..errors import ConfigError
from ..integrity.manifest import Manifest

TRIP = "trip"  # in Capture.on: every alert that trips the watch (NaN/Inf, cast overflow limits, fingerprint)
TRIPPING = frozenset({"nonfinite", "fingerprint"})  # rules that always trip (a device's NaN/Inf alert is
# published apart from its trip)


@dataclasses.dataclass(frozen=True)
class Capture:
    """Write an incident bundle for the call behind an alert: ``tw.attach(model, capture=tw.Capture(dir))``.

    A bundle (:mod:`torchwatch.capture.bundle`) holds the trigger alert, the call's labels and
    time, the per-module statistics of that very call (CPU; on accelerators those of its flush
    interval, said so in the bundle), the weights' fingerprint, the settings that decide numerics
    and, with ``inputs=True``, the call's arguments and outputs, so that ``torchwatch replay``
    can run it again in a sandbox. ``tw.Incident.load(path)`` reads one. Each bundle written is
    announced by a ``"captured"`` alert naming its path and the replay command (it does not trip).

    Which calls can be captured: on CPU, the call that raised NaN/Inf, or whose output positions
    break a :class:`~torchwatch.rules.CastRange` that trips (default: any value that would
    overflow float16/bfloat16) or is named in ``on``, is known when it ends: its arguments are
    only referenced during the call and copied then, at the cost of one copy per captured
    incident. Alerts decided at a flush (drift, control charts, any rule on an accelerator,
    accelerator NaN/Inf) can only capture a call whose inputs were kept: the last ``keep`` sampled
    calls (copied on the device, asynchronously; never a host sync in a hook). A trigger whose
    call was not kept is counted in ``watch.errors["captures missed"]``.

    Args:
        directory: where bundles go (created, mode 0700); ``captures.jsonl`` indexes them.
        inputs: keep the call's arguments and outputs (off by default: a bundle then holds the
            statistics only, and cannot be replayed). Turn on only where the data may be stored.
        redact: with ``inputs``, ``redact(tree) -> tree`` applied to ``{"args": ..., "kwargs": ...}``
            and to the outputs before anything is written (on the capture's writer thread); if it
            raises, nothing of that call is written (counted in ``watch.errors["captures not written"]``).
        on: what triggers a capture: ``"trip"`` (every tripping alert: NaN/Inf with its origin,
            a tripping cast overflow, a fingerprint change — what opens a
            :class:`~torchwatch.CircuitBreaker`) and rule names (``"drift"``, a rule's ``name``).
            :meth:`torchwatch.Watch.capture` captures a call by its trace id on demand.
        keep: recent sampled calls whose inputs are kept for captures decided after the call
            ends (None: 4 for a model on an accelerator, 0 for a CPU model).
        max_bundle_bytes: a call's tensors larger than this are not stored (the bundle keeps
            the statistics; counted in ``watch.errors["captures over limit"]``).
        max_per_hour: bundles written per hour at most (the rest counted there too).
        max_total_bytes: bundles on disk in ``directory`` at most (the rest counted there too).
        manifest: the validated :class:`~torchwatch.Manifest` (or its path): its digest goes
            into each bundle, for the replay to check the sandbox's weights.

    Raises:
        ConfigError: a bad option.

    Example:
        >>> import tempfile, torch, torchwatch as tw
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> capture = tw.Capture(tempfile.mkdtemp(), inputs=True)
        >>> with tw.attach(model, capture=capture, on_nonfinite="ignore") as watch:
        ...     _ = model(torch.tensor([[float("nan"), 1.0]]))
        >>> incident = tw.Incident.load(tw.Incident.list(capture.directory)[0])
        >>> incident.trigger.rule, incident.trigger.module, incident.args[0].shape
        ('nonfinite', '<input>', torch.Size([1, 2]))
    """

    directory: str | os.PathLike[str]
    inputs: bool = False
    redact: Callable[[Any], Any] | None = None
    on: tuple[str, ...] = (TRIP,)
    keep: int | None = None
    max_bundle_bytes: int = 64 << 20
    max_per_hour: int = 12
    max_total_bytes: int = 1 << 30
    manifest: Any = None

    def __post_init__(self) -> None:
        owner = "Capture"
        set_ = object.__setattr__
        set_(self, "directory", _validate.path(owner, "directory", self.directory))
        _validate.flag(owner, "inputs", self.inputs)
        _validate.function(owner, "redact", self.redact, optional=True)
        if self.redact is not None and not self.inputs:
            raise ConfigError("Capture: redact= applies to kept inputs; pass inputs=True too (or leave redact out)")
        set_(self, "on", tuple(_validate.strings(owner, "on", self.on, allow_empty=True)))
        set_(self, "keep", _validate.optional(_validate.integer, owner, "keep", self.keep, low=0, high=64))
        for name in ("max_bundle_bytes", "max_per_hour", "max_total_bytes"):
            _validate.integer(owner, name, getattr(self, name), low=1)
        set_(self, "manifest", _manifest_digest(self.manifest))

    def wants(self, rule: str, trips: bool) -> bool:
        """Whether an alert of ``rule`` (tripping or not) triggers a capture."""
        return rule in self.on or (TRIP in self.on and (trips or rule in TRIPPING))


def _manifest_digest(manifest: Any) -> str | None:
    """The digest of a manifest given as an object with ``digest``, a path, or None."""
    if manifest is None:
        return None
    digest = getattr(manifest, "digest", None)
    if isinstance(digest, str):
        return digest
    if isinstance(manifest, (str, os.PathLike)):
        return Manifest.load(manifest).digest
    raise ConfigError(f"Capture: manifest must be a tw.Manifest or a path, got {type(manifest).__name__}")
