"""A read-only view of what a watch has measured since its last reset."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from .alerts import FirstNonFinite
from .stats import ModuleStats


class Snapshot(Mapping[str, ModuleStats]):
    """Statistics per output position, since the last :meth:`Watch.reset`.

    Keys are fully-qualified module names (``""`` for the watched model itself), with the output
    position appended for every tensor but the first: ``fqn[1]``, ``fqn.key``. Keys are in the
    order the positions were first measured, which is execution order.

    Attributes:
        calls: root calls of the watched model since the last reset.
        sampled: how many of them were measured (``every=N`` sampling).
        cohort: the cohort this snapshot is restricted to (``None``: all calls).
        nonfinite: for each position that produced NaN/Inf, where it first did
            (:class:`FirstNonFinite`: root call, trace id, and the origin module of that call).
        errors: what :attr:`Watch.errors` counts: failures caught (never raised to the caller) and
            anything not recorded, by kind.
        drift: per drift-monitored module, its :class:`~torchwatch.drift.DriftStatus`
            (score, p-value, alarm, windows); empty without ``attach(drift=...)``.
        latency: root-call latency since the last reset (:class:`~torchwatch.latency.LatencyStats`,
            ms; wall time on CPU, CUDA-event time on GPU, device time of calls still running not yet
            included); None in a cohort snapshot.
        inputs: per root-call input position, its :class:`~torchwatch.InputStats` (empty in a
            cohort snapshot); float inputs' ModuleStats are under the same ``"<input>"`` names.
        outputs: :class:`~torchwatch.OutputQuality` with ``attach(outputs=...)`` (None otherwise
            and in a cohort snapshot).
        timing: per module, :class:`~torchwatch.latency.LatencyStats` with ``attach(timing=True)``.

    Example:
        >>> import torch, torchwatch as tw
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
        >>> with tw.attach(model) as watch:
        ...     _ = model(torch.randn(2, 4))
        ...     snap = watch.snapshot()
        >>> list(snap), snap["1"].calls, snap.calls
        (['<input>', '0', '1'], 1, 1)
    """

    def __init__(
        self,
        stats: Mapping[str, ModuleStats],
        *,
        calls: int,
        sampled: int,
        cohort: str | None = None,
        nonfinite: Mapping[str, FirstNonFinite] | None = None,
        errors: Mapping[str, int] | None = None,
        drift: Mapping[str, Any] | None = None,
        latency: Any = None,
        inputs: Mapping[str, Any] | None = None,
        outputs: Any = None,
        timing: Mapping[str, Any] | None = None,
    ) -> None:
        self._stats = dict(stats)
        self.calls = calls
        self.sampled = sampled
        self.cohort = cohort
        self.nonfinite: dict[str, FirstNonFinite] = dict(nonfinite or {})
        self.errors: dict[str, int] = dict(errors or {})
        self.drift: dict[str, Any] = dict(drift or {})
        self.latency = latency
        self.inputs: dict[str, Any] = dict(inputs or {})
        self.outputs = outputs
        self.timing: dict[str, Any] = dict(timing or {})

    def __getitem__(self, name: str) -> ModuleStats:
        try:
            return self._stats[name]
        except KeyError:
            raise KeyError(
                f"{name!r} has no statistics in this snapshot; measured positions: {list(self._stats)[:8]}"
                f"{' ...' if len(self._stats) > 8 else ''}"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._stats)

    def __len__(self) -> int:
        return len(self._stats)

    def to_dict(self) -> dict[str, Any]:
        """Plain data: ``{"calls", "sampled", "cohort", "modules", "nonfinite", "errors", "drift", "latency",
        "inputs", "outputs", "timing"}``."""
        return {
            "calls": self.calls,
            "sampled": self.sampled,
            "cohort": self.cohort,
            "modules": {name: s.to_dict() for name, s in self._stats.items()},
            "nonfinite": {name: r.to_dict() for name, r in self.nonfinite.items()},
            "errors": dict(self.errors),
            "drift": {name: d.to_dict() for name, d in self.drift.items()},
            "latency": self.latency.to_dict() if self.latency is not None else None,
            "inputs": {name: i.to_dict() for name, i in self.inputs.items()},
            "outputs": self.outputs.to_dict() if self.outputs is not None else None,
            "timing": {name: t.to_dict() for name, t in self.timing.items()},
        }

    def __repr__(self) -> str:
        bad = sum(1 for s in self._stats.values() if s.nonfinite)
        return (
            f"Snapshot({len(self._stats)} positions, calls={self.calls}, sampled={self.sampled}, non-finite in {bad})"
        )
