"""A flushed interval on its way from the serving thread to the sinks.

The serving thread cuts an :class:`Interval` (host accumulators, device reads being copied,
alerts, first NaN/Inf records); the writer thread folds it (device reads into a
:class:`DevicePart`), runs the rules on it and turns it into :class:`RecordParts`, which merge
when the sinks are behind, and finally into one :class:`~torchwatch.Record`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from ._table import DeviceTable
from .alerts import Alert, FirstNonFinite
from .latency import LatencySketch
from .sinks.base import Record
from .stats import ModuleStats, merge_all


@dataclasses.dataclass
class Interval:
    """What one flush cut off on the serving thread, for the worker to finish."""

    step: int  # eager root calls so far
    calls: int
    sampled: int
    window: dict[tuple[str | None, str], Any]  # host accumulators
    reads: list[tuple[DeviceTable, object]]  # device halves being copied
    alerts: list[Alert]
    nonfinite: dict[str, FirstNonFinite]
    drift: Any
    edges: tuple[dict[str, Any], Any]
    merged: int  # automatic flushes folded into this one because the worker was behind


@dataclasses.dataclass
class RecordParts:
    """One or more flushed intervals on their way to becoming one :class:`Record` (worker thread)."""

    step: int
    time: float
    calls: int
    sampled: int
    stats: list[tuple[tuple[str | None, str], ModuleStats]]  # per (cohort, position), one item per interval
    alerts: list[Alert]
    nonfinite: dict[str, FirstNonFinite]
    drift: dict[str, Any]
    latency: LatencySketch
    inputs: dict[str, Any]
    outputs: Any
    timing: dict[str, LatencySketch]
    merged: int

    def merge(self, later: RecordParts) -> RecordParts:
        """These intervals followed by ``later``'s, as one (counts add, statistics merge)."""
        inputs = dict(self.inputs)
        for name, stats in later.inputs.items():
            inputs[name] = inputs[name].merge(stats) if name in inputs else stats
        outputs = self.outputs
        if later.outputs is not None:
            outputs = later.outputs if outputs is None else outputs.merge(later.outputs)
        timing = {n: self.timing[n].merge(t) if n in self.timing else t for n, t in later.timing.items()}
        return RecordParts(
            step=later.step, time=later.time, calls=self.calls + later.calls, sampled=self.sampled + later.sampled,
            stats=self.stats + later.stats, alerts=self.alerts + later.alerts,
            nonfinite={**later.nonfinite, **self.nonfinite},  # the first occurrence wins
            drift={**self.drift, **later.drift}, latency=self.latency.merge(later.latency), inputs=inputs,
            outputs=outputs, timing={**self.timing, **timing}, merged=self.merged + later.merged + 1,
        )  # fmt: skip

    def record(self, order: Callable[[Iterable[str]], list[str]], errors: dict[str, int]) -> Record | None:
        """The :class:`Record` for the sinks, or None when nothing at all happened."""
        labelled = self.outputs is not None and self.outputs.labelled
        if not (self.calls or self.stats or self.alerts or self.nonfinite or labelled):
            return None
        per_name: dict[str, list[ModuleStats]] = {}
        for (_, name), s in self.stats:
            per_name.setdefault(name, []).append(s)
        return Record(
            step=self.step, time=self.time, calls=self.calls, sampled=self.sampled,
            stats={name: merge_all(per_name[name]) for name in order(per_name)}, alerts=tuple(self.alerts),
            nonfinite=self.nonfinite, errors=errors, drift=self.drift, latency=self.latency.stats(),
            inputs=self.inputs, outputs=self.outputs,
            timing={n: t.stats() for n, t in self.timing.items() if t.count}, merged=self.merged,
        )  # fmt: skip


@dataclasses.dataclass
class DevicePart:
    """Device window reads, folded (by ``Watch._device_reads``, for flushes and snapshots alike)."""

    calls: int = 0
    sampled: int = 0
    stats: list[tuple[tuple[str | None, str], ModuleStats]] = dataclasses.field(default_factory=list)
    counts: dict[str, tuple[int, int, int]] = dataclasses.field(default_factory=dict)  # NaN, +Inf, -Inf
    firsts: dict[str, FirstNonFinite] = dataclasses.field(default_factory=dict)
