"""What a monitor is: the protocol every capability of a watch implements.

A :class:`Monitor` contributes to four moments of a watch's life, each optional:

* **a call** — :meth:`~Monitor.bind` adds its module hooks through the engine
  (``engine.module_hook``); :meth:`~Monitor.before_call` / :meth:`~Monitor.after_call` run in the
  watched model's own pre- and post-hook, on sampled calls (``every_call = True``: on every call).
  Hooks run on the serving thread: device operations only, no host sync.
* **a window** — :meth:`~Monitor.take` runs on the serving thread when a flush cuts the window
  (or, with ``keep=True``, when a snapshot reads it): it swaps or copies the monitor's state and
  starts device copies, waiting for nothing.
* **a record or a snapshot** — :meth:`~Monitor.collect` turns what ``take`` returned into host
  values, on the watch's worker thread for a flush (``ctx.fold``: the interval's value, added to
  the totals since the reset) or on the caller's thread for a snapshot (the totals with the
  window). One step for both, so a snapshot and the records always agree. :meth:`~Monitor.merge`
  joins two intervals' values when the sinks are behind; :meth:`~Monitor.publish` gives what a
  :class:`~torchwatch.Record`, a :class:`~torchwatch.Snapshot` and a rule see, under
  ``record.<name>`` for the built-in fields and ``record.extra[name]`` for any other monitor.
* **a reset or a detach** — :meth:`~Monitor.reset`, :meth:`~Monitor.close`; :meth:`~Monitor.lost`
  reports what it could not record (it shows in ``watch.errors``).

Alerts go through the watch's alert bus: ``ctx.alert(alert)`` while collecting, ``bus.publish``
from anywhere else. A new monitor is one file and one line: ``tw.attach(model, monitors=[Mine()])``
(``examples/dead_rows_monitor.py`` is one written from scratch; ``tests/test_monitors.py`` tests it).
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..alerts import Alert

if TYPE_CHECKING:  # types only: the engine imports the monitors, never the other way round
    from ..engine.bus import AlertBus
    from ..engine.core import Engine

__all__ = ["Call", "Collect", "Monitor", "labels"]

ROOT_CALL = "(root call)"  # the key of watch.errors for failures in the model's own hooks

# (cohort, trace_id) of the root calls made in this context; see Watch.context.
labels: contextvars.ContextVar[tuple[str | None, str | None]] = contextvars.ContextVar(
    "torchwatch_labels", default=(None, None)
)


class Call:
    """One root call of the watched model, private to the thread running it.

    Attributes:
        index: the call's index since attaching (-1: a module ran outside any root call).
        sampled: whether this call is measured (``attach(every=...)``).
        cohort, trace_id: the labels of ``watch.context(...)`` (the cohort bounded by ``max_cohorts``).
        seq: measurements so far, their execution order within the call.
        events: host NaN/Inf measurements ``(seq, name, nan, +inf, -inf)``.
        device: device measurements ``(seq, name, table, slot)``, resolved at the flush.
        pending: small device outputs held for the call's grouped launch (activations monitor).
        raise_alert: the NaN/Inf alert to raise from the call with ``on_nonfinite="raise"``.
    """

    __slots__ = ("cohort", "device", "events", "index", "pending", "raise_alert", "sampled", "seq", "trace_id")

    def __init__(self, index: int, cohort: str | None, trace_id: str | None, *, sampled: bool = True) -> None:
        self.index = index
        self.sampled = sampled
        self.cohort = cohort
        self.trace_id = trace_id
        self.seq = 0
        self.events: list[tuple[int, str, int, int, int]] = []
        self.device: list[tuple[int, str, Any, int]] = []
        self.pending: Any = None
        self.raise_alert: Alert | None = None


@dataclass
class Collect:
    """The context of one collect step: a flush (``fold``) or a snapshot.

    Attributes:
        step: root calls so far (the x axis of the record being made).
        fold: True for a flush (values are the interval's and are added to the totals), False for
            a snapshot (values are the totals since the reset, the current window included).
        bus: the watch's alert bus.
        alerts: alerts found while collecting a flush; they go out with its record.
    """

    step: int
    fold: bool
    bus: AlertBus
    alerts: list[Alert] = field(default_factory=list)

    def alert(self, alert: Alert, *, trip: bool = False) -> None:
        """An alert found while collecting: kept and warned about once; in a flush it goes out
        with the record being made, in a snapshot with the next flush's. ``trip``: it also makes
        the watch unhealthy."""
        kept = self.bus.publish(alert, window=not self.fold, trip=trip)
        if self.fold and kept:
            self.alerts.append(alert)


class Monitor:
    """Base class of monitors: every method is optional and does nothing by default.

    Attributes:
        name: the key of its value in records, snapshots and rules (``record.drift`` for the
            built-in names ``drift``, ``latency``, ``inputs``, ``outputs``, ``timing``;
            ``record.extra[name]`` otherwise).
        error_key: the key of ``watch.errors`` that counts its hooks' failures (default ``name``).
        every_call: :meth:`before_call` / :meth:`after_call` on every root call, not only sampled ones.
        cohort_snapshot: also shown in ``snapshot(cohort=...)`` (most values are not split by cohort).

    Example:
        >>> import torch, torchwatch as tw
        >>> from torchwatch.monitors import Monitor
        >>> class CountCalls(Monitor):
        ...     name = "count_calls"
        ...     def __init__(self): self.n = self.total = 0
        ...     def after_call(self, call, output): self.n += 1
        ...     def take(self, *, keep): n = self.n; self.n = self.n if keep else 0; return n
        ...     def collect(self, taken, ctx):
        ...         if not ctx.fold: return self.total + taken
        ...         self.total += taken; return taken
        >>> model = torch.nn.Linear(2, 2)
        >>> with tw.attach(model, monitors=[CountCalls()]) as watch:
        ...     _ = model(torch.randn(1, 2)); _ = model(torch.randn(1, 2))
        ...     watch.snapshot().extra["count_calls"]
        2
    """

    name: str = ""
    error_key: str = ""
    every_call: bool = False
    cohort_snapshot: bool = False

    def bind(self, engine: Engine) -> None:
        """Attach time: add module hooks (``engine.module_hook``) and keep what the monitor needs
        (``engine.bus``, ``engine.graph_mode``, ...), never the engine itself: a monitor holding
        the engine makes a reference cycle, and a detached watch would wait for the garbage
        collector instead of being freed at once."""

    def graph_call(self) -> None:
        """A root call being traced (``torch.compile``) or captured (CUDA graph): device ops only."""

    def before_call(self, call: Call, args: Any, kwargs: dict[str, Any]) -> None:
        """The watched model's pre-hook (serving thread)."""

    def after_call(self, call: Call, output: Any) -> None:
        """The watched model's post-hook (serving thread)."""

    def take(self, *, keep: bool) -> Any:
        """Serving thread: this window's state with its device copies started (zeroed unless
        ``keep``); None when there is nothing new."""
        return None

    def collect(self, taken: Any, ctx: Collect) -> Any:
        """Host values of ``taken`` (see :class:`Collect`)."""
        return taken

    def merge(self, earlier: Any, later: Any) -> Any:
        """Two consecutive intervals' collected values as one (default: the later one)."""
        return later

    def publish(self, value: Any) -> Any:
        """What a record, a snapshot and the rules see of a collected value."""
        return value

    def active(self, value: Any) -> bool:
        """Whether the interval's value shows that something happened (a record and the rules are due)."""
        return False

    def lost(self) -> dict[str, int]:
        """What it could not record, by ``watch.errors`` key."""
        return {}

    def reset(self) -> None:
        """``watch.reset()``: forget the totals."""

    def close(self, timeout: float) -> None:
        """``watch.detach()``: stop threads, release resources."""
