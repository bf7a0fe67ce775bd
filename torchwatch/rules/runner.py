"""Running the rules on one flushed interval (the watch's worker thread).

The engine hands over the interval and its collect context; the alerts found go out the way every
alert of a flush does, ``ctx.alert`` (into the watch's alert bus, which keeps, counts and warns,
and into the record being made). The bus knows nothing of rules: this file is the one place that
calls them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from ..alerts import Alert
from ..stats import ModuleStats, merge_all
from .interval import Interval, Rule, rule_name, trips


class Failures(Protocol):
    """What the runner needs of a watch's alert bus for a rule that raises."""

    def count(self, kind: str, n: int = 1) -> None: ...

    def warn_once(self, key: str, message: str) -> None: ...


class Context(Protocol):
    """What the runner needs of a flush's collect context (``torchwatch.monitors.Collect``)."""

    bus: Failures

    def alert(self, alert: Alert, *, trip: bool = False, warn: str = "module") -> None: ...


def run_rules(
    rules: Iterable[Any],
    step: int,
    now: float,
    stats: list[tuple[tuple[str | None, str], ModuleStats]],
    values: Mapping[str, Any],
    ctx: Context,
) -> None:
    """Evaluate ``rules`` on one interval, once per cohort; the monitors' ``values`` (drift,
    latency, inputs, outputs, ...) only in the all-cohorts interval. A rule that raises is
    counted (``watch.errors["rule:<name>"]``) and warned once; the other rules go on."""
    by_cohort: dict[str | None, dict[str, list[ModuleStats]]] = {None: {}}
    for (cohort, name), s in stats:
        by_cohort.setdefault(cohort, {}).setdefault(name, []).append(s)
    for cohort, per_name in by_cohort.items():
        merged = {n: merge_all(v) for n, v in per_name.items()}
        if cohort is None:
            interval = Interval.of(step, now, None, merged, values)
        else:
            interval = Interval(step, now, cohort, merged)
        for rule in rules:
            try:
                found = list((rule.evaluate if isinstance(rule, Rule) else rule)(interval) or ())
            except Exception as exc:  # noqa: BLE001 - a broken rule never stops the flush
                name = rule_name(rule)
                ctx.bus.count(f"rule:{name}")
                ctx.bus.warn_once(f"rule:{name}", f"rule {name!r} raised {exc!r}; counted in watch.errors")
                continue
            trip = trips(rule)
            for alert in found:
                if isinstance(alert, Alert):
                    # one warning per rule: a fault that moves every module must not flood the log
                    ctx.alert(alert, trip=trip, warn="rule")
