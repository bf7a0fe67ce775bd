"""What a watch reports: :class:`Snapshot` (since the last reset) and :class:`Record` (one flush).

Both carry the same fields, written and read by the same code: the activation statistics per
output position, first NaN/Inf records, counted failures, and one value per monitor (``drift``,
``latency``, ``inputs``, ``outputs``, ``timing``; the values of monitors added with
``attach(monitors=...)`` under ``extra``). :meth:`Record.from_json` reads back what
:meth:`Record.to_json` wrote (the report reads logs through it).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from . import values as _values
from ._schema import Fields
from .alerts import Alert, FirstNonFinite
from .formats import json_safe
from .stats import ModuleStats

# The record fields that hold a built-in monitor's value (any other monitor's is in ``extra``);
# their types come from the value registry (torchwatch/values.py), which each monitor's file fills.
MONITOR_FIELDS = ("drift", "latency", "inputs", "outputs", "timing", "identity")


@dataclass(frozen=True)
class Warmup:
    """How far the alert rules' baselines are learned (``snapshot().baselines``, ``record.baselines``).

    Attributes:
        series: baseline series kept by the rules (one per cohort, module and statistic).
        learning: how many of them are still in warm-up: no baseline alert can come from those.
        intervals_left: the most flush intervals any of them still needs (0 when all are learned).
    """

    series: int
    learning: int
    intervals_left: int

    def to_dict(self) -> dict[str, int]:
        return {"series": self.series, "learning": self.learning, "intervals_left": self.intervals_left}

    @classmethod
    def from_dict(cls, doc: object, where: str = "baselines") -> Warmup:
        f = Fields(doc, where)
        return cls(f.count("series"), f.count("learning"), f.count("intervals_left"))

    def __str__(self) -> str:
        if not self.learning:
            return f"all {self.series} baseline series learned"
        return (f"{self.learning} of {self.series} baseline series still learning (up to {self.intervals_left} more "
                "intervals): no baseline alert can come from them yet")  # fmt: skip


def _fields(stats: Mapping[str, ModuleStats], obj: Any) -> dict[str, Any]:
    """The fields a snapshot and a record share, as plain data."""
    return {
        "calls": obj.calls,
        "sampled": obj.sampled,
        "modules": {name: s.to_dict() for name, s in stats.items()},
        "nonfinite": {name: r.to_dict() for name, r in obj.nonfinite.items()},
        "errors": dict(obj.errors),
        "drift": {name: d.to_dict() for name, d in obj.drift.items()},
        "latency": obj.latency.to_dict() if obj.latency is not None else None,
        "inputs": {name: i.to_dict() for name, i in obj.inputs.items()},
        "outputs": obj.outputs.to_dict() if obj.outputs is not None else None,
        "timing": {name: t.to_dict() for name, t in obj.timing.items()},
        "identity": obj.identity.to_dict() if obj.identity is not None else None,
        **({"extra": {name: _plain(v) for name, v in obj.extra.items()}} if obj.extra else {}),
        **({"baselines": obj.baselines.to_dict()} if obj.baselines is not None else {}),
    }


def _plain(value: Any) -> Any:
    """A custom monitor's value as plain data: its ``to_dict()`` if it has one."""
    to_dict = getattr(value, "to_dict", None)
    return to_dict() if callable(to_dict) else value


def monitor_values(obj: Any) -> dict[str, Any]:
    """The monitors' values of a record or snapshot by name (the built-in fields not empty, then
    ``extra``): what the sinks export through the value registry."""
    out = {name: value for name in MONITOR_FIELDS if (value := getattr(obj, name)) is not None and value != {}}
    return {**out, **obj.extra}


