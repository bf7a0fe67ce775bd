"""A flushed interval on its way from the serving thread to the sinks.

The serving thread makes a :class:`Cut` (each monitor's ``take()``: host state, device copies
started; the alerts of the interval); the worker thread collects it, runs the rules on it and turns
it into :class:`RecordParts`, which merge when the sinks are behind, and finally into one
:class:`~torchwatch.Record`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ..alerts import Alert, FirstNonFinite
from ..monitors.base import Monitor, Position
from ..records import Record, Warmup
from ..stats import ModuleStats, merge_all


@dataclasses.dataclass
class Cut:
    """What one flush cut off on the serving thread, for the worker to finish."""

    step: int  # eager root calls so far
    calls: int
    sampled: int
    alerts: list[Alert]
    taken: list[tuple[Monitor, Any]]  # each monitor's take(), in the monitors' order
    merged: int  # automatic flushes folded into this one because the worker was behind


@dataclasses.dataclass
class RecordParts:
    """One or more flushed intervals on their way to becoming one :class:`Record` (worker thread)."""

    step: int
    time: float
    calls: int
    sampled: int
    stats: list[tuple[Position, ModuleStats]]  # per (cohort, position), in execution order, one item per interval
    alerts: list[Alert]
    nonfinite: dict[str, FirstNonFinite]
    values: dict[str, Any]  # each monitor's collected value, by name
    published: dict[str, Any] | None  # what the record shows of them (None: to publish again after a merge)
    merged: int
    baselines: Warmup | None = None  # the rules' warm-up after the latest interval

    def merge(self, later: RecordParts, monitors: Mapping[str, Monitor]) -> RecordParts:
        """These intervals followed by ``later``'s, as one (counts add, statistics merge)."""
        values = dict(self.values)
        for name, value in later.values.items():
            values[name] = monitors[name].merge(values[name], value) if name in values else value
        return RecordParts(
            step=later.step, time=later.time, calls=self.calls + later.calls, sampled=self.sampled + later.sampled,
            stats=self.stats + later.stats, alerts=self.alerts + later.alerts,
            nonfinite={**later.nonfinite, **self.nonfinite},  # the first occurrence wins
            values=values, published=None, merged=self.merged + later.merged + 1, baselines=later.baselines,
        )  # fmt: skip

    def record(self, errors: dict[str, int], monitors: Mapping[str, Monitor]) -> Record | None:
        """The :class:`Record` for the sinks, or None when nothing at all happened."""
        active = any(monitors[name].active(value) for name, value in self.values.items())
        if not (self.calls or self.stats or self.alerts or self.nonfinite or active):
            return None
        per_name: dict[str, list[ModuleStats]] = {}
        for (_, name), s in self.stats:
            per_name.setdefault(name, []).append(s)
        published = self.published
        if published is None:
            published = {name: monitors[name].view(value) for name, value in self.values.items()}
        return Record.of(
            step=self.step, time=self.time, calls=self.calls, sampled=self.sampled,
            stats={name: merge_all(v) for name, v in per_name.items()}, alerts=tuple(self.alerts),
            nonfinite=self.nonfinite, errors=errors, merged=self.merged, baselines=self.baselines, values=published,
        )  # fmt: skip
