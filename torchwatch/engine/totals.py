"""What a watch measured since the last reset: the one place intervals are added up.

A monitor holds only its window; every flush adds the interval here (each monitor's value with
its own ``merge``, the positions' statistics, the first NaN/Inf record of each position, the
calls), and a snapshot is these totals merged with the current window.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from ..alerts import FirstNonFinite
from ..monitors.base import Collect, Monitor, Position
from ..stats import ModuleStats, merge_all


class Totals:
    """Totals since the reset; the worker adds to them, snapshots read them (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.clear()

    def clear(self) -> None:
        with self._lock:
            self.calls = self.sampled = 0
            self._values: dict[str, Any] = {}
            self._positions: dict[Position, ModuleStats] = {}  # in first-measured order
            self._first: dict[str, FirstNonFinite] = {}

    def add(self, calls: int, sampled: int, values: Mapping[str, Any], ctx: Collect,
            monitors: Mapping[str, Monitor]) -> dict[str, FirstNonFinite]:  # fmt: skip
        """Add one flushed interval; returns its positions' first NaN/Inf records since the reset."""
        with self._lock:
            self.calls += calls + ctx.calls
            self.sampled += sampled + ctx.sampled
            for name, value in values.items():
                known = self._values.get(name)
                self._values[name] = value if name not in self._values else monitors[name].merge(known, value)
            for key, s in ctx.stats:
                total = self._positions.get(key)
                self._positions[key] = s if total is None else total.merge(s)
            new = {name: first for name, first in ctx.nonfinite.items() if name not in self._first}
            self._first.update(new)
        return new

    def with_window(
        self, window: Mapping[str, Any], ctx: Collect, monitors: list[Monitor], cohort: str | None
    ) -> tuple[dict[str, ModuleStats], dict[str, FirstNonFinite], dict[str, Any]]:
        """The totals merged with a snapshot's window (``cohort``: that cohort's statistics and
        NaN/Inf records, and only the monitors shown per cohort): statistics per position, first
        NaN/Inf records, and each monitor's view of its value."""
        with self._lock:
            totals = dict(self._values)
            positions = list(self._positions.items())
            first = {**ctx.nonfinite, **self._first}  # the first occurrence wins
        per_name: dict[str, list[ModuleStats]] = {}
        for (c, name), s in positions + ctx.stats:
            if cohort is None or c == cohort:
                per_name.setdefault(name, []).append(s)
        if cohort is not None:
            first = {k: v for k, v in first.items() if v.cohort == cohort}
        shown = {}
        for monitor in monitors:
            name = monitor.name
            if cohort is not None and not monitor.cohort_snapshot:
                continue
            if name in totals and name in window:
                shown[name] = monitor.view(monitor.merge(totals[name], window[name]))
            elif name in totals or name in window:
                shown[name] = monitor.view(totals[name] if name in totals else window[name])
        return {name: merge_all(v) for name, v in per_name.items()}, first, shown
