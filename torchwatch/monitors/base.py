"""What a monitor is: the protocol every capability of a watch implements, built-ins included.

The engine knows monitors only through this file. A :class:`Monitor` contributes to four moments
of a watch's life, each optional:

* **attach** — :meth:`~Monitor.bind` receives a :class:`Binding`: the alert bus, the selected
  modules, graph mode, cohorts, and the two ways to hook the model — ``binding.on_output`` (a
  per-module callback the engine runs on sampled eager calls only) and ``binding.module_hook``
  (a raw forward hook, for monitors that must also run under graphs or on every call).
* **a call** — :meth:`~Monitor.before_call` / :meth:`~Monitor.after_call` run in the watched
  model's own pre- and post-hook, on sampled calls (``every_call = True``: on every call), in
  ascending :attr:`~Monitor.call_order`. Hooks run on the serving thread: device operations
  only, no host sync.
* **a window** — :meth:`~Monitor.take` runs on the serving thread when a flush cuts the window
  (or, with ``keep=True``, when a snapshot reads it): it swaps or copies the monitor's state and
  starts device copies, waiting for nothing. :meth:`~Monitor.collect` turns that into the
  window's host value — on the watch's worker thread for a flush, on the caller's for a snapshot.
  The engine keeps the totals since the reset with :meth:`~Monitor.merge` (a snapshot shows the
  totals merged with the current window), so a monitor holds only its window. Per-position
  activation statistics and first NaN/Inf records go into the record's core fields through
  ``ctx.positions(...)``; :meth:`~Monitor.view` gives what a :class:`~torchwatch.Record`, a
  :class:`~torchwatch.Snapshot` and a rule see, under ``record.<name>`` for the built-in fields
  and ``record.extra[name]`` for any other monitor (its type registered with
  :func:`torchwatch.values.register` to come back typed from JSON and to export its own
  TensorBoard scalars and histograms and Prometheus series).
* **a reset or a detach** — :meth:`~Monitor.reset`, :meth:`~Monitor.close`; :meth:`~Monitor.lost`
  reports what it could not record (it shows in ``watch.errors``).

Alerts travel one lane, the watch's alert bus: ``ctx.alert(alert)`` while collecting,
``binding.bus.publish`` from anywhere else. A new monitor is one file and one line:
``tw.attach(model, monitors=[Mine()])`` (``examples/dead_rows_monitor.py`` is one written from
scratch; ``torchwatch/monitors/histograms.py`` a built-in one).
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from ..alerts import Alert, FirstNonFinite
from ..stats import ModuleStats

if TYPE_CHECKING:  # types only: the engine imports the monitors, never the other way round
    from ..engine.bus import AlertBus

__all__ = ["Binding", "Call", "Collect", "Monitor", "labels"]

ROOT_CALL = "(root call)"  # the key of watch.errors for failures in the model's own hooks

# (cohort, trace_id) of the root calls made in this context; see Watch.context.
labels: contextvars.ContextVar[tuple[str | None, str | None]] = contextvars.ContextVar(
    "torchwatch_labels", default=(None, None)
)

Position = tuple[str | None, str]  # (cohort, output position) of activation statistics


class Call:
    """One root call of the watched model, private to the thread running it.

    Attributes:
        index: the call's index since attaching (-1: a module ran outside any root call).
        sampled: whether this call is measured (``attach(every=...)``).
        cohort, trace_id: the labels of ``watch.context(...)`` (the cohort bounded by ``max_cohorts``).
        seq: measurements so far, their execution order within the call.
        events: host NaN/Inf measurements ``(seq, name, nan, +inf, -inf)``.
        device: device measurements ``(seq, name, table, slot)``, resolved at the flush.
        pending: small device outputs held for the call's grouped launch.
        detail: None, or a list the activation hooks also append each host measurement of this
            call to, as ``(name, raw)`` (a capture asks for it: the statistics of one call).
        raise_alert: an alert to raise from the call (``on_nonfinite="raise"``).
    """

    __slots__ = (
        "cohort",
        "detail",
        "device",
        "events",
        "index",
        "pending",
        "raise_alert",
        "sampled",
        "seq",
        "trace_id",
    )

    def __init__(self, index: int, cohort: str | None, trace_id: str | None, *, sampled: bool = True) -> None:
        self.index = index
        self.sampled = sampled
        self.cohort = cohort
        self.trace_id = trace_id
        self.seq = 0
        self.events: list[tuple[int, str, int, int, int]] = []
        self.device: list[tuple[int, str, Any, int]] = []
        self.pending: Any = None
        self.detail: list[tuple[str, Any]] | None = None
        self.raise_alert: Alert | None = None


class Binding:
    """What a monitor gets of the watch in :meth:`Monitor.bind` (made by the engine).

    Keep the parts you need (``bus``, ``graph_mode``, ...), never the binding itself: it holds
    the engine's hook registry, and a monitor that kept it would keep a detached watch alive
    until the garbage collector ran.

    Attributes:
        bus: the watch's alert bus (``publish``, ``count``, ``warn_once``, ``hook_failed``).
        modules: ``(name, module)`` of the modules the watch measures (``attach(modules=...)``).
        graph_mode: callable, True while ``torch.compile`` traces or a CUDA graph is captured.
        cohorts: the watch's cohort bound (``cohorts.bound(cohort)``).
        local: per-thread state of the call in progress (``local.call``: its :class:`Call`, or
            None outside one; ``local.depth``: nesting; ``local.aside``: True while the model runs
            a check the watch must not see (``Engine.exclusive``): hooks that run outside root
            calls skip it).
        device_lock, flush_lock: one device merge / one flush at a time.
    """

    __slots__ = ("_add_hook", "_model", "bus", "cohorts", "device_lock", "flush_lock", "graph_mode", "local", "modules")

    def __init__(self, *, bus: AlertBus, modules: list[tuple[str, nn.Module]], model: Callable[[], nn.Module | None],
                 graph_mode: Callable[[], bool], cohorts: Any, local: threading.local, device_lock: Any,
                 flush_lock: Any, add_hook: Callable[..., None]) -> None:  # fmt: skip
        self.bus = bus
        self.modules = modules
        self.graph_mode = graph_mode
        self.cohorts = cohorts
        self.local = local
        self.device_lock = device_lock
        self.flush_lock = flush_lock
        self._model = model
        self._add_hook = add_hook

    @property
    def model(self) -> nn.Module | None:
        """The watched model (None once it was garbage-collected)."""
        return self._model()

    def module_hook(self, module: nn.Module, hook: Callable[..., None], *, sampled: bool = True, pre: bool = False,
                    prepend: bool = False) -> None:  # fmt: skip
        """A raw forward hook (``pre``: a pre-hook) on ``module`` while the watch is attached.

        ``sampled``: only while a sampled call runs (with ``every > 1`` and python sampling the
        hooks are installed for those calls alone); False: on every call. It also runs under
        ``torch.compile`` tracing and graph capture (check ``graph_mode()``) and must catch its
        own exceptions (``bus.hook_failed``)."""
        self._add_hook(module, hook, sampled=sampled, pre=pre, prepend=prepend)

    def on_output(self, name: str, module: nn.Module, fn: Callable[[Call, Any], None], *, error_key: str) -> None:
        """``fn(call, output)`` after ``module`` runs in a sampled eager root call: never under
        graph tracing or capture, never outside a root call, never on an unsampled call. A
        failure is counted under ``error_key`` in ``watch.errors`` (inference goes on)."""
        local, graph_mode, bus = self.local, self.graph_mode, self.bus

        def torchwatch_output(module: nn.Module, args: Any, output: Any) -> None:
            call = getattr(local, "call", None)
            if call is None or not call.sampled or graph_mode():
                return
            try:
                fn(call, output)
            except Exception as exc:  # noqa: BLE001 - a hook never breaks inference
                bus.hook_failed(error_key or name, exc)

        self._add_hook(module, torchwatch_output, sampled=True, pre=False, prepend=False)


@dataclass
class Collect:
    """The context of one collect step: a flush (``fold``) or a snapshot.

    Attributes:
        step: root calls so far (the x axis of the record being made), graph replays reported
            with :meth:`replayed` included.
        fold: True for a flush (the interval goes into the totals), False for a snapshot.
        bus: the watch's alert bus.
        alerts: alerts found while collecting a flush; they go out with its record.
        stats, nonfinite, calls, sampled: what :meth:`positions` and :meth:`replayed` gathered.
    """

    step: int
    fold: bool
    bus: AlertBus
    alerts: list[Alert] = field(default_factory=list)
    stats: list[tuple[Position, ModuleStats]] = field(default_factory=list)
    nonfinite: dict[str, FirstNonFinite] = field(default_factory=dict)
    calls: int = 0
    sampled: int = 0

    def alert(self, alert: Alert, *, trip: bool = False, warn: str = "module") -> None:
        """An alert found while collecting: kept and warned about once (per ``warn``: ``"module"``
        or ``"rule"``); in a flush it goes out with the record being made, in a snapshot with the
        next flush's. ``trip``: it also makes the watch unhealthy."""
        kept = self.bus.publish(alert, window=not self.fold, trip=trip, warn=warn)
        if self.fold and kept:
            self.alerts.append(alert)

    def positions(self, stats: list[tuple[Position, ModuleStats]], nonfinite: dict[str, FirstNonFinite]) -> None:
        """Per-position statistics of this window, in execution order (``record.stats``,
        ``snapshot[name]``), and positions whose first NaN/Inf since the reset fell in it."""
        self.stats += stats
        for name, first in nonfinite.items():
            self.nonfinite.setdefault(name, first)

    def replayed(self, calls: int, sampled: int) -> None:
        """Root calls the engine did not see (replays of a captured graph), ``sampled`` of them
        measured: they count in the record's calls and step."""
        self.calls += calls
        self.sampled += sampled
        self.step += calls


