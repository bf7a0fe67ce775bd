"""The engine of a watch: root calls, hooks, windows, and the way to the sinks.

Data path, one direction::

    model(x) ─► root pre-hook: Call (index, sampled?, labels) ─► monitors' before_call
              ─► module hooks (installed for sampled calls) ─► monitors measure on the device
              ─► root post-hook: monitors' after_call (NaN/Inf origin) ─► every flush_every calls:
    flush (serving thread): monitors' take() cut the window, start device copies ─► Cut
              ─► worker thread: monitors' collect() (waits for the copies, folds into totals)
              ─► rules on the interval (alert bus) ─► RecordParts ─► Record ─► sinks

A snapshot runs the same take/collect, keeping the window in place, and shows the totals since
the reset (kept here, merged with each monitor's ``merge``) with the window. The engine knows
monitors only through :mod:`torchwatch.monitors.base`: the activation statistics are one monitor
among the others, whose ``ctx.positions(...)`` fill the record's ``stats`` and ``nonfinite``.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..alerts import Alert
from ..errors import NonFiniteError
from ..kernels.graph_op import compiling
from ..monitors.base import ROOT_CALL, Binding, Call, Collect, Monitor, labels
from ..records import Record, Snapshot, Warmup
from ..rules import run_rules, warmup
from ..sinks.base import Sink
from .bus import AlertBus
from .hooks import HookSet
from .totals import Totals
from .window import Cut, RecordParts
from .worker import Worker

OTHER_COHORT = "__other__"
WORKER = "(worker)"  # the key of watch.errors for failures while finishing a flush
MERGE_RECORDS_BEHIND = 8  # intervals waiting for the worker before it merges records for the sinks
# intervals waiting for the worker before automatic flushes stop cutting new ones and merge into the
# window (the last resort that bounds memory; normally the worker merges records, not intervals)
MAX_PENDING_FLUSHES = 64
RECORDS_NOT_WRITTEN = "records not written"  # flushes unfinished when detach() stopped waiting


class GraphMode:
    """Callable: True while torch.compile traces, or while a CUDA graph is being captured.

    A small object of its own so monitors can keep it without keeping the engine (a monitor that
    held the engine would make a reference cycle, and every detached watch would wait for the
    garbage collector instead of being freed at once)."""

    __slots__ = ("cuda",)

    def __init__(self) -> None:
        self.cuda = False  # a monitor measures on a CUDA device: graph capture is possible

    def __call__(self) -> bool:
        return compiling() or (self.cuda and torch.cuda.is_current_stream_capturing())


class Cohorts:
    """The cohorts kept apart (``attach(max_cohorts=...)``); later new ones become ``"__other__"``."""

    def __init__(self, max_cohorts: int, bus: AlertBus) -> None:
        self._max = max_cohorts
        self._bus = bus
        self._known: set[str | None] = {None}
        self._lock = threading.Lock()

    def bound(self, cohort: str | None) -> str | None:
        """``cohort``, or ``"__other__"`` once ``max_cohorts`` others were seen (warned once)."""
        if cohort in self._known:
            return cohort
        with self._lock:
            if len(self._known) <= self._max:
                self._known.add(cohort)
                return cohort
        self._bus.warn_once(
            "cohorts",
            f"more than {self._max} cohorts; cohort {cohort!r} and later new ones are merged "
            f"into {OTHER_COHORT!r}. Raise attach(max_cohorts=...) if you need them apart.",
        )
        return OTHER_COHORT


class Engine:
    """Root calls, hook installation, flushes and snapshots of one watch (made by :class:`~torchwatch.Watch`).

    Public to tools: :attr:`bus`, :attr:`model`, :attr:`calls`, :meth:`monitor`, :meth:`add_monitor`.
    Monitors get a :class:`~torchwatch.monitors.Binding` instead (the engine's parts they may use),
    and keep what they need of it, never the engine (that would be a reference cycle).
    """

    def __init__(
        self,
        model: nn.Module,
        monitors: Sequence[Monitor],
        *,
        modules: list[tuple[str, nn.Module]],
        every: int,
        sampling: str,
        flush_every: int,
        max_cohorts: int,
        rules: list[Any],
        alert_policy: Any,
        sinks: list[Sink],
        bus: AlertBus,
    ) -> None:
        self.bus = bus
        self.every = every
        self.sampling = sampling
        self.flush_every = flush_every
        self.rules = rules
        self.alert_policy = alert_policy
        self._monitors = list(monitors)
        self._order_hooks()
        self._model = weakref.ref(model)
        self.graph_mode = GraphMode()
        self._lock = threading.Lock()  # call counters
        # root calls in flight, and the gate that holds new ones back while a check has the model to
        # itself (exclusive(): a canary re-run between requests); _paused is read once per call
        self._inflight = 0
        self._paused = False
        self._idle = threading.Condition(self._lock)
        self._exclusive = threading.Lock()
        self.flush_lock = threading.RLock()  # one flush / snapshot / reset at a time
        self.device_lock = threading.Lock()  # device merges are several ops: one thread at a time
        # .call: this thread's root Call (None outside one, or when its bookkeeping failed), .depth:
        # nesting; hooks read it directly (one attribute, no call)
        self.local = threading.local()
        self.cohorts = Cohorts(max_cohorts, bus)
        self._calls = 0
        self._window_calls = self._window_sampled = 0
        self._merged = 0  # automatic flushes deferred into the next one
        self._totals = Totals()  # since the reset: the worker adds each interval, snapshots read them
        self._carry: RecordParts | None = None  # worker thread: intervals held back while the sinks are behind
        self._hooks = HookSet()
        self._worker = Worker(sinks, _weak_callback(self._sink_failed), _weak_callback(self._job_failed))
        weakref.finalize(self, self._worker.close, 0)  # a watch dropped without detach() stops its thread
        for monitor in self._monitors:
            monitor.bind(self._binding(modules))

    # ---- for monitors ------------------------------------------------------------------------

    def _binding(self, modules: list[tuple[str, nn.Module]]) -> Binding:
        return Binding(
            bus=self.bus, modules=modules, model=self._model, graph_mode=self.graph_mode, cohorts=self.cohorts,
            local=self.local, device_lock=self.device_lock, flush_lock=self.flush_lock, add_hook=self._hooks.add,
        )  # fmt: skip

    def add_monitor(self, monitor: Monitor, *, replace: type | None = None) -> None:
        """Add a monitor that needs no hooks while attached (``replace``: close the one of that type)."""
        old = [m for m in self._monitors if replace is not None and isinstance(m, replace)]
        for m in old:
            m.close(30.0)
        monitor.bind(self._binding([]))
        self._monitors = [m for m in self._monitors if m not in old] + [monitor]
        self._order_hooks()

    def _order_hooks(self) -> None:
        """The monitors each call hook runs, in ``call_order`` (those that do nothing there left
        out): latency first, the activation statistics (NaN/Inf origin) last."""
        ordered = sorted(self._monitors, key=lambda m: m.call_order)
        self._before = [m for m in ordered if type(m).before_call is not Monitor.before_call]
        self._after = [m for m in ordered if type(m).after_call is not Monitor.after_call]
        self._graph = [m for m in self._monitors if type(m).graph_call is not Monitor.graph_call]

    # ---- lifecycle ---------------------------------------------------------------------------

    def monitor(self, name: str) -> Monitor:
        """The monitor named ``name`` (``"latency"``, ``"inputs"``, a custom monitor's name, ...).

        Raises:
            KeyError: no monitor of that name is attached.
        """
        for monitor in self._monitors:
            if monitor.name == name:
                return monitor
        raise KeyError(f"no monitor named {name!r}; attached: {[m.name for m in self._monitors]}")

    @property
    def calls(self) -> int:
        """Root calls run eagerly since attaching."""
        return self._calls

    @property
    def model(self) -> nn.Module | None:
        """The watched model, or None once it was garbage-collected."""
        return self._model()

    def start(self, model: nn.Module) -> None:
        """Register the root hooks and the module hooks (the caller holds the registry lock)."""
        self._hooks.start(model, self._enter_root, self._exit_root,
                          sampled_always=self.every == 1 or self.sampling == "device")  # fmt: skip

    def remove_hooks(self) -> None:
        """Remove every hook the watch added (the caller holds the registry lock)."""
        self._hooks.remove()

    def stop(self, timeout: float) -> None:
        """After :meth:`remove_hooks`: close the monitors, flush, and close the sinks."""
        for monitor in self._monitors:
            monitor.close(timeout)
        self.flush(wait=False)
        left = self._worker.close(timeout)
        if left:
            self.bus.count(RECORDS_NOT_WRITTEN, left)
            self.bus.warn_once(
                "not-written",
                f"detach(): the sinks did not finish within {timeout:g} s; {left} flush(es) were not written by "
                f"then (counted in watch.errors[{RECORDS_NOT_WRITTEN!r}]; they still are if the sinks recover). "
                "Give detach(timeout=...) more time.",
            )

    def errors(self) -> dict[str, int]:
        lost: dict[str, int] = {}
        for monitor in self._monitors:
            for kind, n in monitor.lost().items():
                lost[kind] = lost.get(kind, 0) + n
        return self.bus.errors(lost)

    # ---- root calls --------------------------------------------------------------------------

    def _enter_root(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        if self.graph_mode():
            for monitor in self._graph:
                monitor.graph_call()
            return
        tls = self.local
        depth = getattr(tls, "depth", 0)
        tls.depth = depth + 1
        if depth:  # the model calling itself: part of the outer call
            return
        tls.call = None
        tls.flush_due = False
        try:
            with self._lock:
                while self._paused:  # a check has the model to itself (exclusive()): wait for it
                    self._idle.wait()
                self._inflight += 1
                index = self._calls
                self._calls += 1
                self._window_calls += 1
                sampled = index % self.every == 0
                if sampled:
                    self._window_sampled += 1
            tls.flush_due = (index + 1) % self.flush_every == 0
            cohort, trace_id = labels.get()
            call = tls.call = Call(index, self.cohorts.bound(cohort) if sampled else cohort, trace_id,
                                   sampled=sampled)  # fmt: skip
            if sampled and self.every > 1 and self.sampling == "python":
                self._hooks.install()
        except Exception as exc:  # noqa: BLE001 - a hook never breaks inference
            tls.call = None
            self.bus.hook_failed(ROOT_CALL, exc)
            return
        for monitor in self._before:
            if sampled or monitor.every_call:
                try:
                    monitor.before_call(call, args, kwargs)
                except Exception as exc:  # noqa: BLE001 - a hook never breaks inference
                    self.bus.hook_failed(monitor.error_key or monitor.name, exc)

    def _exit_root(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.graph_mode():
            return
        tls = self.local
        depth = getattr(tls, "depth", 0)
        if depth == 0:  # attached while this call was already running
            return
        tls.depth = depth - 1
        if depth > 1:
            return
        with self._lock:
            self._inflight -= 1
            if self._paused and not self._inflight:
                self._idle.notify_all()
        call, tls.call = tls.call, None
        if call is not None:
            if call.sampled and self.every > 1 and self.sampling == "python":
                self._hooks.uninstall()
            for monitor in self._after:
                if call.sampled or monitor.every_call:
                    try:
                        monitor.after_call(call, output)
                    except Exception as exc:  # noqa: BLE001 - a hook never breaks inference
                        self.bus.hook_failed(monitor.error_key or monitor.name, exc)
        try:
            if tls.flush_due:
                self.flush(wait=False, automatic=True)
        except Exception as exc:  # noqa: BLE001 - a hook never breaks inference
            self.bus.hook_failed(ROOT_CALL, exc)
        alert = call.raise_alert if call is not None else None
        if alert is not None:
            raise NonFiniteError(
                f"{alert.message}. Look at that module's inputs and weights; "
                'pass on_nonfinite="warn" to keep serving and only record it.',
                alert,
            )

    @contextlib.contextmanager
    def exclusive(self, timeout: float) -> Iterator[None]:
        """Run the block with the model to itself, unseen by the watch: root calls in flight on
        other threads finish first, new ones wait at their start until the block ends, and the
        model's calls inside the block are not counted, measured or observed by any monitor (a
        canary re-check between requests). One such block at a time.

        Raises:
            TimeoutError: calls were still in flight after ``timeout`` seconds (nothing ran; calls
                went on as usual), or this thread is itself inside a call of the model.
        """
        tls = self.local
        if getattr(tls, "depth", 0):
            raise TimeoutError("exclusive() was entered from inside a call of the watched model")
        with self._exclusive:
            with self._lock:
                self._paused = True
                idle = self._idle.wait_for(lambda: self._inflight == 0, timeout)
                if not idle:
                    self._paused = False
                    self._idle.notify_all()
            if not idle:
                raise TimeoutError(f"calls of the watched model were still running after {timeout:g} s")
            tls.depth, tls.call, tls.aside = 1, None, True  # inside: the hooks treat it as an unsampled call
            try:
                yield
            finally:
                tls.depth, tls.aside = 0, False
                with self._lock:
                    self._paused = False
                    self._idle.notify_all()

    # ---- windows -----------------------------------------------------------------------------

    def flush(self, *, wait: bool, timeout: float = 30.0, automatic: bool = False) -> None:
        """Cut the window and start the device copies here; the worker thread does the rest.

        ``automatic`` (every ``flush_every`` calls, on the serving thread): when the worker
        already has ``MAX_PENDING_FLUSHES`` intervals waiting (it cannot even keep up with
        folding them), or another flush or snapshot is in progress, the window is left as it is
        and goes out with the next flush, which says so in ``record.merged``: nothing is
        dropped, memory stays bounded and the serving thread never waits.
        """
        if automatic:
            if self._worker.pending >= MAX_PENDING_FLUSHES or not self.flush_lock.acquire(blocking=False):
                with self._lock:
                    self._merged += 1  # this interval goes out with the next flush (record.merged)
                return
        else:
            self.flush_lock.acquire()
        try:
            with self._lock:
                calls, sampled = self._window_calls, self._window_sampled
                self._window_calls = self._window_sampled = 0
                merged, self._merged = self._merged, 0
                step = self._calls
            alerts = self.bus.take_window()
            taken = [(m, m.take(keep=False)) for m in self._monitors]
            if calls or alerts or any(t is not None for _, t in taken):
                interval = Cut(step, calls, sampled, alerts, taken, merged)
                # queued under the lock: intervals reach the worker in the order they were cut
                self._worker.submit(functools.partial(self._finish_flush, interval))
        finally:
            self.flush_lock.release()
        if wait:
            self._worker.submit(None, wait=True, timeout=timeout)

    def _collect(self, step: int, taken: list[tuple[Monitor, Any]], *, fold: bool) -> tuple[dict[str, Any], Collect]:
        """The one collect step of flushes (``fold``) and snapshots: each monitor's window value by
        name (None: no value), in the monitors' order (the activation statistics first: their
        graph replays advance the step the others see)."""
        ctx = Collect(step, fold, self.bus)
        values = {}
        for monitor, t in taken:
            value = monitor.collect(t, ctx)
            if value is not None:
                values[monitor.name] = value
        return values, ctx

    def _admitted(self, alerts: list[Alert], now: float, order: list[str]) -> list[Alert]:
        """What reaches the sinks: tripping alerts (NaN/Inf, fingerprint, ``trips=True`` rules)
        outside the alert policy's budget, one per episode; the others as the policy admits them,
        an incident at a time (``order``: the interval's positions in execution order)."""
        return self.alert_policy.select(alerts, self.bus.take_tripping(alerts), now, order)

    def _finish_flush(self, interval: Cut, waiting: int) -> Record | None:
        """Worker thread: wait for the copies, fold the window into the totals, run the rules on
        it, and make the record. With ``MERGE_RECORDS_BEHIND`` or more intervals ``waiting``
        behind this one (the sinks are behind), the record is held back and merged into the
        next one's: rules still see every interval, the sinks get fewer, larger records,
        nothing is dropped."""
        values, ctx = self._collect(interval.step, interval.taken, fold=True)
        monitors = {m.name: m for m, _ in interval.taken}
        new_first = self._totals.add(interval.calls, interval.sampled, values, ctx, monitors)
        now = time.time()
        published = {name: monitors[name].view(v) for name, v in values.items()}
        if self.rules and (ctx.stats or any(monitors[n].active(v) for n, v in values.items())):
            run_rules(self.rules, ctx.step, now, ctx.stats, published, ctx)
        alerts = interval.alerts + ctx.alerts  # published before the cut, and while finishing it
        # execution order groups an interval's alerts into incidents; not needed without alerts
        order = list(dict.fromkeys(name for (_, name), _ in ctx.stats)) if alerts else []
        parts = RecordParts(
            step=ctx.step, time=now, calls=interval.calls + ctx.calls, sampled=interval.sampled + ctx.sampled,
            stats=ctx.stats, alerts=self._admitted(alerts, now, order), nonfinite=new_first, values=values,
            published=published, merged=interval.merged, baselines=self._warmup(),
        )  # fmt: skip
        if self._carry is not None:  # earlier intervals held back while the sinks were behind
            parts = self._carry.merge(parts, monitors)
            self._carry = None
        if waiting >= MERGE_RECORDS_BEHIND:
            self._carry = parts
            return None
        return parts.record(self.errors(), monitors)

    def snapshot(self, cohort: str | None) -> Snapshot:
        """The totals since the last reset merged with the current window."""
        with self.flush_lock:
            self._worker.submit(None, wait=True)  # finish the flushes already started
            with self._lock:
                calls, sampled, step = self._window_calls, self._window_sampled, self._calls
            taken = [(m, m.take(keep=True)) for m in self._monitors]
            window, ctx = self._collect(step, taken, fold=False)
            errors = self.errors()
            stats, first, shown = self._totals.with_window(window, ctx, self._monitors, cohort)
            calls += self._totals.calls + ctx.calls
            sampled += self._totals.sampled + ctx.sampled
        return Snapshot.of(stats, calls=calls, sampled=sampled, cohort=cohort, nonfinite=first, errors=errors,
                           values=shown, baselines=self._warmup())  # fmt: skip

    def _warmup(self) -> Warmup | None:
        """How far the rules' baselines are learned (read between flushes, or on the worker)."""
        try:
            return warmup(self.rules)
        except Exception as exc:  # noqa: BLE001 - a custom rule's warmup_state() never stops a flush
            self.bus.count("rule:warmup_state")
            self.bus.warn_once("rule:warmup_state", f"a rule's warmup_state() raised {exc!r}; counted in watch.errors")
            return None

    def reset(self) -> None:
        """Forget statistics and non-finite records (alerts and error counts are kept)."""
        with self.flush_lock:
            self._worker.submit(None, wait=True)
            for monitor in self._monitors:
                monitor.reset()
            with self._lock:
                self._window_calls = self._window_sampled = 0
            self._totals.clear()

    # ---- failures ----------------------------------------------------------------------------

    def _job_failed(self, exc: BaseException) -> None:
        self.bus.count(WORKER)
        self.bus.warn_once(
            f"worker:{type(exc).__name__}", f"finishing a flush failed with {exc!r}; its window was lost"
        )

    def _sink_failed(self, sink: Sink, exc: BaseException) -> None:
        self.bus.count(f"sink:{sink!r}")
        self.bus.warn_once(
            f"sink:{id(sink)}",
            f"{sink!r} failed with {exc!r} and is disabled; inference and the other sinks go on. "
            "Fix the destination (permissions, free space) and attach again to re-enable it.",
        )


def _weak_callback(method: Callable[..., None]) -> Callable[..., None]:
    """Call ``method`` while its object lives; the worker thread must not keep a watch alive."""
    ref = weakref.WeakMethod(method)

    def call(*args: Any) -> None:
        bound = ref()
        if bound is not None:
            bound(*args)

    return call
