"""Latency of root calls (every call) and of watched modules (``attach(timing=True)``).

Timings go into a mergeable quantile sketch with a guaranteed relative error.

The sketch keeps counts in logarithmic buckets: a value ``x > 0`` goes to bucket
``ceil(log(x) / log(gamma))`` with ``gamma = (1 + a) / (1 - a)``, and a bucket's representative
value ``2 gamma^i / (gamma + 1)`` is within a relative error ``a`` of every value in it. So any
quantile it returns is within ``a`` (default 1%) of a value of the data at that rank, whatever the
distribution; sketches of different threads, intervals or processes merge by adding counts, and
the memory is bounded by the range of values (about 1,400 buckets span 1 µs to 1 hour at 1%).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import values
from .._schema import Fields, entries
from ..errors import ConfigError
from ..values import Export, Scalar, Series, module_label
from .base import ROOT_CALL, Binding, Call, Collect, Monitor

__all__ = ["LatencySketch", "LatencyStats"]

QUANTILES = (0.5, 0.95, 0.99)
MAX_PENDING = 4096  # timings held between flushes before they are folded in on the serving thread


@dataclass
class LatencySketch:
    """Counts of values in logarithmic buckets (relative accuracy ``accuracy``).

    Example:
        >>> from torchwatch.monitors.latency import LatencySketch
        >>> s = LatencySketch()
        >>> s.add_all([0.010, 0.011, 0.012, 0.100])
        >>> round(s.quantile(0.5), 4), s.count
        (0.011, 4)
    """

    accuracy: float = 0.01
    buckets: dict[int, int] = field(default_factory=dict)
    count: int = 0
    total: float = 0.0
    min: float = math.inf
    max: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.accuracy < 1:
            raise ConfigError(f"LatencySketch accuracy must be in (0, 1), got {self.accuracy!r}")
        self._log_gamma = math.log((1 + self.accuracy) / (1 - self.accuracy))

    def add(self, seconds: float) -> None:
        """Add one value (seconds; values <= 0 count as the smallest bucket)."""
        x = max(seconds, 1e-9)
        i = math.ceil(math.log(x) / self._log_gamma)
        self.buckets[i] = self.buckets.get(i, 0) + 1
        self.count += 1
        self.total += seconds
        self.min = min(self.min, seconds)
        self.max = max(self.max, seconds)

    def add_all(self, values: Iterable[float]) -> None:
        for v in values:
            self.add(v)

    def merge(self, other: LatencySketch) -> LatencySketch:
        """A new sketch holding both (the accuracies must match)."""
        if other.accuracy != self.accuracy:
            raise ConfigError("cannot merge latency sketches of different accuracy")
        out = LatencySketch(self.accuracy, dict(self.buckets), self.count + other.count, self.total + other.total,
                            min(self.min, other.min), max(self.max, other.max))  # fmt: skip
        for i, n in other.buckets.items():
            out.buckets[i] = out.buckets.get(i, 0) + n
        return out

    def quantile(self, q: float) -> float:
        """The value at quantile ``q`` (within the relative accuracy), NaN when empty."""
        if self.count == 0:
            return math.nan
        rank = q * (self.count - 1)
        seen = 0
        gamma = math.exp(self._log_gamma)
        for i in sorted(self.buckets):
            seen += self.buckets[i]
            if seen > rank:
                value = 2 * gamma**i / (gamma + 1)
                return min(max(value, self.min), self.max)
        return self.max

    def stats(self) -> LatencyStats:
        """Count, mean, max and the p50/p95/p99 quantiles, in milliseconds."""
        if self.count == 0:
            return LatencyStats()
        return LatencyStats(
            count=self.count, mean_ms=1e3 * self.total / self.count, max_ms=1e3 * self.max,
            p50_ms=1e3 * self.quantile(0.5), p95_ms=1e3 * self.quantile(0.95), p99_ms=1e3 * self.quantile(0.99),
        )  # fmt: skip


@dataclass(frozen=True)
class LatencyStats:
    """Root-call latency over an interval or since the last reset (milliseconds; NaN when no call)."""

    count: int = 0
    mean_ms: float = math.nan
    max_ms: float = math.nan
    p50_ms: float = math.nan
    p95_ms: float = math.nan
    p99_ms: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any], where: str = "latency") -> LatencyStats:
        """Inverse of :meth:`to_dict` (null numbers read as NaN); FormatError naming a bad field."""
        f = Fields(m, where)
        return cls(
            count=f.count("count"), mean_ms=f.float("mean_ms"), max_ms=f.float("max_ms"), p50_ms=f.float("p50_ms"),
            p95_ms=f.float("p95_ms"), p99_ms=f.float("p99_ms"),
        )  # fmt: skip


class CallTimer:
    """Times root calls: wall clock on CPU, CUDA events on accelerators, never waiting for the device.

    ``start()``/``stop(token)`` run in the root hooks of the serving thread. On CUDA a call's pair
    of events is kept pending and read by :meth:`take` (the flush worker) once the device has passed
    the end event (``query()``), so timing adds no host sync; a pair still running at a flush is read
    at a later one. ``event_factory`` exists so the pending/resolve logic is tested on CPU.
    """

    def __init__(self, *, cuda: bool = False, accuracy: float = 0.01, event_factory: Any = None) -> None:
        self.cuda = cuda
        self._event = event_factory
        if cuda and event_factory is None:
            self._event = lambda: torch.cuda.Event(enable_timing=True)
        self._lock = threading.Lock()
        self._pending: deque[tuple[Any, Any]] = deque()
        self._raw: list[float] = []  # CPU durations, bucketed off the serving thread
        self.dropped = 0  # device timings dropped because no flush read them in time
        self._window = LatencySketch(accuracy)

    def start(self) -> Any:
        if self._event is not None:
            event = self._event()
            event.record()
            return event
        return time.perf_counter()

    def stop(self, token: Any) -> None:
        if self._event is not None:
            end = self._event()
            end.record()
            with self._lock:
                self._pending.append((token, end))
                if len(self._pending) > MAX_PENDING:  # never flushed: read what finished, drop the oldest
                    self._drain()
                    while len(self._pending) > MAX_PENDING:
                        self._pending.popleft()
                        self.dropped += 1
            return
        elapsed = time.perf_counter() - token
        with self._lock:
            self._raw.append(elapsed)
            if len(self._raw) >= MAX_PENDING:  # never flushed: keep memory bounded
                self._drain()

    def _drain(self) -> None:  # caller holds the lock
        raw, self._raw = self._raw, []
        self._window.add_all(raw)
        while self._pending and self._pending[0][1].query():
            start, end = self._pending.popleft()
            self._window.add(start.elapsed_time(end) / 1e3)

    def take(self) -> LatencyStats:
        """The interval's statistics (finished device timings folded in); the window restarts."""
        return self.take_sketch().stats()

    def take_sketch(self) -> LatencySketch:
        """Like :meth:`take`, as a mergeable sketch (never waits: device timings not finished yet
        stay pending for a later window)."""
        with self._lock:
            self._drain()
            window, self._window = self._window, LatencySketch(self._window.accuracy)
        return window

    def peek(self) -> LatencyStats:
        """The current window's statistics (finished device timings), the window kept."""
        return self.peek_sketch().stats()

    def peek_sketch(self) -> LatencySketch:
        """Like :meth:`peek`, as a mergeable sketch."""
        with self._lock:
            self._drain()
            return self._window.merge(LatencySketch(self._window.accuracy))

    def reset(self) -> None:
        """Forget the window (timings still pending on the device go to the next one)."""
        with self._lock:
            self._drain()
            self._window = LatencySketch(self._window.accuracy)


