"""What a sink receives, and the interface it implements."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .._schema import Fields
from ..alerts import Alert, FirstNonFinite
from ..errors import TorchwatchWarning
from ..stats import ModuleStats

ROOT_LABEL = "<root>"  # how the watched model's own output is named where "" would be unreadable


@dataclass(frozen=True)
class Record:
    """One flush: the statistics of the root calls since the previous flush.

    Attributes:
        step: root calls of the watched model seen so far (the x axis of every chart).
        time: Unix time of the flush.
        calls: root calls in this interval; ``sampled`` of them were measured.
        stats: per output position (``fqn``, ``fqn[1]``, ``fqn.key``), the interval's statistics.
        alerts: alerts raised in this interval.
        nonfinite: modules whose first NaN/Inf (since the last reset) fell in this interval.
        errors: hook and sink failures so far, by module or sink.
        drift: per drift-monitored module, its :class:`~torchwatch.drift.DriftStatus` after
            the windows completed in this interval (empty without ``attach(drift=...)``).
        latency: root-call latency in the interval (:class:`~torchwatch.latency.LatencyStats`:
            count, mean, max, p50/p95/p99 in ms; wall time on CPU, CUDA-event time on GPU), or None.
        inputs: per root-call input position, its :class:`~torchwatch.InputStats` (channel means,
            integer frequencies); float inputs' ModuleStats are in ``stats`` under the same name.
        outputs: the interval's :class:`~torchwatch.OutputQuality` with ``attach(outputs=...)``, or None.
        timing: per module, its :class:`~torchwatch.latency.LatencyStats` with ``attach(timing=True)``.
        merged: automatic flushes folded into this record because the watch's writer thread was
            behind (slow sinks, a busy process): the record covers their calls too; nothing is
            dropped. 0 normally.
    """

    step: int
    time: float
    calls: int
    sampled: int
    stats: Mapping[str, ModuleStats]
    alerts: tuple[Alert, ...] = ()
    nonfinite: Mapping[str, FirstNonFinite] = field(default_factory=dict)
    errors: Mapping[str, int] = field(default_factory=dict)
    drift: Mapping[str, Any] = field(default_factory=dict)
    latency: Any = None
    inputs: Mapping[str, Any] = field(default_factory=dict)
    outputs: Any = None
    timing: Mapping[str, Any] = field(default_factory=dict)
    merged: int = 0

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: NaN and infinities become ``null``."""
        return _json_safe(
            {
                "step": self.step,
                "time": self.time,
                "calls": self.calls,
                "sampled": self.sampled,
                "modules": {name: s.to_dict() for name, s in self.stats.items()},
                "alerts": [a.to_dict() for a in self.alerts],
                "nonfinite": {name: r.to_dict() for name, r in self.nonfinite.items()},
                "errors": dict(self.errors),
                "drift": {name: d.to_dict() for name, d in self.drift.items()},
                "latency": self.latency.to_dict() if self.latency is not None else None,
                "inputs": {name: i.to_dict() for name, i in self.inputs.items()},
                "outputs": self.outputs.to_dict() if self.outputs is not None else None,
                "timing": {name: t.to_dict() for name, t in self.timing.items()},
                "merged": self.merged,
            }
        )

    @classmethod
    def from_json(cls, doc: object, where: str = "record") -> Record:
        """A record read back from :meth:`to_json` (a JSONL line), every field checked.

        Statistics, alerts, non-finite records, drift and latency come back as their types; a
        JSON record holds only summaries of ``inputs`` and ``outputs`` (the ``to_dict`` of
        :class:`~torchwatch.InputStats` and :class:`~torchwatch.OutputQuality`), which come back
        as plain mappings. Fields a newer writer added are ignored; missing optional ones are
        empty.

        Raises:
            FormatError: not an object, or a field of the wrong type; the message names
                ``where`` and the field.
        """
        from ..drift import DriftStatus
        from ..edges import InputStats, OutputQuality
        from ..latency import LatencyStats

        f = Fields(doc, where)
        outputs = f.obj("outputs", optional=True)
        latency = f.obj("latency", optional=True)
        return cls(
            step=f.int("step"), time=f.float("time"), calls=f.count("calls"), sampled=f.count("sampled"),
            stats={name: ModuleStats.from_dict(m.doc, m.where) for name, m in f.items("modules")},
            alerts=tuple(
                Alert.from_dict(a, f"{where}, alerts[{i}]") for i, a in enumerate(f.list("alerts"))
            ),
            nonfinite={name: FirstNonFinite.from_dict(n.doc, n.where) for name, n in f.items("nonfinite")},
            errors=f.counts("errors"),
            drift={name: DriftStatus.from_dict(d.doc, d.where) for name, d in f.items("drift")},
            latency=LatencyStats.from_mapping(latency.doc, latency.where) if latency is not None else None,
            inputs={name: InputStats.summary_from_json(i) for name, i in f.items("inputs")},
            outputs=OutputQuality.summary_from_json(outputs) if outputs is not None else None,
            timing={name: LatencyStats.from_mapping(t.doc, t.where) for name, t in f.items("timing")},
            merged=f.count("merged"),
        )  # fmt: skip


_warned_replaced: set[str] = set()


def _warn_replaced(sink: Any) -> None:
    """Warn once per path that a log file vanished under a sink that was writing to it."""
    if sink.path in _warned_replaced:
        return
    _warned_replaced.add(sink.path)
    warnings.warn(
        f"torchwatch: {sink!r}: the file was deleted or rotated away while it was being written; a new one was "
        "started at the same path (check what removes the log directory)",
        TorchwatchWarning,
        stacklevel=2,
    )


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


class Sink:
    """Base class of sinks. Sinks run on torchwatch's writer thread, never the serving thread.

    Subclasses implement :meth:`write` and, where they hold resources, :meth:`flush` and
    :meth:`close`. An exception from any of them disables the sink (reported once); inference
    and the other sinks go on.

    Example:
        >>> import torch, torchwatch as tw
        >>> class PrintNaN(tw.Sink):
        ...     def write(self, record):
        ...         print(record.step, {name: s.nan for name, s in record.stats.items() if s.nan})
        >>> model = torch.nn.Sequential(torch.nn.ReLU())
        >>> with tw.attach(model, sinks=[PrintNaN()], on_nonfinite="ignore"):
        ...     _ = model(torch.tensor([float("nan"), 1.0]))
        1 {'<input>': 1, '0': 1}
    """

    def write(self, record: Record) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Push buffered output to its destination."""

    def close(self) -> None:
        """Release files, writers and ports; the sink is not used afterwards."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