def split_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """Monitor values by name as keyword arguments: the built-in ones by their own name, the others
    in ``extra`` (None values left out). Records, snapshots and rule intervals are made with it."""
    known = {k: v for k, v in values.items() if k in MONITOR_FIELDS and v is not None}
    return {**known, "extra": {k: v for k, v in values.items() if k not in MONITOR_FIELDS and v is not None}}


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
        drift: per drift-monitored module, its :class:`~torchwatch.DriftStatus`
            (score, p-value, alarm, windows); empty without ``attach(drift=...)``.
        latency: root-call latency since the last reset (:class:`~torchwatch.monitors.latency.LatencyStats`,
            ms; wall time on CPU, CUDA-event time on GPU, device time of calls still running not yet
            included); None in a cohort snapshot.
        inputs: per root-call input position, its :class:`~torchwatch.InputStats` (empty in a
            cohort snapshot); float inputs' ModuleStats are under the same ``"<input>"`` names.
        outputs: :class:`~torchwatch.OutputQuality` with ``attach(outputs=...)`` (None otherwise
            and in a cohort snapshot).
        timing: per module, :class:`~torchwatch.monitors.latency.LatencyStats` with ``attach(timing=True)``.
        extra: the values of monitors added with ``attach(monitors=...)``, by name.
        baselines: how far the rules' baselines are learned (:class:`Warmup`), as of the last
            flush; None when no rule learns one.
        identity: the :class:`~torchwatch.Identity` of the replica that made it.

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
        extra: Mapping[str, Any] | None = None,
        baselines: Warmup | None = None,
        identity: Any = None,
    ) -> None:
        self._stats = dict(stats)
        self.baselines = baselines
        self.identity = identity
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
        self.extra: dict[str, Any] = dict(extra or {})

    @classmethod
    def of(cls, stats: Mapping[str, ModuleStats], *, values: Mapping[str, Any], **fields: Any) -> Snapshot:
        """A snapshot with the monitors' ``values`` by name."""
        return cls(stats, **fields, **split_values(values))

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
        "inputs", "outputs", "timing"}`` (and ``"extra"`` with monitors added by ``attach(monitors=...)``)."""
        return {"cohort": self.cohort, **_fields(self._stats, self)}

    def __repr__(self) -> str:
        bad = sum(1 for s in self._stats.values() if s.nonfinite)
        return (
            f"Snapshot({len(self._stats)} positions, calls={self.calls}, sampled={self.sampled}, non-finite in {bad})"
        )


@dataclass(frozen=True)
class Record:
    """One flush: the statistics of the root calls since the previous flush.

    Attributes:
        step: root calls of the watched model seen so far (the x axis of every chart).
        time: Unix time of the flush.
        calls: root calls in this interval; ``sampled`` of them were measured.
        stats: per output position (``fqn``, ``fqn[1]``, ``fqn.key``), the interval's statistics.
        alerts: alerts raised in this interval.
        nonfinite: modules whose first NaN/Inf (since the last reset) fell in this interval.
        errors: hook and sink failures so far, by module or sink.
        drift: per drift-monitored module, its :class:`~torchwatch.DriftStatus` after
            the windows completed in this interval (empty without ``attach(drift=...)``).
        latency: root-call latency in the interval (:class:`~torchwatch.monitors.latency.LatencyStats`:
            count, mean, max, p50/p95/p99 in ms; wall time on CPU, CUDA-event time on GPU), or None.
        inputs: per root-call input position, its :class:`~torchwatch.InputStats` (channel means,
            integer frequencies); float inputs' ModuleStats are in ``stats`` under the same name.
        outputs: the interval's :class:`~torchwatch.OutputQuality` with ``attach(outputs=...)``, or None.
        timing: per module, its :class:`~torchwatch.monitors.latency.LatencyStats` with ``attach(timing=True)``.
        extra: the values of monitors added with ``attach(monitors=...)``, by name.
        merged: automatic flushes folded into this record because the watch's writer thread was
            behind (slow sinks, a busy process): the record covers their calls too; nothing is
            dropped. 0 normally.
        baselines: how far the rules' baselines are learned after this interval (:class:`Warmup`);
            None when no rule learns one.
        identity: the :class:`~torchwatch.Identity` of the replica that made it (host, process,
            rank, device, versions); its alerts are written with its ``replica`` name.
    """

    step: int
    time: float
    calls: int
    sampled: int
    stats: Mapping[str, ModuleStats]
    alerts: tuple[Alert, ...] = ()
    nonfinite: Mapping[str, FirstNonFinite] = field(default_factory=dict)
    errors: Mapping[str, int] = field(default_factory=dict)
    drift: Mapping[str, Any] = field(default_factory=dict)
    latency: Any = None
    inputs: Mapping[str, Any] = field(default_factory=dict)
    outputs: Any = None
    timing: Mapping[str, Any] = field(default_factory=dict)
    merged: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)
    baselines: Warmup | None = None
    identity: Any = None

    @classmethod
    def of(cls, *, values: Mapping[str, Any], **fields: Any) -> Record:
        """A record with the monitors' ``values`` by name."""
        return cls(**fields, **split_values(values))

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: NaN and infinities become ``null``."""
        return json_safe(
            {
                "step": self.step,
                "time": self.time,
                **_fields(self.stats, self),
                "alerts": [a.to_dict() for a in self.alerts],
                "merged": self.merged,
            }
        )

    def __post_init__(self) -> None:
        """Its alerts carry the name of the replica that raised them (this record's identity)."""
        if self.identity is not None and any(a.replica is None for a in self.alerts):
            name = self.identity.replica
            stamped = tuple(a if a.replica is not None else replace(a, replica=name) for a in self.alerts)
            object.__setattr__(self, "alerts", stamped)

    @classmethod
    def from_json(cls, doc: object, where: str = "record") -> Record:
        """A record read back from :meth:`to_json` (a JSONL line), every field checked.

        Statistics, alerts, non-finite records and every monitor value whose type is registered
        (:mod:`torchwatch.values`: drift, latency, timing, histograms, ...) come back as their
        types; a JSON record holds only summaries of ``inputs`` and ``outputs`` (the ``to_dict`` of
        :class:`~torchwatch.InputStats` and :class:`~torchwatch.OutputQuality`), which come back
        as plain mappings, as do the values of unregistered monitors in ``extra``. Fields a newer
        writer added are ignored; missing optional ones are empty.

        Raises:
            FormatError: not an object, or a field of the wrong type; the message names
                ``where`` and the field.
        """
        f = Fields(doc, where)
        baselines = f.obj("baselines", optional=True)
        extra = f.obj("extra", optional=True)
        monitors = {name: _values.decode(name, raw, f"{where}, {name}") for name in MONITOR_FIELDS
                    if (raw := f.get(name)) is not None}  # fmt: skip
        return cls(
            step=f.int("step"), time=f.float("time"), calls=f.count("calls"), sampled=f.count("sampled"),
            stats={name: ModuleStats.from_dict(m.doc, m.where) for name, m in f.items("modules")},
            alerts=tuple(
                Alert.from_dict(a, f"{where}, alerts[{i}]") for i, a in enumerate(f.list("alerts"))
            ),
            nonfinite={name: FirstNonFinite.from_dict(n.doc, n.where) for name, n in f.items("nonfinite")},
            errors=f.counts("errors"),
            **monitors, merged=f.count("merged"),
            extra={name: _values.decode(name, raw, f"{where}, extra.{name!r}") for name, raw in extra.doc.items()}
            if extra is not None else {},
            baselines=Warmup.from_dict(baselines.doc, baselines.where) if baselines is not None else None,
        )  # fmt: skip
