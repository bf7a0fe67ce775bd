"""What a rule sees (:class:`Interval`) and what a rule is (:class:`Rule`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..alerts import Alert
from ..records import split_values
from ..stats import ModuleStats


@dataclass(frozen=True)
class Interval:
    """What a rule sees: one cohort's statistics over one flush interval.

    Attributes:
        step: root calls of the watched model so far (the end of the interval).
        time: Unix time of the flush.
        cohort: the ``watch.context(cohort=...)`` label, or None.
        stats: per output position, the interval's :class:`ModuleStats`.
        drift: per drift-monitored module, its status (cohort None only).
        latency: root-call latency of the interval (cohort None only; all calls), or None.
        inputs: per root-call input position, its :class:`~torchwatch.InputStats` (cohort None only).
        outputs: the interval's :class:`~torchwatch.OutputQuality` with ``attach(outputs=...)``
            (cohort None only), or None.
        timing: per module, its latency with ``attach(timing=True)`` (cohort None only).
        extra: the values of monitors added with ``attach(monitors=...)``, by name (cohort None only).
        identity: the :class:`~torchwatch.Identity` of the replica (cohort None only).
    """

    step: int
    time: float
    cohort: str | None
    stats: Mapping[str, ModuleStats]
    drift: Mapping[str, Any] = field(default_factory=dict)
    latency: Any = None
    inputs: Mapping[str, Any] = field(default_factory=dict)
    outputs: Any = None
    timing: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)
    identity: Any = None

    @classmethod
    def of(
        cls, step: int, time: float, cohort: str | None, stats: Mapping[str, ModuleStats], values: Mapping[str, Any]
    ) -> Interval:
        """An interval with the monitors' ``values`` by name: the built-in ones as fields, others in ``extra``."""
        return cls(step, time, cohort, stats, **split_values(values))

    def alert(self, rule: str, module: str, stat: str, value: float, expected: float, message: str) -> Alert:
        """An :class:`Alert` stamped with this interval's step, time and cohort."""
        return Alert(
            rule=rule, module=module, stat=stat, value=float(value), expected=float(expected), call=self.step - 1,
            time=self.time, cohort=self.cohort, trace_id=None, message=message,
        )  # fmt: skip


@runtime_checkable
class Rule(Protocol):
    """A rule: ``evaluate`` returns the alerts one interval raises."""

    name: str

    def evaluate(self, interval: Interval) -> Iterable[Alert]: ...


def where(cohort: str | None) -> str:
    return f" (cohort {cohort!r})" if cohort is not None else ""


def rule_name(rule: Any) -> str:
    return getattr(rule, "name", None) or getattr(rule, "__name__", type(rule).__name__)


def trips(rule: Any) -> bool:
    return bool(getattr(rule, "trips", False))
