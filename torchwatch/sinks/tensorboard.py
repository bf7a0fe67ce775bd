"""TensorBoard event files, with a dashboard layout that opens on what matters."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from typing import Any

from .. import _validate, formats, values
from .._dist import install_hint
from ..errors import ConfigError
from ..records import Record, monitor_values
from . import _flagged
from .base import ROOT_LABEL, Sink

# Per-module scalars written at every flush (the ``step`` is the root-call count).
MOMENT_TAGS = ("mean", "std", "min", "max", "absmax")
COUNT_TAGS = ("nan", "posinf", "neginf")
FRACTION_TAGS = ("zeros", "subnormal")

_writers: dict[str, list[Any]] = {}  # logdir -> [EventFileWriter, users]
_writers_lock = threading.Lock()


def _import_tensorboard() -> Any:
    try:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
    except ImportError:
        raise ImportError(f"TensorBoardSink needs the tensorboard package: {install_hint('tensorboard')}") from None
    return event_pb2, summary_pb2, EventFileWriter


def _acquire(logdir: str) -> Any:
    """One event-file writer per log directory per process, shared by the sinks using it."""
    _, _, EventFileWriter = _import_tensorboard()
    with _writers_lock:
        entry = _writers.get(logdir)
        if entry is None:
            os.makedirs(logdir, exist_ok=True)
            entry = _writers[logdir] = [EventFileWriter(logdir, max_queue_size=1000, flush_secs=30), 0]
        entry[1] += 1
        return entry[0]


def _release(logdir: str) -> None:
    with _writers_lock:
        entry = _writers.get(logdir)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _writers[logdir]
            entry[0].close()


ALERTS_TOTAL = r"(.*/)?torchwatch/alerts_total/.*"
ALERT_RECORDS_TAG = "torchwatch/alert_records"  # each interval's alerts as JSON, read by `torchwatch report`
ALERT_RECORDS_PLUGIN = "torchwatch_alerts"


def layout(cast_dtypes: tuple[str, ...] | list[str]) -> dict[str, dict[str, list[Any]]]:
    """The ``custom_scalars`` layout, what changed first: alerts by rule, the modules alerts named
    (one colour each), the drift score and latency; then NaN/Inf, cast under/overflow, inputs,
    outputs, range and dead units, drift."""
    casts = {}
    for name in cast_dtypes:
        casts[f"would underflow in {name} (fraction)"] = ["Multiline", [rf".*/underflow_frac_{name}$"]]
        casts[f"would overflow in {name} (fraction)"] = ["Multiline", [rf".*/overflow_frac_{name}$"]]
    return {
        "torchwatch: what changed": {
            "alerts so far, by rule (a step up per alert; text: TEXT tab)": ["Multiline", [ALERTS_TOTAL]],
            **_flagged.charts(),
            "drift score (1 = threshold; high for a whole episode)": ["Multiline", [r"(.*/)?drift/.*/score$"]],
            "latency p99 (ms)": ["Multiline", [r"(.*/)?torchwatch/latency_p99_ms$"]],
        },
        "torchwatch: NaN / Inf": {
            "NaN per interval": ["Multiline", [r".*/nan$"]],
            "+Inf per interval": ["Multiline", [r".*/posinf$"]],
            "-Inf per interval": ["Multiline", [r".*/neginf$"]],
        },
        "torchwatch: fp16 / bf16 / fp8 casts": casts,
        "torchwatch: inputs": {
            "channel means": ["Multiline", [r"(.*/)?inputs/.*/channel_mean_\d+$"]],
            "most frequent id's share": ["Multiline", [r"(.*/)?inputs/.*/top1_fraction$"]],
            "distinct ids": ["Multiline", [r"(.*/)?inputs/.*/distinct$"]],
            "abs-max of the inputs": ["Multiline", [r"(.*/)?<input>.*/absmax$"]],
        },
        "torchwatch: outputs": {
            "confidence, margin, entropy": ["Multiline", [r"(.*/)?outputs/(confidence|margin|normalized_entropy)$"]],
            "abstention rate": ["Multiline", [r"(.*/)?outputs/abstention_rate$"]],
            "accuracy and ECE (labelled intervals)": ["Multiline", [r"(.*/)?outputs/(accuracy|ece)$"]],
        },
        "torchwatch: latency": {
            "root-call latency (ms)": ["Multiline", [r"(.*/)?torchwatch/latency_.*_ms$"]],
        },
        "torchwatch: dead units and range": {
            "zero fraction": ["Multiline", [r".*/zeros_frac$"]],
            "abs-max": ["Multiline", [r".*/absmax$"]],
        },
        "torchwatch: embedding drift": {
            "detector score (alarms at its threshold)": ["Multiline", [r"(.*/)?drift/.*/score$"]],
            "p-value of the last window": ["Multiline", [r"(.*/)?drift/.*/p_value$"]],
            "drift alarms per interval": ["Multiline", [r"(.*/)?drift/.*/alarms$"]],
        },
    }


class TensorBoardSink(Sink):
    """Writes each flush as TensorBoard scalars under ``logdir``.

    Tags are grouped by module path (TensorBoard groups by the part before the first ``/``;
    the watched model's own output is ``<root>``):

    * ``<fqn>/mean``, ``/std``, ``/min``, ``/max``, ``/absmax`` over finite elements;
    * ``<fqn>/nan``, ``/posinf``, ``/neginf``: counts in the interval since the previous flush;
    * ``<fqn>/zeros_frac``, ``/subnormal_frac``: fractions of the interval's elements;
    * ``<fqn>/underflow_frac_<dtype>``, ``/overflow_frac_<dtype>`` for each cast dtype;
    * ``torchwatch/alerts``: alerts raised in the interval, ``torchwatch/alerts/<rule>`` per rule
      and ``torchwatch/alerts_total/<rule>``, the rule's alerts written since attach (both from its
      first alert on; repeats the alert policy suppressed are not written, see ``AlertPolicy``);
      the alerts' text (call, rule, module, request, message) in the *Text* tab under
      ``torchwatch/alerts``, and as data (JSON) under ``torchwatch/alert_records``, which
      ``torchwatch report`` reads;
    * ``torchwatch/latency_p50_ms``, ``_p95_ms``, ``_p99_ms``, ``_max_ms``: root-call latency;
    * ``torchwatch/baselines_learning``: the alert rules' baseline series still in warm-up (no
      baseline alert can come from them yet), 0 once every baseline is learned;
    * ``inputs/<input>/channel_mean_<c>``, ``/top1_fraction``, ``/distinct``: input monitors;
    * ``outputs/confidence``, ``/margin``, ``/normalized_entropy``, ``/abstention_rate``, and
      ``/accuracy``, ``/ece`` in intervals with labels (``attach(outputs=...)``);
    * ``timing/<fqn>/p50_ms``, ``/p99_ms`` with ``attach(timing=True)``;
    * ``drift/<fqn>/score``, ``/p_value``, ``/alarms`` for modules under drift monitoring: the
      detector's statistic, the module's p-value for the last window, and drift alarms
      attributed to the module in the interval;
    * ``extra/<monitor>/<key>/...``: every number in the value of a monitor added with
      ``attach(monitors=...)`` (nested mappings give the path; at most 256 per monitor).

    A module an alert names (the first 8) also gets a run of its own, ``<logdir>/flagged/<module>``,
    with ``flagged/log10-abs-max``, ``/NaN+Inf`` and ``/zero-fraction``, starting with its last
    32 records: TensorBoard colours lines by run, so there each alerted module has its own colour.

    A ``custom_scalars`` layout (the *Custom Scalars* tab) opens on what changed (alerts by rule,
    the alerted modules, the drift score, latency), then puts NaN/Inf, cast under/overflow, inputs, outputs, latency,
    range and zero fractions of every module on shared charts. One event-file writer is shared per
    log directory in a process; ``prefix`` keeps two watches writing to one directory apart.
    The directory is created on the first write; if it cannot be, the sink is reported and
    disabled and serving goes on. Requires the ``tensorboard`` extra.

    Args:
        logdir: the log directory (``tensorboard --logdir`` it).
        prefix: prepended to every tag, e.g. ``"replica0/"``.

    Raises:
        ImportError: tensorboard is not installed.

    Example:
        >>> import os, tempfile, torch, torchwatch as tw
        >>> logdir = tempfile.mkdtemp()
        >>> model = torch.nn.Linear(4, 2)
        >>> with tw.attach(model, sinks=[tw.TensorBoardSink(logdir)]):
        ...     _ = model(torch.randn(3, 4))
        >>> sorted(os.listdir(logdir))[0].startswith("events.out.tfevents")
        True
    """

    def __init__(self, logdir: str | os.PathLike[str], *, prefix: str = "") -> None:
        logdir = _validate.path("TensorBoardSink", "logdir", logdir)
        if not isinstance(prefix, str):
            raise ConfigError(f"TensorBoardSink: prefix must be a string, got {prefix!r}")
        self._pb = _import_tensorboard()
        self.logdir = os.path.abspath(logdir)
        self.prefix = prefix
        self._writer: Any = None
        self._layout_written = False
        self._rules: Counter[str] = Counter()  # alerts so far per rule: charted (0 when quiet) from its first on
        self._flagged = _flagged.FlaggedRuns(self.logdir, prefix, _acquire, _release, self._event)

    def _scalars(self, record: Record) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        for name, s in record.stats.items():
            base = f"{self.prefix}{name or ROOT_LABEL}/"
            out += [(base + tag, getattr(s, tag)) for tag in MOMENT_TAGS]
            out += [(base + tag, float(getattr(s, tag))) for tag in COUNT_TAGS]
            count = max(s.count, 1)
            out += [(f"{base}{tag}_frac", getattr(s, tag) / count) for tag in FRACTION_TAGS]
            out += [(f"{base}underflow_frac_{k}", v / count) for k, v in s.underflow.items()]
            out += [(f"{base}overflow_frac_{k}", v / count) for k, v in s.overflow.items()]
        out.append((f"{self.prefix}torchwatch/alerts", float(len(record.alerts))))
        per_rule = Counter(a.rule for a in record.alerts)
        self._rules.update(per_rule)
        out += [(f"{self.prefix}torchwatch/alerts/{rule}", float(per_rule[rule])) for rule in self._rules]
        out += [(f"{self.prefix}torchwatch/alerts_total/{rule}", float(n)) for rule, n in self._rules.items()]
        if record.baselines is not None:
            out.append((f"{self.prefix}torchwatch/baselines_learning", float(record.baselines.learning)))
        return out

    def _event(self, step: int, wall_time: float, scalars: list[tuple[str, float]],
               histograms: list[values.Histogram] = ()) -> Any:  # fmt: skip
        event_pb2, summary_pb2, _ = self._pb
        items = [summary_pb2.Summary.Value(tag=tag, simple_value=value) for tag, value in scalars]
        items += [summary_pb2.Summary.Value(tag=self.prefix + h.tag, histo=_histogram_proto(summary_pb2, h))
                  for h in histograms]  # fmt: skip
        return event_pb2.Event(wall_time=wall_time, step=step, summary=summary_pb2.Summary(value=items))

    def write(self, record: Record) -> None:
        event_pb2 = self._pb[0]
        if self._writer is None:
            self._writer = _acquire(self.logdir)
        if not self._layout_written:
            self._write_layout(record, event_pb2)
        scalars, histograms = self._scalars(record), []
        for name, value in monitor_values(record).items():  # what each monitor's value exports
            for item in values.exports(name, value, record):
                if isinstance(item, values.Scalar):
                    scalars.append((self.prefix + item.tag, float(item.value)))
                elif isinstance(item, values.Histogram):
                    histograms.append(item)
        self._writer.add_event(self._event(record.step, record.time, scalars, histograms))
        self._flagged.write(record)
        if record.alerts:
            for summary in (self._alert_text(record), self._alert_records(record)):
                self._writer.add_event(event_pb2.Event(wall_time=record.time, step=record.step, summary=summary))

    def _alert_text(self, record: Record) -> Any:
        """The interval's alerts as Markdown lines for TensorBoard's *Text* tab (a table's narrow
        columns wrapped words letter by letter)."""
        from torch.utils.tensorboard.summary import text

        def plain(value: object) -> str:  # Markdown's marks shown as themselves; <input> is not an HTML tag
            out = "".join("\\" + c if c in "\\`*_[]#" else c for c in str(value).replace("\n", " "))
            return out.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

        lines = []
        for a in record.alerts:
            where = f" in `{a.module}`" if a.module else ""
            request = f", request `{a.trace_id}`" if a.trace_id else ""
            when = f"at call {a.call}" if a.call >= 0 else "between calls"  # a background check (fingerprint)
            lines.append(f"* **{plain(a.rule)}**{where} {when}{request}: {plain(a.message)}")
        return text(f"{self.prefix}torchwatch/alerts", "\n".join(lines))

    def _alert_records(self, record: Record) -> Any:
        """The interval's alerts as data (a JSON list of ``Alert.to_dict()``) for ``torchwatch report``:
        a string tensor under a plugin name of its own, which TensorBoard shows no tab for."""
        from tensorboard.compat.proto import tensor_pb2, types_pb2

        summary_pb2 = self._pb[1]
        data = formats.json_line([a.to_dict() for a in record.alerts])
        value = summary_pb2.Summary.Value(
            tag=f"{self.prefix}{ALERT_RECORDS_TAG}",
            metadata=summary_pb2.SummaryMetadata(
                plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=ALERT_RECORDS_PLUGIN)
            ),
            tensor=tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[data]),
        )
        return summary_pb2.Summary(value=[value])

    def _write_layout(self, record: Record, event_pb2: Any) -> None:
        from torch.utils.tensorboard.summary import custom_scalars

        names: list[str] = []
        for s in record.stats.values():
            names += [k for k in s.underflow if k not in names]
        summary = custom_scalars(layout(names))
        self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=0, summary=summary))
        self._layout_written = True

    @property
    def flagged(self) -> dict[str, str]:
        """The modules with a run of their own (alerted), each with its run directory."""
        return self._flagged.modules

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()
        self._flagged.flush()

    def close(self) -> None:
        self._flagged.close()
        if self._writer is not None:
            self._writer.flush()
            self._writer = None
            _release(self.logdir)

    def __repr__(self) -> str:
        return f"TensorBoardSink({self.logdir!r})"


def _histogram_proto(summary_pb2: Any, h: values.Histogram) -> Any:
    """TensorBoard's histogram: ``bucket[i]`` values up to ``bucket_limit[i]`` (above the previous
    limit); the first edge is the lower limit of the first bucket, given as an empty bucket."""
    counts = [0.0, *map(float, h.counts)]
    mids = [(a + b) / 2 for a, b in zip(h.edges, h.edges[1:], strict=False)]
    num = sum(counts)
    total = sum(m * c for m, c in zip(mids, h.counts, strict=True))
    filled = [i for i, c in enumerate(h.counts) if c]
    return summary_pb2.HistogramProto(
        min=h.edges[filled[0]] if filled else 0.0, max=h.edges[filled[-1] + 1] if filled else 0.0, num=num,
        sum=total, sum_squares=sum(m * m * c for m, c in zip(mids, h.counts, strict=True)),
        bucket_limit=list(map(float, h.edges)), bucket=counts,
    )  # fmt: skip
