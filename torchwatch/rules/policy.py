"""What reaches the sinks: de-duplication and rate limits of alerts (:class:`AlertPolicy`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .. import _validate, incidents
from ..alerts import Alert


@dataclass
class AlertPolicy:
    """De-duplication and rate limiting of alerts before they reach sinks and the incident log.

    Tripping alerts (NaN/Inf, the fingerprint, rules made with ``trips=True``: those that make
    :attr:`torchwatch.Watch.healthy` False) do not use the budget and are not held back by the
    cool-down: a fault must reach the sinks however many alerts came before it, and a second
    fault minutes after the first is a second alert. A fault that persists is one episode: while
    the same (rule, module, stat, cohort) tripped in the interval before too, its alert is held
    back (counted) until ``cooldown`` seconds after the episode's last one (:meth:`select`).

    The rate limit counts incidents, not alerts: the alerts one interval raised about module
    outputs (one fault seen at every module after it, :mod:`torchwatch.incidents`) pass or wait
    together and use one place in the minute's budget.

    Args:
        cooldown: seconds during which a repeat of the same (rule, module, stat, cohort) is
            suppressed (counted in :attr:`suppressed`).
        max_per_minute: at most this many incidents admitted per rolling minute, all kinds together.
    """

    cooldown: float = 300.0
    max_per_minute: int = 60
    suppressed: int = 0

    def __post_init__(self) -> None:
        _validate.number("AlertPolicy", "cooldown", self.cooldown, low=0.0, finite=False)
        _validate.integer("AlertPolicy", "max_per_minute", self.max_per_minute, low=1)
        self._last: dict[tuple[Any, ...], float] = {}
        self._recent: list[float] = []
        self._episodes: set[tuple[Any, ...]] = set()  # tripping keys of the interval before

    def select(self, alerts: list[Alert], tripping: set[Alert], now: float, order: Sequence[str] = ()) -> list[Alert]:
        """The alerts of one interval that reach the sinks: those of ``tripping`` that start an
        episode (their key did not trip in the interval before) or come ``cooldown`` seconds after
        its last alert; the others by incident (``order``: the interval's positions in execution
        order), each incident's new alerts using one place in the minute's budget."""
        out, keys = [], set()
        admitted: set[Alert] = set()
        for incident in incidents.group([a for a in alerts if a not in tripping], order):
            fresh = [a for a in (incident.lead, *incident.related) if not self._cooling(a, now)]
            self.suppressed += 1 + len(incident.related) - len(fresh)
            if fresh and self._take_place(fresh, now):
                admitted.update(fresh)
        for alert in alerts:
            if alert in tripping:
                key = _key(alert)
                keys.add(key)
                last = self._last.get(key)
                if key in self._episodes and last is not None and now - last < self.cooldown:
                    self.suppressed += 1  # the same fault, still going: reported at its start
                    continue
                self._last[key] = now
                out.append(alert)
            elif alert in admitted:
                out.append(alert)
        self._episodes = keys
        return out

    def _cooling(self, alert: Alert, now: float) -> bool:
        last = self._last.get(_key(alert))
        return last is not None and now - last < self.cooldown

    def _take_place(self, alerts: list[Alert], now: float) -> bool:
        """One place in the minute's budget for ``alerts`` (remembered), or all suppressed."""
        self._recent = [t for t in self._recent if now - t < 60.0]
        if len(self._recent) >= self.max_per_minute:
            self.suppressed += len(alerts)
            return False
        self._recent.append(now)
        for alert in alerts:
            self._last[_key(alert)] = now
        return True

    def admit(self, alert: Alert, now: float | None = None) -> bool:
        """Whether to let ``alert`` through (and remember it)."""
        now = time.time() if now is None else now
        if self._cooling(alert, now):
            self.suppressed += 1
            return False
        return self._take_place([alert], now)


def _key(alert: Alert) -> tuple[Any, ...]:
    return (alert.rule, alert.module, alert.stat, alert.cohort)
