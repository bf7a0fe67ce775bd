"""Rollouts decided by evidence: a candidate beside the primary, an always-valid verdict
(:func:`rollout`), and the metrics rollout controllers read (:mod:`.monitor`)."""

from .evidence import DEFAULT_TOLERANCES, MetricEvidence, Verdict
from .router import Rollout, rollout

__all__ = ["DEFAULT_TOLERANCES", "MetricEvidence", "Rollout", "Verdict", "rollout"]
