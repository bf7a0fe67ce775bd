"""A flushed interval on its way from the serving thread to the sinks.

The serving thread cuts an :class:`Interval` (each monitor's ``take()``: host state, device copies
started; the alerts of the interval); the worker thread collects it, runs the rules on it and turns
it into :class:`RecordParts`, which merge when the sinks are behind, and finally into one
:class:`~torchwatch.Record`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..alerts import Alert, FirstNonFinite
from ..monitors.base import Monitor
from ..records import Record, Warmup
from ..stats import ModuleStats, merge_all


@dataclasses.dataclass
class Interval:
    """What one flush cut off on the serving thread, for the worker to finish."""

    step: int  # eager root calls so far
    calls: int
    sampled: int
    alerts: list[Alert]
    taken: list[tuple[Monitor, Any]]  # each monitor's take(), the activation statistics first
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
    values: dict[str, Any]  # each monitor's collected value, by name
    merged: int
    baselines: Warmup | None = None  # the rules' warm-up after the latest interval

    def merge(self, later: RecordParts, monitors: Sequence[Monitor]) -> RecordParts:
        """These intervals followed by ``later``'s, as one (counts add, statistics merge)."""
        values = {
            m.name: m.merge(self.values[m.name], later.values[m.name])
            if m.name in self.values
            else later.values[m.name]
            for m in monitors
        }
        return RecordParts(
            step=later.step, time=later.time, calls=self.calls + later.calls, sampled=self.sampled + later.sampled,
            stats=self.stats + later.stats, alerts=self.alerts + later.alerts,
            nonfinite={**later.nonfinite, **self.nonfinite},  # the first occurrence wins
            values=values, merged=self.merged + later.merged + 1, baselines=later.baselines,
        )  # fmt: skip

    def record(
        self, order: Callable[[Iterable[str]], list[str]], errors: dict[str, int], monitors: Sequence[Monitor]
    ) -> Record | None:
        """The :class:`Record` for the sinks, or None when nothing at all happened."""
        active = any(m.active(self.values[m.name]) for m in monitors)
        if not (self.calls or self.stats or self.alerts or self.nonfinite or active):
            return None
        per_name: dict[str, list[ModuleStats]] = {}
        for (_, name), s in self.stats:
            per_name.setdefault(name, []).append(s)
        return Record.of(
            step=self.step, time=self.time, calls=self.calls, sampled=self.sampled,
            stats={name: merge_all(per_name[name]) for name in order(per_name)}, alerts=tuple(self.alerts),
            nonfinite=self.nonfinite, errors=errors, merged=self.merged, baselines=self.baselines,
            values={m.name: m.publish(self.values[m.name]) for m in monitors},
        )  # fmt: skip