class Monitor:
    """Base class of monitors: every method is optional and does nothing by default.

    Attributes:
        name: the key of its value in records, snapshots and rules (``record.drift`` for the
            built-in names ``drift``, ``latency``, ``inputs``, ``outputs``, ``timing``;
            ``record.extra[name]`` otherwise).
        error_key: the key of ``watch.errors`` that counts its hooks' failures (default ``name``).
        every_call: :meth:`before_call` / :meth:`after_call` on every root call, not only sampled ones.
        call_order: place of its call hooks among the monitors' (ascending; default 1). Latency
            uses 0 (it times the others), the activation statistics 2 (their after-call names
            where NaN/Inf started, which other monitors' measurements may add to).
        cohort_snapshot: also shown in ``snapshot(cohort=...)`` (most values are not split by cohort).

    Example:
        >>> import torch, torchwatch as tw
        >>> from torchwatch.monitors import Monitor
        >>> class CountCalls(Monitor):
        ...     name = "count_calls"
        ...     def __init__(self): self.n = 0
        ...     def after_call(self, call, output): self.n += 1
        ...     def take(self, *, keep): n = self.n; self.n = self.n if keep else 0; return n
        ...     def merge(self, earlier, later): return earlier + later
        >>> model = torch.nn.Linear(2, 2)
        >>> with tw.attach(model, monitors=[CountCalls()]) as watch:
        ...     _ = model(torch.randn(1, 2)); _ = model(torch.randn(1, 2))
        ...     watch.snapshot().extra["count_calls"]
        2
    """

    name: str = ""
    error_key: str = ""
    every_call: bool = False
    call_order: int = 1
    cohort_snapshot: bool = False

    def bind(self, binding: Binding) -> None:
        """Attach time: add hooks (``binding.on_output``, ``binding.module_hook``) and keep what
        the monitor needs of the binding (``binding.bus``, ...), never the binding itself."""

    def graph_call(self) -> None:
        """A root call being traced (``torch.compile``) or captured (CUDA graph): device ops only."""

    def before_call(self, call: Call, args: Any, kwargs: dict[str, Any]) -> None:
        """The watched model's pre-hook (serving thread)."""

    def after_call(self, call: Call, output: Any) -> None:
        """The watched model's post-hook (serving thread)."""

    def take(self, *, keep: bool) -> Any:
        """Serving thread: this window's state with its device copies started (the window
        restarts unless ``keep``); None when there is nothing new."""
        return None

    def collect(self, taken: Any, ctx: Collect) -> Any:
        """The window's host value from ``taken`` (see :class:`Collect`); None: no value."""
        return taken

    def merge(self, earlier: Any, later: Any) -> Any:
        """Two consecutive windows' collected values as one (default: the later one, for values
        that are a state rather than a count). The engine keeps the totals since the reset with
        it, and joins intervals' values when the sinks are behind."""
        return later

    def view(self, value: Any) -> Any:
        """What a record, a snapshot and the rules see of a collected value."""
        return value

    def active(self, value: Any) -> bool:
        """Whether the interval's value shows that something happened (a record and the rules are due)."""
        return False

    def lost(self) -> dict[str, int]:
        """What it could not record, by ``watch.errors`` key."""
        return {}

    def reset(self) -> None:
        """``watch.reset()``: forget what the window holds (the engine forgets the totals)."""

    def close(self, timeout: float) -> None:
        """``watch.detach()``: stop threads, release resources."""
