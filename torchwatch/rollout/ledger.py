"""The evidence a rollout keeps: per-row metrics of each version's outputs, paired across the
versions, fed to each metric's sequential tests (:mod:`.evidence`), and the verdict they give.

Runs on the rollout's evidence thread only (no locks of its own). Host-side numpy throughout:
nothing here calls into torch's intra-op pool, which serves the requests.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .evidence import DEFAULT_TOLERANCES, ClassMixMetric, MeanMetric, QuantileMetric, Verdict

__all__ = ["Ledger"]

MAX_CLASS_MIX = 256  # classes beyond this: class_mix is not kept (its cost grows with the classes)
PAIR_BACKLOG = 4096  # rows waiting for a partner from the other version
LABELS = ("accuracy", "calibration")


@dataclass
class _Rows:
    """Per-row metrics of one call of one version (host arrays)."""

    confidence: np.ndarray
    entropy: np.ndarray
    pred: np.ndarray
    abstain: np.ndarray
    finite: np.ndarray  # rows whose logits are all finite

    @property
    def bad(self) -> bool:
        """The call's output had non-finite values."""
        return not bool(self.finite.all())

    def __getitem__(self, rows: slice) -> _Rows:
        return _Rows(self.confidence[rows], self.entropy[rows], self.pred[rows], self.abstain[rows], self.finite[rows])


def _rows(logits: torch.Tensor, abstain_below: float | None) -> _Rows:
    # numpy on the evidence thread: no call into torch's intra-op pool, which serves the requests
    x = logits.detach().to("cpu", torch.float64).numpy()
    classes = x.shape[-1]
    finite_rows = np.isfinite(x).all(-1)
    x = np.where(finite_rows[:, None], x, 0.0)
    z = x - x.max(-1, keepdims=True)
    e = np.exp(z)
    total = e.sum(-1, keepdims=True)
    probs = e / total
    pred = probs.argmax(-1)
    confidence = probs.max(-1)
    log_probs = z - np.log(total)
    entropy = np.clip(-(probs * log_probs).sum(-1) / math.log(classes), 0.0, 1.0)
    # a non-finite row carries no answer: the worst value of each metric
    confidence = np.where(finite_rows, confidence, 0.0)
    entropy = np.where(finite_rows, entropy, 1.0)
    threshold = 1.0 / math.sqrt(classes) if abstain_below is None else abstain_below
    return _Rows(confidence, entropy, pred.astype(np.int64), (confidence < threshold).astype(np.float64), finite_rows)


def _rows_many(logits: list[torch.Tensor], abstain_below: float | None) -> list[_Rows]:
    """:func:`_rows` of many calls at once (one numpy pass per number of classes), split back."""
    out: list[_Rows | None] = [None] * len(logits)
    by_classes: dict[int, list[int]] = {}
    for i, x in enumerate(logits):
        by_classes.setdefault(x.shape[-1], []).append(i)
    for index in by_classes.values():
        parts = [logits[i].detach().reshape(-1, logits[i].shape[-1]) for i in index]
        both = _rows(torch.cat(parts) if len(parts) > 1 else parts[0], abstain_below)
        start = 0
        for i, part in zip(index, parts, strict=True):
            out[i] = both[start : start + part.shape[0]]
            start += part.shape[0]
    return out  # type: ignore[return-value]


class _Pairs:
    """Pairs a candidate's samples with the primary's in time: each waits for the other version's
    next sample, or takes its most recent unpaired one. The rule never looks at values."""

    def __init__(self) -> None:
        self._waiting: dict[str, collections.deque[Any]] = {
            "primary": collections.deque(maxlen=PAIR_BACKLOG), "candidate": collections.deque(maxlen=PAIR_BACKLOG)
        }  # fmt: skip

    def waiting(self, version: str) -> int:
        return len(self._waiting[version])

    def add(self, version: str, items: Iterable[Any]) -> list[tuple[Any, Any]]:
        """New samples of ``version``; returns ``(candidate, primary)`` pairs completed."""
        other = "primary" if version == "candidate" else "candidate"
        pairs = []
        for item in items:
            if self._waiting[other]:
                mate = self._waiting[other].pop()  # the most recent
                pairs.append((item, mate) if version == "candidate" else (mate, item))
            else:
                self._waiting[version].append(item)
        return pairs


