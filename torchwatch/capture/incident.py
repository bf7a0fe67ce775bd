"""``tw.Incident``: a captured incident bundle, read and checked, and its replay (:mod:`.verdict`)."""

from __future__ import annotations

import os
from typing import Any

import torch

from .. import formats
from .._files import parse_json, read_regular, shown
from ..alerts import Alert
from ..errors import ConfigError, FormatError
from . import bundle
from .verdict import ReplayReport, judge


class Incident:
    """A captured incident bundle, read and checked (``tw.Incident.load(path)``).

    Attributes:
        path: the bundle file.
        trigger: the :class:`~torchwatch.Alert` that captured it.
        call, trace_id, cohort, time: the call's index and labels, and when it ran.
        args, kwargs, outputs: what the call was given and returned (None when the capture kept
            the statistics only).
        stats: per position, the capture's statistics (of the call itself on CPU; see
            ``meta["stats_scope"]``), or None.
        environment: the settings that decided its numerics (versions, device, threads, TF32, autocast).
        meta: the whole JSON story of the bundle.

    Example:
        >>> import math, tempfile, torch, torchwatch as tw
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh())
        >>> capture = tw.Capture(tempfile.mkdtemp(), inputs=True)
        >>> with tw.attach(model, capture=capture, on_nonfinite="ignore"):
        ...     _ = model(torch.tensor([[1.0, math.inf]]))
        >>> incident = tw.Incident.load(tw.Incident.list(capture.directory)[0])
        >>> incident.trigger.module, incident.stats["<input>"].posinf, incident.meta["stats_scope"]
        ('<input>', 1, 'call')
        >>> incident.replay(model).culprit
        'data'
    """

    def __init__(self, data: bundle.Bundle) -> None:
        self.path = data.path
        self.meta = data.meta
        self.trigger = Alert.from_dict(data.meta["trigger"], f"{data.path}: trigger")
        self.call = int(data.meta["call"])
        self.trace_id = data.meta.get("trace_id")
        self.cohort = data.meta.get("cohort")
        self.time = float(data.meta["time"])
        self.args, self.kwargs, self.outputs, self.stats = data.args, data.kwargs, data.outputs, data.stats
        environment = data.meta.get("environment")
        self.environment: dict[str, Any] = environment if isinstance(environment, dict) else {}

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Incident:
        """Read a bundle. Raises :class:`~torchwatch.FormatError` for anything malformed."""
        return cls(bundle.read(path))

    @staticmethod
    def list(directory: str | os.PathLike[str]) -> list[str]:
        """The bundles a capture directory's index lists that still exist, oldest first ([] when
        nothing was captured there yet).

        Raises:
            FormatError: the directory does not exist, or its ``captures.jsonl`` is not a capture index.
        """
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise FormatError(f"capture directory {shown(directory)} does not exist")
        index = os.path.join(directory, bundle.INDEX)
        if not os.path.lexists(index):
            return []
        return [path for path, _ in bundle.indexed(index) if os.path.isfile(path)]

    def replay(self, model: torch.nn.Module, *, manifest: Any = None) -> ReplayReport:
        """Run the captured call again on ``model`` (freshly loaded, on the device it should run
        on) and name the culprit (see the module docstring).

        Args:
            model: the model, built and loaded the way serving loads it.
            manifest: the validated :class:`~torchwatch.Manifest` or its path: the sandbox's
                weights are checked against it first (a mismatch is a note: the sandbox is not clean).

        Raises:
            ConfigError: the bundle holds no inputs (captured with ``inputs=False``), or an
                argument the capture could only name (its type).
        """
        if self.args is None:
            raise ConfigError(
                f"{self.path} holds the statistics only (captured without Capture(inputs=True)); it cannot be replayed"
            )
        opaque = bundle.opaque_leaves((self.args, self.kwargs))
        if opaque:
            raise ConfigError(
                f"{self.path}: {_argument(opaque[0].at)} was an instance of {opaque[0].type}, which the capture could "
                "not store; this call cannot be replayed as captured"
            )
        return judge(self, model, manifest)

    def __repr__(self) -> str:
        t = self.trigger
        return f"Incident({t.rule} on {t.module!r}, call {self.call}, {os.path.basename(self.path)})"


def read_verdict(bundle_path: str) -> dict[str, Any] | None:
    """The replay verdict saved beside a bundle, or None (unreadable verdicts read as None)."""
    path = f"{bundle_path}.replay.json"
    if not os.path.isfile(path):
        return None
    try:
        doc = parse_json(read_regular(path, "replay verdict", limit=64 << 20), path)
    except (FormatError, OSError):
        return None
    return doc if isinstance(doc, dict) and doc.get("format") == formats.REPLAY else None


def _argument(at: str) -> str:
    """``".kwargs.mask"`` -> ``"keyword argument 'mask'"``, ``".args[0][1]"`` -> ``"positional argument 0 at [1]"``."""
    if at.startswith(".kwargs."):
        key, _, rest = at[len(".kwargs.") :].partition(".")
        return f"keyword argument {key!r}" + (f" at .{rest}" if rest else "")
    if at.startswith(".args["):
        index, _, rest = at[len(".args[") :].partition("]")
        return f"positional argument {index}" + (f" at {rest}" if rest else "")
    return f"argument {at}"