LATENCY_LOST = "latency timings lost"  # device timings no flush read in time


def _warn_lost(bus: Any, timers: list[CallTimer]) -> None:
    if any(t.dropped for t in timers):
        bus.warn_once(
            "latency-lost",
            "device timings of calls were dropped because no flush read them in time (counted in "
            f"watch.errors[{LATENCY_LOST!r}]); flush more often (attach(flush_every=...))",
        )


class Latency(Monitor):
    """Root-call latency, on every call. Value: a :class:`LatencySketch`; published as :class:`LatencyStats`."""

    name = "latency"
    error_key = ROOT_CALL
    every_call = True
    call_order = 0  # first before the call and last after it: the others' hooks are timed too

    def __init__(self, *, cuda: bool) -> None:
        self.timer = CallTimer(cuda=cuda)
        self._tls = threading.local()

    def bind(self, binding: Binding) -> None:
        self._bus = binding.bus

    def before_call(self, call: Call, args: Any, kwargs: dict[str, Any]) -> None:
        self._tls.t0 = None
        self._tls.t0 = self.timer.start()

    def after_call(self, call: Call, output: Any) -> None:
        t0, self._tls.t0 = getattr(self._tls, "t0", None), None
        if t0 is not None:
            self.timer.stop(t0)

    def take(self, *, keep: bool) -> LatencySketch | None:
        sketch = self.timer.peek_sketch() if keep else self.timer.take_sketch()
        return sketch if sketch.count or keep else None

    def collect(self, taken: LatencySketch | None, ctx: Collect) -> LatencySketch | None:
        _warn_lost(self._bus, [self.timer])
        return taken

    def merge(self, earlier: LatencySketch, later: LatencySketch) -> LatencySketch:
        return earlier.merge(later)

    def view(self, value: LatencySketch) -> LatencyStats:
        return value.stats()

    def active(self, value: LatencySketch) -> bool:
        return value.count > 0

    def lost(self) -> dict[str, int]:
        return {LATENCY_LOST: self.timer.dropped}

    def reset(self) -> None:
        self.timer.reset()