class Ledger:
    """Each metric's evidence for one rollout (see :func:`torchwatch.rollout`)."""

    def __init__(self, name: str, mode: str, metrics: tuple[str, ...], tolerances: Mapping[str, float], *,
                 alpha_rollback: float, alpha_promote: float, abstain_below: float | None, max_traces: int,
                 warn: Callable[[str, str], object]) -> None:  # fmt: skip
        self.name, self.mode, self.abstain_below = name, mode, abstain_below
        self.tolerances = {m: float(tolerances.get(m, DEFAULT_TOLERANCES[m])) for m in metrics}
        self.alpha_promote = alpha_promote
        self._alpha_each = alpha_rollback / len(metrics)  # the rollback level, split over the metrics
        self._warn = warn
        self.metrics: dict[str, Any] = {}
        for m in metrics:
            tol = self.tolerances[m]
            if m.startswith("latency_p"):
                p = 0.5 if m == "latency_p50" else 0.99
                self.metrics[m] = QuantileMetric(
                    m, p, tol, alpha_rollback=self._alpha_each, alpha_promote=alpha_promote
                )
            elif m == "class_mix":
                self.metrics[m] = None  # made when the number of classes is known
            else:
                low = 0.0 if m == "agreement" else -1.0
                self.metrics[m] = MeanMetric(m, tol, low=low, high=1.0, alpha_rollback=self._alpha_each,
                                             alpha_promote=alpha_promote)  # fmt: skip
        self._classes: int | None = None
        self._pairs = {"rows": _Pairs(), "calls": _Pairs(), "labels": _Pairs()}
        self._traces: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._pending_labels: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._max_traces = max_traces
        self._decided_order: list[str] = []
        self.labels_unmatched = 0
        # primary calls not paired yet (canary without labels), newest last
        self._lazy = mode == "canary" and not set(LABELS) & set(metrics)
        self._unread: collections.deque[_Rows] = collections.deque()
        self._unread_rows = 0
        self._deferred: dict[str, list[np.ndarray]] = collections.defaultdict(list)

    def _add(self, name: str, values: np.ndarray) -> None:
        """Samples for a metric, applied at the next :meth:`flush` (one update per batch of calls)."""
        self._deferred[name].append(values)

    def flush(self) -> None:
        """Apply the samples taken since the last flush, in order, one update per metric (the tests
        are read after it: a valid look, as any time of reading is)."""
        deferred, self._deferred = self._deferred, collections.defaultdict(list)
        for name, chunks in deferred.items():
            metric = self.metrics.get(name)
            if metric is None:
                continue
            if name == "class_mix":
                both = np.concatenate(chunks, axis=1)
                metric.add(both[0], both[1])
            else:
                metric.add(np.concatenate(chunks))

    def call_error(self, version: str, bad: bool = True) -> None:
        """A call of ``version`` that raised (or, ``bad``, returned non-finite values)."""
        if "errors" in self.metrics:
            pairs = self._pairs["calls"].add(version, [float(bad)])
            if pairs:
                self._add("errors", np.array([c - p for c, p in pairs]))

    def canary_calls(self, calls: list[tuple[str, str | None, torch.Tensor | None, float]]) -> None:
        """Calls served (canary), in the order they were served: ``(version, trace, logits or None,
        seconds)``. Latencies go to the quantile metrics; rows are computed for all calls at once,
        then paired call by call as they came."""
        for m in self.metrics.values():
            if isinstance(m, QuantileMetric):
                for version in ("primary", "candidate"):
                    seconds = [c[3] for c in calls if c[0] == version]
                    if seconds:
                        m.add(version, np.array(seconds))
        with_rows = [c for c in calls if c[2] is not None]
        if with_rows and self._classes is None:
            self._classes = with_rows[0][2].shape[-1]  # class_mix counts every class the logits have
        for (version, trace, _, _), rows in zip(with_rows, _rows_many([c[2] for c in with_rows], self.abstain_below),
                                                strict=True):  # fmt: skip
            if version == "primary" and self._lazy and not self._pairs["rows"].waiting("candidate"):
                # most primary rows never meet a candidate row: paired only when one needs a partner
                self.call_error("primary", rows.bad)
                self._unread.append(rows)
                self._unread_rows += len(rows.pred)
                while self._unread and self._unread_rows - len(self._unread[0].pred) >= PAIR_BACKLOG:
                    self._unread_rows -= len(self._unread.popleft().pred)  # older than any pairing needs
                continue
            if version == "candidate":
                self._read_unread(len(rows.pred))
            self._canary_rows(version, rows)
            self._remember(trace, {version: rows})

    def _read_unread(self, needed: int) -> None:
        """Pair-ready the most recent unread primary calls, enough for ``needed`` rows, oldest first
        (all newer than any primary row already waiting, so the pairing order is what taking every
        call at once would give)."""
        taken: list[_Rows] = []
        count = 0
        while self._unread and count < needed:
            taken.append(self._unread.pop())
            count += len(taken[-1].pred)
        self._unread_rows -= count
        for rows in reversed(taken):
            self._canary_rows("primary", rows, count_call=False)

    def _canary_rows(self, version: str, rows: _Rows, *, count_call: bool = True) -> None:
        if count_call:
            self.call_error(version, rows.bad)
        items = list(zip(rows.confidence, rows.entropy, rows.pred, rows.abstain, strict=True))
        pairs = self._pairs["rows"].add(version, items)
        if pairs:
            c = np.array([p[0] for p in pairs])
            p = np.array([p[1] for p in pairs])
            self._row_metrics(c[:, 0], c[:, 1], c[:, 2], c[:, 3], p[:, 0], p[:, 1], p[:, 2], p[:, 3])

    def _row_metrics(self, cc, ce, cp, ca, pc, pe, pp, pa) -> None:
        m = self.metrics
        if "confidence" in m:
            self._add("confidence", pc - cc)
        if "entropy" in m:
            self._add("entropy", ce - pe)
        if "abstention" in m:
            self._add("abstention", ca - pa)
        if "class_mix" in m:
            if m["class_mix"] is None:
                k = self._classes or int(max(cp.max(), pp.max())) + 1
                if k > MAX_CLASS_MIX:
                    del m["class_mix"]
                    self._warn("class-mix", f"rollout {self.name!r}: {k} classes, more than "
                                             f"{MAX_CLASS_MIX}: class_mix is not kept")  # fmt: skip
                    return
                m["class_mix"] = ClassMixMetric(k, self.tolerances["class_mix"], alpha_rollback=self._alpha_each,
                                                alpha_promote=self.alpha_promote)  # fmt: skip
            self._add("class_mix", np.stack([cp, pp]).astype(np.int64))

    def shadow_pair(self, trace: Any, prim: torch.Tensor, cand: torch.Tensor | None) -> None:
        """One sampled call's logits of both versions (``cand`` None: the candidate raised or gave
        no logits of the primary's shape, an error of the candidate's)."""
        self._classes = prim.shape[-1]
        p = _rows(prim, self.abstain_below)
        if cand is None or cand.shape != prim.shape:
            self._call_errors_paired(1.0, float(p.bad))
            return
        c = _rows(cand, self.abstain_below)
        self._call_errors_paired(float(c.bad), float(p.bad))
        if "agreement" in self.metrics:
            self._add("agreement", (c.pred != p.pred).astype(np.float64))
        self._row_metrics(c.confidence, c.entropy, c.pred, c.abstain, p.confidence, p.entropy, p.pred, p.abstain)
        if isinstance(trace, str):
            self._remember(trace, {"candidate": c, "primary": p})

    def _call_errors_paired(self, c: float, p: float) -> None:
        if "errors" in self.metrics:
            self._add("errors", np.array([c - p]))

    def _remember(self, trace: str | None, rows: dict[str, _Rows]) -> None:
        if trace is None or not set(LABELS) & set(self.metrics):
            return
        self._traces[trace] = rows
        while len(self._traces) > self._max_traces:
            self._traces.popitem(last=False)
        labels = self._pending_labels.pop(trace, None)
        if labels is not None:
            self.labels(trace, labels)

    def labels(self, trace: str, labels: Any) -> None:
        """The true classes of a request's rows, integers (held a while if its call is not in yet)."""
        y = np.asarray(labels.to("cpu") if isinstance(labels, torch.Tensor) else labels).reshape(-1).astype(np.int64)
        rows = self._traces.pop(trace, None)
        if rows is None:  # the call's evidence may still be on its way: held a while
            self._pending_labels[trace] = y
            while len(self._pending_labels) > self._max_traces:
                self._pending_labels.popitem(last=False)
                self.labels_unmatched += 1
            return
        scored = {}
        for version, r in rows.items():
            if len(y) != len(r.pred):
                self.labels_unmatched += 1
                self._warn("labels-shape", f"rollout {self.name!r}: {len(y)} labels for a request "
                                         f"of {len(r.pred)} rows; skipped, counted in labels_unmatched")  # fmt: skip
                return
            correct = (r.pred == y).astype(np.float64)
            scored[version] = (correct, (r.confidence - correct) ** 2)
        if self.mode == "shadow":
            (cc, cb), (pc, pb) = scored["candidate"], scored["primary"]
        else:
            ((version, (correct, brier)),) = scored.items()
            pairs = self._pairs["labels"].add(version, list(zip(correct, brier, strict=True)))
            if not pairs:
                return
            cc, cb = np.array([c for c, _ in pairs]).T
            pc, pb = np.array([p for _, p in pairs]).T
        if "accuracy" in self.metrics:
            self._add("accuracy", pc - cc)
        if "calibration" in self.metrics:
            self._add("calibration", cb - pb)

    def final(self) -> bool:
        """Whether the evidence so far gives a final verdict (cheaper than :meth:`verdict`)."""
        self.flush()
        decisions = [m.decision for m in self.metrics.values() if m is not None]
        missing = any(m is None for m in self.metrics.values())
        return "rollback" in decisions or (not missing and bool(decisions) and all(d == "promote" for d in decisions))

    def verdict(self, calls: dict[str, int], dropped: int, errors: int) -> Verdict:
        """Where the evidence stands (see :func:`torchwatch.rollout` for the rule)."""
        self.flush()
        for name, m in self.metrics.items():  # the order metrics were decided in
            if m is not None and m.decision != "continue" and name not in self._decided_order:
                self._decided_order.append(name)
        evidence = tuple(m.evidence() for m in self.metrics.values() if m is not None)
        missing = [n for n, m in self.metrics.items() if m is None]
        by_name = {e.name.split("[")[0]: e for e in evidence}
        rolled = [n for n in self._decided_order if by_name.get(n) and by_name[n].decision == "rollback"]
        if rolled:
            e = by_name[rolled[0]]
            reason = (f"{e.name}: the candidate is worse by {e.estimate:.4g} (interval {e.lower:.4g} .. {e.upper:.4g}),"
                      f" more than the tolerance {e.tolerance:g}, shown after {e.samples} samples")  # fmt: skip
            return Verdict("rollback", e.name, e.estimate, e.lower, e.upper, e.samples, evidence, calls, dropped,
                           errors, reason)  # fmt: skip
        if not missing and evidence and all(e.decision == "promote" for e in evidence):
            last = by_name[self._decided_order[-1]] if self._decided_order else evidence[-1]
            reason = (f"every metric shown within its tolerance; the last was {last.name} after {last.samples} "
                      "samples")  # fmt: skip
            return Verdict("promote", last.name, last.estimate, last.lower, last.upper, last.samples, evidence,
                           calls, dropped, errors, reason)  # fmt: skip
        waiting = [e.name for e in evidence if e.decision == "continue"] + missing
        reason = "no samples yet" if not any(calls.values()) else f"not yet decided: {', '.join(waiting)}"
        return Verdict("continue", None, math.nan, math.nan, math.nan, 0, evidence, calls, dropped, errors, reason)
