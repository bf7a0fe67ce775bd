"""Output quality: what a classifier or LM head answers (``attach(outputs=...)``).

Softmax confidence (max probability), margin (top-1 minus top-2 probability), entropy,
predicted-class histogram and the abstention rate below a threshold, accumulated on the logits'
device on sampled eager calls; with labels fed back later (:meth:`torchwatch.Watch.record_labels`),
accuracy and expected calibration error (ECE). The default rules chart these
(:class:`torchwatch.rules.EdgeChart`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import _validate, values
from .._schema import Fields
from .._transfer import copy_to_host, state_mode
from ..errors import ConfigError, FormatError
from ..kernels import cpu as cpu_kernel
from ..values import Export, Scalar, Series
from .base import Binding, Call, Collect, Monitor
from .ids import IdAccumulator, IdStats, resolve_path

__all__ = ["OutputMonitor", "OutputQuality"]

OUTPUT = "<output>"  # the key of watch.errors for failures of the output-quality monitor

_SUMS = ("confidence", "confidence_sq", "margin", "entropy", "normalized_entropy", "abstained", "nonfinite")


@dataclass(frozen=True)
class OutputMonitor:
    """Output-quality monitoring of a classifier or LM head (``attach(outputs=...)``).

    Args:
        select: which tensor of the model's output holds the logits. ``"auto"`` (the default):
            the output itself if it is a tensor, else its ``logits`` key or attribute (Hugging
            Face ``ModelOutput``), else the first element of a tuple (``return_dict=False``).
            Or a key or attribute name, an index into a tuple, a callable ``output -> tensor``,
            or None for a model that returns the logits tensor itself.
        abstain_below: a row whose confidence (max softmax probability) is below this counts as
            an abstention. None (the default): ``1 / sqrt(classes)``, the geometric midpoint
            between chance (``1 / classes``) and certainty (1): 0.71 for 2 classes, 0.32 for 10,
            0.032 for 1,000. A fixed 0.5 would count most rows of a healthy 1,000-class model,
            whose confidence is spread over similar classes.
        positions: ``"all"`` rows of ``logits.reshape(-1, classes)``, or ``"last"``: only the last
            position of a ``[batch, seq, vocab]`` LM output (the token being generated).
        max_classes: classes counted exactly in the predicted-class histogram; higher class ids
            (an LM vocabulary) go to 1024 hashed buckets.
        max_traces: calls whose predictions are kept for :meth:`Watch.record_labels` (by trace id).
        calibration_bins: equal-width confidence bins of the expected calibration error.
    """

    select: str | int | Callable[[Any], Any] | None = "auto"
    abstain_below: float | None = None
    positions: str = "all"
    max_classes: int = 1024
    max_traces: int = 4096
    calibration_bins: int = 15

    def __post_init__(self) -> None:
        if not (self.select is None or isinstance(self.select, (str, int)) or callable(self.select)):
            raise ConfigError(f"OutputMonitor select must be a key, an index, a callable or None, got {self.select!r}")
        _validate.optional(_validate.number, "OutputMonitor", "abstain_below", self.abstain_below, low=0.0, high=1.0)
        _validate.one_of("OutputMonitor", "positions", self.positions, ("all", "last"))
        for name, high in (("max_classes", 1 << 20), ("max_traces", 1 << 20), ("calibration_bins", 1 << 12)):
            _validate.integer("OutputMonitor", name, getattr(self, name), high=high)

    def logits(self, output: Any) -> torch.Tensor:
        """The logits tensor of a model output as ``[rows, classes]`` (raises :class:`OutputError`)."""
        sel = self.select
        try:
            if sel is None:
                x = output
            elif sel == AUTO:
                x = _auto_logits(output)
            elif callable(sel):
                x = sel(output)
            elif isinstance(sel, str):
                x = output[sel] if isinstance(output, Mapping) else getattr(output, sel)
            else:
                x = output[sel]
        except (KeyError, IndexError, AttributeError, TypeError) as exc:
            raise OutputError(f"the model's output has no {sel!r} ({type(output).__name__}): {exc!r}") from None
        if not isinstance(x, torch.Tensor):
            raise OutputError(f"outputs selector {sel!r} gave a {type(x).__name__}, not a logits tensor")
        if not x.is_floating_point() or x.dim() < 1 or x.shape[-1] < 2:
            raise OutputError(
                f"outputs selector {sel!r} gave a {x.dtype} tensor of shape {tuple(x.shape)}: logits are floating "
                "point with the classes in the last dimension (at least 2)"
            )
        if self.positions == "last" and x.dim() >= 3:
            x = x[:, -1]
        return x.detach().reshape(-1, x.shape[-1])

    def abstention_threshold(self, classes: int) -> float:
        """The confidence below which a row of ``classes`` logits counts as an abstention."""
        return 1.0 / math.sqrt(classes) if self.abstain_below is None else float(self.abstain_below)


AUTO = "auto"


def _auto_logits(output: Any) -> Any:
    """What ``select="auto"`` takes from a model output (see :class:`OutputMonitor`)."""
    if isinstance(output, torch.Tensor):
        return output
    found = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if found is not None:
        return found
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    keys = list(output.keys()) if isinstance(output, Mapping) else None
    raise OutputError(
        f"outputs='auto' found no logits in the model's {type(output).__name__} output"
        + (f" (its keys: {', '.join(map(str, keys))})" if keys is not None else "")
        + ": it takes a tensor output, a 'logits' key or attribute, or a tuple's first tensor. A base model "
        "without a head (BertModel) has no logits: watch the model with the head, or pass outputs= a key, an "
        "index or a callable output -> logits"
    )


class OutputError(ValueError):
    """The selected output is not a logits tensor (counted in ``watch.errors["outputs"]``)."""


@dataclass(frozen=True)
class OutputQuality:
    """Output quality over an interval or since a reset.

    Attributes:
        rows: rows (predictions) measured; ``nonfinite`` of them had NaN/Inf logits and are left
            out of the means.
        confidence, margin, entropy, normalized_entropy: means over the finite rows (entropy in
            nats; normalized: divided by log(classes), 1.0 = uniform).
        abstention_rate: share of finite rows with confidence below ``abstain_below`` (by default
            ``1 / sqrt(classes)``).
        classes: the predicted-class :class:`IdStats`.
        labelled: rows with labels fed back (:meth:`Watch.record_labels`); ``accuracy`` and
            ``ece`` (expected calibration error) over them, NaN when none.
    """

    rows: int = 0
    sums: tuple[float, ...] = (0.0,) * len(_SUMS)
    classes: IdStats | None = None
    labelled: int = 0
    bins: np.ndarray | None = field(default=None, repr=False)  # [bins, 3]: count, sum confidence, correct

    def _mean(self, i: int) -> float:
        finite = self.rows - self.sums[6]
        return self.sums[i] / finite if finite > 0 else math.nan

    @property
    def nonfinite(self) -> int:
        return int(self.sums[6])

    @property
    def confidence(self) -> float:
        return self._mean(0)

    @property
    def margin(self) -> float:
        return self._mean(2)

    @property
    def entropy(self) -> float:
        return self._mean(3)

    @property
    def normalized_entropy(self) -> float:
        return self._mean(4)

    @property
    def abstention_rate(self) -> float:
        return self._mean(5)

    @property
    def accuracy(self) -> float:
        return float(self.bins[:, 2].sum() / self.labelled) if self.labelled else math.nan

    @property
    def ece(self) -> float:
        """Expected calibration error: sum over bins of (rows in bin / rows) x |accuracy - confidence|."""
        if not self.labelled:
            return math.nan
        b = self.bins
        return float(np.abs(b[:, 2] - b[:, 1]).sum() / self.labelled)

    def merge(self, other: OutputQuality) -> OutputQuality:
        classes = _merged(self.classes, other.classes, lambda a, b: a.merge(b))
        bins = _merged(self.bins, other.bins, lambda a, b: a + b)
        return OutputQuality(
            self.rows + other.rows, tuple(a + b for a, b in zip(self.sums, other.sums, strict=True)), classes,
            self.labelled + other.labelled, bins,
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows, "nonfinite": self.nonfinite, "confidence": self.confidence, "margin": self.margin,
            "entropy": self.entropy, "normalized_entropy": self.normalized_entropy,
            "abstention_rate": self.abstention_rate, "classes": self.classes.to_dict() if self.classes else None,
            "labelled": self.labelled, "accuracy": self.accuracy, "ece": self.ece,
            "calibration_bins": self.bins.tolist() if self.labelled else None,  # [count, confidence sum, correct]
        }  # fmt: skip

    @staticmethod
    def summary_from_json(f: Fields) -> dict[str, Any]:
        """The :meth:`to_dict` summary read back from JSON, every field checked (FormatError)."""
        classes = f.obj("classes", optional=True)
        bins = f.list("calibration_bins") or None
        if bins is not None and not all(
            isinstance(b, list) and len(b) == 3 and all(type(v) in (int, float) for v in b) for b in bins
        ):
            raise FormatError(f"{f.where}: field 'calibration_bins' must hold [count, confidence sum, correct] items")
        out: dict[str, Any] = {"rows": f.count("rows"), "nonfinite": f.count("nonfinite")}
        out["labelled"] = f.count("labelled")
        for key in ("confidence", "margin", "entropy", "normalized_entropy", "abstention_rate", "accuracy", "ece"):
            value = f.float(key)
            out[key] = None if math.isnan(value) else value
        out["classes"] = IdStats.summary_from_json(classes) if classes is not None else None
        out["calibration_bins"] = bins
        return out


def _merged(a: Any, b: Any, merge: Callable[[Any, Any], Any]) -> Any:
    return b if a is None else a if b is None else merge(a, b)


class OutputAccumulator:
    """Device-side sums of one watch's output quality, plus predictions kept for labels."""

    def __init__(self, config: OutputMonitor, *, path: str | None = None) -> None:
        self.config = config
        self.path = path  # see resolve_path
        self._lock = threading.Lock()
        self._sums: torch.Tensor | None = None
        self._rows = 0
        self._classes: IdAccumulator | None = None
        self._traces: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # insertion-ordered, bounded
        self._bins = np.zeros((config.calibration_bins, 3))
        self._labelled = 0
        self.unknown_traces = 0
        # trace ids whose labels were used (bounded like _traces): a second label for one of them
        # is a repeat, which is not the same mistake as a trace id never seen
        self._labelled_ids: dict[str, None] = {}

    def observe(self, output: Any, trace_id: str | None) -> None:
        z = self.config.logits(output).float()
        if z.shape[0] == 0:
            return
        path = resolve_path(z.device, self.path)
        if path == "c":
            self._observe_c(z, trace_id)
            return
        sums, pred, conf = self._quality_torch(z)
        self._add(sums, pred, conf, z.shape[0], trace_id)

    def _observe_c(self, z: torch.Tensor, trace_id: str | None) -> None:
        """The CPU path of :meth:`_quality_torch`: one pass of the C extension, adding into the sums."""
        z = z if z.is_contiguous() else z.contiguous()
        rows, k = z.shape
        pred = torch.empty(rows, dtype=torch.int64)
        conf = torch.empty(rows, dtype=torch.float32) if trace_id is not None else None
        with self._lock:
            if self._sums is None or self._sums.device.type != "cpu":
                self._new_sums(torch.device("cpu"))
            cpu_kernel.logit_quality(z.data_ptr(), rows, k, self.config.abstention_threshold(k), self._sums.data_ptr(),
                                  pred.data_ptr(), conf.data_ptr() if conf is not None else 0)  # fmt: skip
            self._rows += rows
            self._classes.add(pred)
            if trace_id is not None:
                self._keep(trace_id, pred, conf)

    def _new_sums(self, device: torch.device) -> None:  # caller holds the lock
        with state_mode():
            self._sums = torch.zeros(len(_SUMS), dtype=torch.float64, device=device)
        self._classes = IdAccumulator(device, self.config.max_classes, 1024, path=self.path)

    def _keep(self, trace_id: str, pred: torch.Tensor, conf: torch.Tensor) -> None:  # caller holds the lock
        self._traces.pop(trace_id, None)
        self._labelled_ids.pop(trace_id, None)  # a trace id reused for a new call may be labelled again
        self._traces[trace_id] = (pred, conf)
        if len(self._traces) > self.config.max_traces:
            del self._traces[next(iter(self._traces))]

    def _add(self, sums: torch.Tensor, pred: torch.Tensor, conf: torch.Tensor, rows: int, trace_id: str | None) -> None:
        with self._lock:
            if self._sums is None or self._sums.device != sums.device:
                self._new_sums(sums.device)
            self._sums += sums
            self._rows += rows
            self._classes.add(pred)
            if trace_id is not None:
                self._keep(trace_id, pred, conf)

    def _quality_torch(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-interval sums (confidence, its square, margin, entropy, normalised entropy,
        abstentions over finite rows; non-finite rows), predicted classes and confidences."""
        logp = torch.log_softmax(z, dim=-1)
        p = logp.exp()
        top = p.topk(2, dim=-1)
        conf = top.values[:, 0]
        finite = torch.isfinite(z).all(dim=-1)
        entropy = torch.special.entr(p).sum(dim=-1)
        values = torch.stack([
            conf, conf * conf, conf - top.values[:, 1], entropy, entropy / math.log(z.shape[-1]),
            (conf < self.config.abstention_threshold(z.shape[-1])).to(conf.dtype),
        ])  # fmt: skip
        sums = torch.cat([torch.where(finite, values, 0.0).sum(dim=1, dtype=torch.float64),
                          (~finite).sum().reshape(1).to(torch.float64)])  # fmt: skip
        return sums, top.indices[:, 0], torch.where(finite, conf, math.nan)

    def record_labels(self, trace_ids: list[str], labels: list[Any]) -> tuple[int, list[str], list[str]]:
        """Match labels to kept predictions (host side; may wait for the device). Checks every
        label before using any, so a bad call changes nothing. Returns the rows labelled, the trace
        ids never seen (or no longer kept) and those already labelled."""
        with self._lock:
            kept = [self._traces.get(tid) for tid in trace_ids]
            missing = [tid for tid, k in zip(trace_ids, kept, strict=True) if k is None]
            repeated = [tid for tid in missing if tid in self._labelled_ids]
            unknown = [tid for tid in missing if tid not in self._labelled_ids]
        pairs = []
        for tid, k, label in zip(trace_ids, kept, labels, strict=True):
            if k is None:
                continue
            pred, conf = k
            y = torch.as_tensor(label).reshape(-1)
            if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
                raise ConfigError(f"record_labels: labels must be integer class ids, got {y.dtype} for trace {tid!r}")
            if y.numel() != pred.numel():
                raise ConfigError(
                    f"record_labels: trace {tid!r} made {pred.numel()} prediction(s) but got {y.numel()} label(s); "
                    "pass one label per row of that call's logits"
                )
            pairs.append((pred, conf, y.to(torch.int64)))
        k = self.config.calibration_bins
        bins = np.zeros_like(self._bins)
        rows = 0
        for pred, conf, y in pairs:
            pred, conf, y = pred.cpu().numpy(), conf.cpu().double().numpy(), y.numpy()
            keep = (y >= 0) & np.isfinite(conf)  # negative labels (-100: ignore) and NaN rows left out
            pred, conf, y = pred[keep], conf[keep], y[keep]
            which = np.minimum((conf * k).astype(np.int64), k - 1)
            np.add.at(bins, (which, 0), 1.0)
            np.add.at(bins, (which, 1), conf)
            np.add.at(bins, (which, 2), (pred == y).astype(np.float64))
            rows += len(y)
        with self._lock:
            for tid, k in zip(trace_ids, kept, strict=True):
                if k is not None and self._traces.get(tid) is k:
                    del self._traces[tid]  # a trace's labels count once
                    self._labelled_ids[tid] = None
                    if len(self._labelled_ids) > self.config.max_traces:
                        del self._labelled_ids[next(iter(self._labelled_ids))]
            self._bins += bins
            self._labelled += rows
            self.unknown_traces += len(unknown)
        return rows, unknown, repeated

    def take(self, *, keep: bool = False) -> tuple[Any, ...] | None:
        with self._lock:
            if not (self._rows or self._labelled):
                return None
            sums = None if self._sums is None else copy_to_host([self._sums])
            classes = None
            if self._classes is not None:
                classes = (self._classes.take(keep=keep), self._classes.exact, self._classes.hashed)
            out = (self._rows, sums, classes, self._labelled, self._bins.copy())
            if not keep:
                if self._sums is not None:
                    self._sums.zero_()
                self._rows = self._labelled = 0
                self._bins[:] = 0
            return out


def output_to_host(taken: tuple[Any, ...] | None) -> OutputQuality | None:
    if taken is None:
        return None
    rows, sums, classes, labelled, bins = taken
    ids = IdStats.from_state(classes[0].wait()[0].numpy(), classes[1], classes[2]) if classes is not None else None
    values = tuple(sums.wait()[0].tolist()) if sums is not None else (0.0,) * len(_SUMS)
    return OutputQuality(rows, values, ids, labelled, bins)


class Outputs(Monitor):
    """The output-quality monitor of a watch. Value: the interval's :class:`OutputQuality` or None."""

    name = "outputs"
    error_key = OUTPUT

    def __init__(self, config: OutputMonitor, *, path: str | None = None) -> None:
        self.config = config
        self.accumulator = OutputAccumulator(config, path=path)

    def bind(self, binding: Binding) -> None:
        self._bus = binding.bus

    def after_call(self, call: Call, output: Any) -> None:
        try:
            with torch.no_grad():
                self.accumulator.observe(output, call.trace_id)
        except OutputError as exc:
            self._bus.count("outputs")
            self._bus.warn_once(
                "outputs",
                f"output quality not measured: {exc}. Pass attach(outputs=...) the key, index or a callable that "
                'selects the logits. Counted in watch.errors["outputs"]; inference was not affected.',
            )

    def take(self, *, keep: bool) -> tuple[Any, ...] | None:
        return self.accumulator.take(keep=keep)

    def collect(self, taken: tuple[Any, ...] | None, ctx: Collect) -> OutputQuality | None:
        return output_to_host(taken)

    def merge(self, earlier: OutputQuality | None, later: OutputQuality | None) -> OutputQuality | None:
        return _merged(earlier, later, lambda a, b: a.merge(b))

    def active(self, value: OutputQuality | None) -> bool:
        return value is not None

    def reset(self) -> None:
        self.accumulator.take(keep=False)


def _decode(doc: Any, where: str) -> dict[str, Any]:
    return OutputQuality.summary_from_json(Fields(doc, where))


def _export(q: OutputQuality, record: Any) -> Iterator[Export]:
    """Means of confidence, margin, entropy, abstention (and accuracy, ECE with labels); rows and
    labelled rows as Prometheus counters, so accuracy over any window is a PromQL ratio."""
    stats = ("confidence", "margin", "normalized_entropy", "abstention_rate") if q.rows else ()
    for tag in (*stats, *(("accuracy", "ece") if q.labelled else ())):
        yield Scalar(f"outputs/{tag}", getattr(q, tag))
    yield Series("torchwatch_predictions", "counter", "Prediction rows measured.", q.rows)
    for stat in stats:
        yield Series("torchwatch_output_quality", "gauge", "Output quality of the latest interval.", getattr(q, stat),
                     (("stat", stat),))  # fmt: skip
    if q.labelled:
        yield Series("torchwatch_labelled", "counter", "Prediction rows with labels fed back.", q.labelled)
        yield Series("torchwatch_labelled_correct", "counter", "Labelled rows predicted right.",
                     round(q.accuracy * q.labelled))  # fmt: skip


values.register("outputs", decode=_decode, export=_export)