class Timing(Monitor):
    """Per-module latency with ``attach(timing=True)``: pre- and post-hooks on sampled calls
    (wall clock on CPU, CUDA events on GPU). Value: ``{module: LatencySketch}``."""

    name = "timing"

    def __init__(self, *, cuda: bool) -> None:
        self.timers: dict[str, CallTimer] = {}  # per watched module, made at bind
        self._cuda = cuda
        self._tls = threading.local()

    def bind(self, binding: Binding) -> None:
        self._bus = binding.bus
        graph_mode = binding.graph_mode
        for name, module in binding.modules:
            self.timers[name] = CallTimer(cuda=self._cuda)
            before, after = self._hooks(name, graph_mode, binding.local)
            binding.module_hook(module, before, pre=True)
            binding.module_hook(module, after, prepend=True)  # first, so the statistics are not timed

    def _hooks(self, fqn: str, graph_mode: Any, local: Any) -> tuple[Any, Any]:
        timer, tls, bus = self.timers[fqn], self._tls, self._bus

        def torchwatch_time_start(module: Any, args: Any) -> None:
            if graph_mode() or getattr(local, "aside", False):
                return
            try:
                tls.__dict__.setdefault("timing", {}).setdefault(fqn, []).append(timer.start())
            except Exception as exc:  # noqa: BLE001 - a hook never breaks inference
                bus.hook_failed(fqn, exc)

        def torchwatch_time_stop(module: Any, args: Any, output: Any) -> None:
            stack = getattr(tls, "timing", {}).get(fqn)
            if not stack or graph_mode():
                return
            try:
                timer.stop(stack.pop())
            except Exception as exc:  # noqa: BLE001 - a hook never breaks inference
                bus.hook_failed(fqn, exc)

        return torchwatch_time_start, torchwatch_time_stop

    def take(self, *, keep: bool) -> dict[str, LatencySketch]:
        return {name: timer.peek_sketch() if keep else timer.take_sketch() for name, timer in self.timers.items()}

    def collect(self, taken: dict[str, LatencySketch], ctx: Collect) -> dict[str, LatencySketch]:
        _warn_lost(self._bus, list(self.timers.values()))
        return taken

    def merge(self, earlier: dict[str, LatencySketch], later: dict[str, LatencySketch]) -> dict[str, LatencySketch]:
        return {**earlier, **{n: earlier[n].merge(t) if n in earlier else t for n, t in later.items()}}

    def view(self, value: dict[str, LatencySketch]) -> dict[str, LatencyStats]:
        return {name: sketch.stats() for name, sketch in value.items() if sketch.count}

    def lost(self) -> dict[str, int]:
        return {LATENCY_LOST: sum(t.dropped for t in self.timers.values())}

    def reset(self) -> None:
        for timer in self.timers.values():
            timer.reset()


def _export_latency(value: LatencyStats, record: Any) -> Iterator[Export]:
    """Root-call latency quantiles: TensorBoard scalars (ms) and Prometheus gauges (seconds)."""
    if not value.count:
        return
    for tag in ("p50_ms", "p95_ms", "p99_ms", "max_ms"):
        yield Scalar(f"torchwatch/latency_{tag}", getattr(value, tag))
    for q, ms in (("0.5", value.p50_ms), ("0.95", value.p95_ms), ("0.99", value.p99_ms)):
        yield Series("torchwatch_latency_seconds", "gauge", "Root-call latency quantiles, last interval.", ms / 1e3,
                     (("quantile", q),))  # fmt: skip


def _decode_timing(doc: Any, where: str) -> dict[str, LatencyStats]:
    return {name: LatencyStats.from_mapping(f.doc, f.where) for name, f in entries(doc, where)}


def _export_timing(value: Mapping[str, LatencyStats], record: Any) -> Iterator[Export]:
    for name, stats in value.items():
        yield Scalar(f"timing/{module_label(name)}/p50_ms", stats.p50_ms)
        yield Scalar(f"timing/{module_label(name)}/p99_ms", stats.p99_ms)


values.register("latency", decode=LatencyStats.from_mapping, export=_export_latency)
values.register("timing", decode=_decode_timing, export=_export_timing)
