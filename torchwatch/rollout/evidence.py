"""Per-metric evidence for a rollout: samples in, a sequential decision out.

Every metric is oriented so that **larger is worse** for the candidate and has a tolerance: the
largest worsening that does not matter. Each keeps two always-valid tests
(:mod:`torchwatch.rollout.sequential`) at the tolerance: *rollback* rejects "the candidate is
worse by at most the tolerance" at level ``alpha_rollback`` (split over the metrics), *promote*
rejects "it is worse by the tolerance or more" at ``alpha_promote``. Whichever fires first
decides the metric, for good.

Kinds:

* :class:`MeanMetric` — the mean of a bounded per-sample value: a share of rows (shadow
  disagreement), or a paired difference in ``[-1, 1]`` (the candidate's value minus the
  primary's on the same input in a shadow, or on the primary's most recent row in a canary).
* :class:`ClassMixMetric` — each class's share of predictions, two-sided, per class.
* :class:`QuantileMetric` — a latency quantile of the candidate against ``(1 + tolerance)`` times
  the primary's, each version with its own time-uniform bounds (canary only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .sequential import EmpiricalBernstein, MeanTest, QuantileBounds

__all__ = ["DEFAULT_TOLERANCES", "ClassMixMetric", "MeanMetric", "MetricEvidence", "QuantileMetric", "Verdict"]

# worse by more than this is a rollback; each documented where the metric is defined (router.py)
DEFAULT_TOLERANCES: dict[str, float] = {
    "agreement": 0.01,
    "confidence": 0.05,
    "entropy": 0.05,
    "class_mix": 0.05,
    "abstention": 0.02,
    "errors": 0.01,
    "accuracy": 0.01,
    "calibration": 0.01,
    "latency_p50": 0.10,
    "latency_p99": 0.10,
}


@dataclass(frozen=True)
class MetricEvidence:
    """Where one metric stands.

    Attributes:
        name: the metric (``"class_mix[3]"`` names the class that decided).
        decision: ``"rollback"``, ``"promote"`` or ``"continue"``.
        estimate: the current estimate of how much worse the candidate is (same units as
            ``tolerance``; negative is better). lower, upper: a confidence interval for it, valid
            at every time it is read (NaN where the metric keeps none).
        tolerance: the worsening that decides. samples: samples taken; decided_at: samples when
            it was decided (0: not yet).
    """

    name: str
    decision: str
    estimate: float
    lower: float
    upper: float
    tolerance: float
    samples: int
    decided_at: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass(frozen=True)
class Verdict:
    """What a rollout decided so far (:meth:`Rollout.verdict`).

    Attributes:
        decision: ``"promote"``, ``"continue"`` or ``"rollback"``.
        metric: the metric that decided (a rollback: the first to show the candidate worse; a
            promotion: the last to show it within tolerance); None while undecided.
        estimate, lower, upper: that metric's estimate and interval (see :class:`MetricEvidence`).
        samples: the samples that metric took.
        metrics: every metric's :class:`MetricEvidence`.
        calls: root calls by version (``"primary"``, ``"candidate"``); dropped: calls whose
            evidence was dropped (queue full); errors: candidate calls that raised.
        reason: one line saying why.
    """

    decision: str
    metric: str | None
    estimate: float
    lower: float
    upper: float
    samples: int
    metrics: tuple[MetricEvidence, ...]
    calls: dict[str, int] = field(default_factory=dict)
    dropped: int = 0
    errors: int = 0
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = dict(vars(self))
        out["metrics"] = [m.to_dict() for m in self.metrics]
        return out


class MeanMetric:
    """A bounded per-sample value in ``[low, high]``; worse when its mean is above ``tolerance``."""

    def __init__(self, name: str, tolerance: float, *, low: float, high: float, alpha_rollback: float,
                 alpha_promote: float) -> None:  # fmt: skip
        if not low < tolerance < high:
            raise ValueError(f"{name}: tolerance {tolerance} must lie strictly between {low} and {high}")
        self.name, self.tolerance, self.low, self.high = name, tolerance, low, high
        m = self._scale(tolerance)
        self.rollback = MeanTest(m, "above", alpha_rollback)
        self.promote = MeanTest(m, "below", alpha_promote)
        self._interval = EmpiricalBernstein(alpha_rollback)
        self.n = 0
        self.total = 0.0

    def _scale(self, v: Any) -> Any:
        return (v - self.low) / (self.high - self.low)

    def add(self, values: np.ndarray) -> None:
        v = np.clip(np.asarray(values, dtype=np.float64).reshape(-1), self.low, self.high)
        if v.size == 0:
            return
        x = self._scale(v)
        if self.decision == "continue":
            self.rollback.update(x)
            self.promote.update(x)
        self._interval.update(x)
        self.n += v.size
        self.total += float(v.sum())

    @property
    def decision(self) -> str:
        r, p = self.rollback.rejected_at, self.promote.rejected_at
        if r and (not p or r <= p):
            return "rollback"
        return "promote" if p else "continue"

    def evidence(self) -> MetricEvidence:
        lo, hi = self._interval.bounds() if self.n else (0.0, 1.0)
        span = self.high - self.low
        lower, upper = self.low + lo * span, self.low + hi * span
        decision = self.decision
        # the decision is a one-sided confidence statement of its own (often sharper than the
        # interval early on): the interval shown includes it
        if decision == "rollback":
            lower = max(lower, self.tolerance)
        elif decision == "promote":
            upper = min(upper, self.tolerance)
        decided = {"rollback": self.rollback.rejected_at, "promote": self.promote.rejected_at}.get(decision, 0)
        return MetricEvidence(self.name, decision, self.total / self.n if self.n else math.nan, lower,
                              max(lower, upper), self.tolerance, self.n, decided)  # fmt: skip


class ClassMixMetric:
    """Each class's share of predictions, candidate minus primary, on paired rows: a rollback
    when any class's share moved by more than ``tolerance`` either way (the rollback level split
    over both sides of every class), a promotion when every class is shown within it."""

    def __init__(self, classes: int, tolerance: float, *, alpha_rollback: float, alpha_promote: float) -> None:
        self.name, self.tolerance, self.classes = "class_mix", tolerance, classes
        up, down = (1 + tolerance) / 2, (1 - tolerance) / 2  # +-tolerance on the [0, 1] scale of (d + 1) / 2
        split = alpha_rollback / (2 * classes)
        self._rollback = (MeanTest(up, "above", split, width=classes), MeanTest(down, "below", split, width=classes))
        self._promote = (MeanTest(up, "below", alpha_promote, width=classes),
                         MeanTest(down, "above", alpha_promote, width=classes))  # fmt: skip
        self.n = 0
        self._sums = np.zeros(classes)

    def add(self, candidate: np.ndarray, primary: np.ndarray) -> None:
        """Paired predicted classes (ints in ``[0, classes)``)."""
        c, p = np.asarray(candidate, dtype=np.int64), np.asarray(primary, dtype=np.int64)
        if c.size == 0:
            return
        # per class, rows where the candidate alone predicts it (+1), the primary alone (-1), else 0:
        # on the [0, 1] scale 1, 0 and 0.5; counted, so the cost does not grow with the rows
        plus = np.bincount(c, minlength=self.classes)[: self.classes].astype(np.float64)
        minus = np.bincount(p, minlength=self.classes)[: self.classes].astype(np.float64)
        same = np.bincount(c[c == p], minlength=self.classes)[: self.classes].astype(np.float64)
        plus, minus = plus - same, minus - same
        counts = np.stack([plus, minus, c.size - plus - minus], axis=1)
        if self.decision == "continue":
            for t in (*self._rollback, *self._promote):
                t.update_counts(np.array([1.0, 0.0, 0.5]), counts)
        self.n += c.size
        self._sums += plus - minus

    @property
    def _rollback_at(self) -> int:
        ats = [int(a) for t in self._rollback for a in t.rejected_at_each if a]
        return min(ats) if ats else 0

    @property
    def _promote_at(self) -> int:
        both = [t.rejected_at_each for t in self._promote]
        if not all(a > 0 for arr in both for a in arr):
            return 0
        return int(max(a for arr in both for a in arr))

    @property
    def decision(self) -> str:
        r, p = self._rollback_at, self._promote_at
        if r and (not p or r <= p):
            return "rollback"
        return "promote" if p else "continue"

    def evidence(self) -> MetricEvidence:
        shares = self._sums / self.n if self.n else np.zeros(self.classes)
        worst = int(np.argmax(np.abs(shares))) if self.n else 0
        decided = {"rollback": self._rollback_at, "promote": self._promote_at}.get(self.decision, 0)
        return MetricEvidence(f"class_mix[{worst}]", self.decision, float(abs(shares[worst])) if self.n else math.nan,
                              math.nan, math.nan, self.tolerance, self.n, decided)  # fmt: skip


class QuantileMetric:
    """The candidate's latency quantile ``p`` against ``(1 + tolerance)`` times the primary's.

    Rollback when the candidate's lower bound exceeds ``(1 + tolerance)`` times the primary's
    upper bound (each bound at half the rollback level); promotion when the candidate's upper
    bound is below ``(1 + tolerance)`` times the primary's lower bound (half the promote level
    each). The estimate and interval are relative: ``candidate / primary - 1``. The bounds assume
    each version's latency distribution is stable over the rollout (random routing shares any
    change in load between the versions, but does not make a drifting quantile a fixed one).
    """

    def __init__(self, name: str, p: float, tolerance: float, *, alpha_rollback: float, alpha_promote: float) -> None:
        if tolerance <= 0:
            raise ValueError(f"{name}: tolerance must be > 0, got {tolerance}")
        self.name, self.p, self.tolerance = name, p, tolerance
        self.candidate = QuantileBounds(p, alpha_lower=alpha_rollback / 2, alpha_upper=alpha_promote / 2)
        self.primary = QuantileBounds(p, alpha_lower=alpha_promote / 2, alpha_upper=alpha_rollback / 2)
        self._decision, self._decided_at = "continue", 0

    def add(self, version: str, seconds: np.ndarray) -> None:
        (self.candidate if version == "candidate" else self.primary).add(seconds)

    @property
    def decision(self) -> str:
        if self._decision == "continue" and self.candidate.n and self.primary.n:
            (cl, cu), (pl, pu) = self.candidate.bounds(), self.primary.bounds()
            k = 1.0 + self.tolerance
            if cl > k * pu:
                self._decision, self._decided_at = "rollback", self.candidate.n
            elif cu < k * pl:
                self._decision, self._decided_at = "promote", self.candidate.n
        return self._decision

    def evidence(self) -> MetricEvidence:
        decision = self.decision
        if not (self.candidate.n and self.primary.n):
            return MetricEvidence(self.name, decision, math.nan, math.nan, math.nan, self.tolerance,
                                  self.candidate.n)  # fmt: skip
        (cl, cu), (pl, pu) = self.candidate.bounds(), self.primary.bounds()
        estimate = self.candidate.estimate() / self.primary.estimate() - 1.0
        lower = cl / pu - 1.0 if pu > 0 and math.isfinite(pu) else -1.0
        upper = cu / pl - 1.0 if pl > 0 and math.isfinite(cu) else math.inf
        return MetricEvidence(self.name, decision, estimate, lower, upper, self.tolerance, self.candidate.n,
                              self._decided_at)  # fmt: skip
