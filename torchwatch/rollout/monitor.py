"""A rollout's verdict in the primary's records and on Prometheus (what Argo Rollouts and
Flagger read).

When the primary is watched, :func:`torchwatch.rollout` adds a hook-less :class:`RolloutMonitor`
to its watch: each record carries the rollout's state as ``record.extra["rollout"]``, and the
Prometheus sink exports, with bounded labels (``rollout``, ``metric`` from a fixed list,
``version`` primary/candidate):

* ``torchwatch_rollout_verdict{rollout}`` — 1 promote, 0 continue, -1 rollback;
* ``torchwatch_rollout_share{rollout}`` — the candidate's share of calls;
* ``torchwatch_rollout_calls{rollout, version}`` — calls per version (a gauge of the total);
* ``torchwatch_rollout_metric_verdict{rollout, metric}`` — each metric's own 1 / 0 / -1;
* ``torchwatch_rollout_estimate``, ``_lower``, ``_upper``, ``_tolerance`` ``{rollout, metric}``
  — how much worse the candidate is, its interval, and the worsening that decides;
* ``torchwatch_rollout_samples{rollout, metric}``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .. import values
from .._schema import Fields
from ..monitors.base import Binding, Monitor
from .evidence import MetricEvidence

__all__ = ["RolloutMonitor", "RolloutStatus"]

DECISIONS = {"rollback": -1.0, "continue": 0.0, "promote": 1.0}


@dataclass(frozen=True)
class RolloutStatus:
    """A rollout's state at a flush (``record.extra["rollout"]``)."""

    name: str
    mode: str
    decision: str
    metric: str | None
    share: float
    calls: dict[str, int]
    metrics: tuple[MetricEvidence, ...] = field(default_factory=tuple)
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "mode": self.mode, "decision": self.decision, "metric": self.metric,
                "share": self.share, "calls": dict(self.calls), "metrics": [m.to_dict() for m in self.metrics],
                "reason": self.reason}  # fmt: skip

    @classmethod
    def from_dict(cls, doc: object, where: str = "rollout") -> RolloutStatus:
        f = Fields(doc, where)
        calls = f.obj("calls")
        metrics = []
        for i, item in enumerate(f.list("metrics")):
            m = Fields(item, f"{where}.metrics[{i}]")
            metrics.append(MetricEvidence(m.str("name"), m.str("decision"), m.float("estimate"), m.float("lower"),
                                          m.float("upper"), m.float("tolerance"), m.count("samples"),
                                          int(m.get("decided_at") or 0)))  # fmt: skip
        metric = f.get("metric")
        return cls(f.str("name"), f.str("mode"), f.str("decision"), metric if isinstance(metric, str) else None,
                   f.float("share"), {k: calls.count(k) for k in calls.doc}, tuple(metrics),
                   f.str("reason", ""))  # fmt: skip


class RolloutMonitor(Monitor):
    """Puts a rollout's state in each record of the primary's watch (no hooks)."""

    name = "rollout"

    def __init__(self, rollout: Any) -> None:
        self._rollout = rollout

    def bind(self, binding: Binding) -> None:
        pass

    def take(self, *, keep: bool) -> RolloutStatus:
        r = self._rollout
        v = r.verdict()
        return RolloutStatus(r.name, r.mode, v.decision, v.metric, r.share, dict(v.calls), v.metrics, v.reason)

    def merge(self, earlier: RolloutStatus, later: RolloutStatus) -> RolloutStatus:
        return later

    def active(self, value: RolloutStatus) -> bool:
        return True


def _metric_label(name: str) -> str:
    return name.split("[")[0]  # class_mix[3] -> class_mix: one series per metric, bounded


def _export(value: RolloutStatus, record: Any) -> Iterator[values.Series]:
    base = (("rollout", value.name),)
    yield values.Series("torchwatch_rollout_verdict", "gauge", "Rollout verdict: 1 promote, 0 continue, -1 rollback.",
                        DECISIONS.get(value.decision, 0.0), base)  # fmt: skip
    yield values.Series("torchwatch_rollout_share", "gauge", "The candidate's share of calls.", value.share, base)
    for version, n in value.calls.items():
        yield values.Series("torchwatch_rollout_calls", "gauge", "Calls served (canary) or compared (shadow) by "
                            "version since the rollout began.", float(n), (*base, ("version", version)))  # fmt: skip
    for m in value.metrics:
        labels = (*base, ("metric", _metric_label(m.name)))
        yield values.Series("torchwatch_rollout_metric_verdict", "gauge", "Per metric: 1 shown within tolerance, "
                            "0 undecided, -1 shown worse.", DECISIONS.get(m.decision, 0.0), labels)  # fmt: skip
        for stat, help_ in (("estimate", "How much worse the candidate is (negative: better)."),
                            ("lower", "Lower end of the always-valid interval of the estimate."),
                            ("upper", "Upper end of the always-valid interval of the estimate."),
                            ("tolerance", "The worsening that decides a rollback.")):  # fmt: skip
            v = getattr(m, stat)
            if math.isfinite(v):
                yield values.Series(f"torchwatch_rollout_{stat}", "gauge", help_, v, labels)
        yield values.Series("torchwatch_rollout_samples", "gauge", "Samples the metric has taken.", float(m.samples),
                            labels)  # fmt: skip


values.register("rollout", decode=RolloutStatus.from_dict, export=_export)
