"""One incident per fault: the alerts one interval raised about module outputs, grouped under the
module where the change showed first.

A fault upstream moves everything downstream: a x255 input raises abs-max, std and cast alerts on
every module after the input in the same interval. A person wants one page for it, naming where
it started: the alerted module first in execution order (a record's statistics are in execution
order). Alerts that already name their cause stand alone: ``nonfinite`` (its origin, found per
call), ``fingerprint``, drift episodes and alerts that name no module output (latency, a custom
check of the whole model).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .alerts import Alert

STANDALONE = frozenset({"nonfinite", "fingerprint", "drift", "drift_ended"})
OUTPUT = "<output>"  # the model's output (output-quality alerts): after every module


@dataclass(frozen=True)
class Incident:
    """The lead alert of a fault and the ``related`` alerts the same interval raised downstream."""

    lead: Alert
    related: tuple[Alert, ...] = ()

    def summary(self) -> str:
        """The lead's message, and how far the change spread."""
        if not self.related:
            return self.lead.message
        modules = list(dict.fromkeys(a.module for a in self.related if a.module != self.lead.module))
        named = ", ".join(repr(m) for m in modules[:5]) + (f" and {len(modules) - 5} more" if len(modules) > 5 else "")
        spread = f" on {len(modules)} later module(s): {named}" if modules else f" on {self.lead.module!r}"
        return f"{self.lead.message} (first of {len(self.related) + 1} alerts this interval{spread})"


def group(alerts: Sequence[Alert], order: Sequence[str]) -> list[Incident]:
    """The incidents of one interval's ``alerts``, ``order`` being its positions in execution order.

    Per cohort, the alerts on measured positions (and the model's output) form one incident led by
    the earliest position's alert; the others stand alone. Incidents come in the order of their
    lead's first alert.
    """
    rank = {name: i for i, name in enumerate(order)}
    rank[OUTPUT] = len(order)
    groups: dict[object, list[tuple[int, int, Alert]]] = {}
    for i, alert in enumerate(alerts):
        if alert.rule in STANDALONE or alert.module not in rank:
            groups[("alone", i)] = [(0, i, alert)]
        else:
            groups.setdefault(("cohort", alert.cohort), []).append((rank[alert.module], i, alert))
    out = []
    for items in sorted(groups.values(), key=lambda g: min(i for _, i, _ in g)):
        items.sort(key=lambda item: item[:2])
        out.append(Incident(items[0][2], tuple(a for _, _, a in items[1:])))
    return out
