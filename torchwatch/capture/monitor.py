"""The serving side of a capture: which call faulted, and a copy of what it was given.

On CPU a call is judged when it ends (its hooks ran on the host): NaN/Inf anywhere in it, or a
per-call :class:`~torchwatch.rules.CastRange` limit broken, and only then are its arguments
(referenced during the call, never copied before) and outputs copied for the writer. The
statistics of that very call come from the activation hooks, which measure a call for
which ``call.detail`` is a list into it as well as into the window.

Calls with accelerator tensors cannot be judged without waiting for the device, so the last
``keep`` sampled calls are kept in a ring (their tensors copied on the device, asynchronously),
and alerts decided later — at a flush, on the worker thread, or by a user's
:meth:`~torchwatch.Watch.capture` — pick their call from it.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
import weakref
from typing import Any

import torch

from .._accumulators import stats_from_raw
from .._environment import numerics
from .._tensors import model_device
from ..alerts import Alert, call_nonfinite_alert
from ..monitors.base import Binding, Call, Collect, Monitor
from ..rules.interval import Interval
from ..rules.limits import CastRange
from ..stats import ModuleStats, merge_all
from .options import Capture
from .reference import InputRange
from .trees import copied, nbytes
from .writer import MISSED, OVER_LIMIT, Pending, Writer

AUTO_KEEP_DEVICE = 4  # Capture(keep=None): calls kept for a model on an accelerator
MANUAL = "capture"  # the rule of a bundle asked for with Watch.capture(trace_id)
JUDGED = 256  # host-judged call indices remembered (their flush-time alerts are not captured twice)
RAW_UNDER, RAW_OVER = 10, 11  # a raw measurement's per-cast-dtype counts (torchwatch._accumulators.Raw)


class Kept:
    """One recent call: labels, copies of its arguments and outputs, its numerics settings."""

    __slots__ = ("args", "call", "cohort", "detail", "dropped", "environment", "kwargs", "outputs", "time", "trace_id")

    def __init__(self, call: Call, environment: dict[str, Any]) -> None:
        self.call = call.index
        self.trace_id = call.trace_id
        self.cohort = call.cohort
        self.time = time.time()
        self.environment = environment
        self.args: tuple[Any, ...] | None = None
        self.kwargs: dict[str, Any] | None = None
        self.outputs: Any = None
        self.detail: list[tuple[str, Any]] | None = None  # the call's own measurements (host calls)
        self.dropped: str | None = None


class CaptureMonitor(Monitor):
    """Decides which calls to capture and hands them to the :class:`~.writer.Writer`
    (built by ``attach(capture=tw.Capture(...))``)."""

    name = "capture"
    call_order = -1  # first: asks the activation hooks for per-call detail before any measures

    def __init__(self, options: Capture, *, rules: list[Any], cast_dtypes: tuple[str, ...]) -> None:
        self.options = options
        self.cast_dtypes = cast_dtypes
        # the fixed cast limits that can be judged on one call (stateless), if they trigger captures
        self._limits = [r for r in rules if isinstance(r, CastRange) and options.wants(r.name, r.trips)]
        self._per_call_rules = {"nonfinite", *(r.name for r in self._limits)}
        self._ring: collections.deque[Kept] = collections.deque()  # sized at bind
        self._ring_lock = threading.Lock()
        self._judged: collections.deque[int] = collections.deque(maxlen=JUDGED)
        self._captured: collections.deque[int] = collections.deque(maxlen=JUDGED)
        self._armed: set[str] = set()
        self._deferred: list[Alert] = []
        self._interval: dict[str, ModuleStats] | None = None
        self.inputs = InputRange()  # recent healthy calls' input range (a replay's data check)
        self._tl = threading.local()  # the call in progress on this thread: (index, args, kwargs)
        self._missed = 0

    def bind(self, binding: Binding) -> None:
        self._bus = binding.bus
        model = binding.model
        self._device = model_device(model) if model is not None else torch.device("cpu")
        keep = self.options.keep
        self._keep = keep if keep is not None else AUTO_KEEP_DEVICE if self._device.type != "cpu" else 0
        self._ring = collections.deque(maxlen=max(self._keep, 1))
        ref = weakref.ref(model) if model is not None else lambda: None
        names = [name for name, _ in binding.modules]
        self.writer = Writer(self.options, ref, names, binding.bus.count, binding.bus.warn_once, binding.bus.publish)
        binding.bus.listen(self._on_alert)

    # ---- serving thread ----------------------------------------------------------------------

    def before_call(self, call: Call, args: Any, kwargs: dict[str, Any]) -> None:
        self._tl.current = (args, kwargs)
        call.detail = []  # the activation hooks also keep this call's own measurements
        if self._keep:
            kept = Kept(call, numerics(self._device))
            if self.options.inputs:
                self._copy_into(kept, args, kwargs)
            with self._ring_lock:
                self._ring.append(kept)
            self._tl.kept = kept
        else:
            self._tl.kept = None

    def after_call(self, call: Call, output: Any) -> None:
        args, kwargs = getattr(self._tl, "current", ((), {}))
        kept, self._tl.current, self._tl.kept = getattr(self._tl, "kept", None), None, None
        # judged now if the call was measured, all on the host (a compiled graph's or a device's
        # measurements are read at the flush)
        host = call.seq > 0 and not call.device
        detail = call.detail if host else None
        if kept is not None and kept.call == call.index:
            kept.detail = detail
            if self.options.inputs and kept.dropped is None:
                kept.outputs = copied(output)
        if not host:
            return
        with self._ring_lock:  # other threads test membership: a deque must not change under them
            self._judged.append(call.index)
        triggers, stats = self._triggers(call, detail or [])
        if not triggers:
            self.inputs.add(detail or [])
            return
        with self._ring_lock:
            self._captured.append(call.index)
        job = Pending(triggers[0], triggers, call.index, call.trace_id, call.cohort, time.time(), True,
                      numerics(self._device), stats=stats, stats_scope="call",
                      nonfinite=list(call.events), reference=self.inputs.reference())  # fmt: skip
        if self.options.inputs:
            size = nbytes((args, kwargs, output))
            if size > self.options.max_bundle_bytes:
                job.dropped = f"the call's tensors ({size:,} bytes) are over max_bundle_bytes"
                self.writer.lost(OVER_LIMIT, f"call {call.index}: {job.dropped}; its bundle keeps the statistics only")
            else:
                job.args, job.kwargs, job.outputs = copied(tuple(args)), copied(dict(kwargs)), copied(output)
        self.writer.submit(job)

    def _triggers(self, call: Call, detail: list[tuple[str, Any]]) -> tuple[list[Alert], dict[str, ModuleStats]]:
        """The alerts this call raises that trigger a capture (judged on the host, at its end),
        and its statistics when there are any (only then are they made: most calls are healthy)."""
        out = []
        if call.events and self.options.wants("nonfinite", True):  # host events: in execution order
            out.append(call_nonfinite_alert(call.events, call=call.index, cohort=call.cohort,
                                            trace_id=call.trace_id)[0])  # fmt: skip
        stats: dict[str, ModuleStats] = {}
        if self._limits and any(self._may_break(rule, detail) for rule in self._limits):
            stats = _call_stats(detail, self.cast_dtypes)
            interval = Interval(call.index + 1, time.time(), call.cohort, stats)
            for rule in self._limits:
                out += [a for a in rule.evaluate(interval) if a.module in stats][:1]
        if call.trace_id is not None and call.trace_id in self._armed:
            self._armed.discard(call.trace_id)
            out.append(_manual(call.index, call.trace_id, call.cohort))
        if out and not stats:
            stats = _call_stats(detail, self.cast_dtypes)
        out = [dataclasses.replace(a, trace_id=call.trace_id) if a.trace_id is None else a for a in out]
        return out, stats

    def _may_break(self, rule: CastRange, detail: list[tuple[str, Any]]) -> bool:
        """Whether one measurement breaks the limit: necessary for a position's merged fraction to
        (a weighted mean of its measurements' fractions), and cheap enough for every call."""
        if rule.dtype not in self.cast_dtypes:
            return False
        i, field = self.cast_dtypes.index(rule.dtype), RAW_OVER if rule.kind == "overflow" else RAW_UNDER
        limit = rule.max_fraction
        for _, raw in detail:
            n = raw[0] + raw[1] + raw[2] + raw[3]
            if n and raw[field][i] > limit * n:
                return True
        return False

    def _copy_into(self, kept: Kept, args: Any, kwargs: dict[str, Any]) -> None:
        size = nbytes((args, kwargs))
        if size > self.options.max_bundle_bytes:
            kept.dropped = f"the call's inputs ({size:,} bytes) are over max_bundle_bytes"
            return
        kept.args, kept.kwargs = copied(tuple(args)), copied(dict(kwargs))

    # ---- alerts decided later ----------------------------------------------------------------

    def _on_alert(self, alert: Alert, trip: bool) -> None:
        """The alert bus's listener (any thread): alerts decided after their call ended."""
        if not self.options.wants(alert.rule, trip):
            return
        with self._ring_lock:
            captured = alert.call in self._captured
            judged = alert.call in self._judged or (alert.call < 0 and bool(self._judged))
        if captured or (alert.rule in self._per_call_rules and judged):
            return  # captured already, or judged when its call ended
        if alert.rule == "nonfinite":  # the device's NaN/Inf, found while the flush collects
            with self._ring_lock:
                self._deferred.append(alert)
            return
        self._from_ring(alert, self._interval)

    def _from_ring(self, alert: Alert, interval: dict[str, ModuleStats] | None) -> None:
        """Capture the kept call ``alert`` is about, or count it missed."""
        kept = self._find(alert)
        if kept is not None:
            self._submit(alert, kept, interval)
            return
        self._missed += 1
        why = (
            "raise Capture(keep=...) to keep more recent calls"
            if self._ring
            else "no call was kept: on CPU set Capture(keep=N); calls replayed from a torch.compile'd graph or a CUDA "
            "graph cannot be kept"
        )
        self._bus.warn_once(
            "capture:missed", f"capture: {alert.rule!r} on {alert.module!r} (call {alert.call}) fired after its "
            f'call\'s inputs were gone; {why}. Counted in watch.errors["{MISSED}"]',
        )  # fmt: skip

    def _find(self, alert: Alert) -> Kept | None:
        """The kept call an alert decided after its call is about: by trace id (``watch.capture``), by
        call index (NaN/Inf), else the latest kept before the alert (an interval's)."""
        with self._ring_lock:
            if alert.rule == MANUAL:
                found = [k for k in self._ring if k.trace_id == alert.trace_id]
            elif alert.rule == "nonfinite":
                found = [k for k in self._ring if k.call == alert.call]
            else:
                found = [k for k in self._ring if alert.call < 0 or k.call <= alert.call]
        return found[-1] if found else None

    def _submit(self, alert: Alert, kept: Kept, interval: dict[str, ModuleStats] | None) -> None:
        with self._ring_lock:
            self._captured.append(kept.call)
        if kept.detail is not None:
            stats, scope = _call_stats(kept.detail, self.cast_dtypes), "call"
        else:
            stats, scope = interval, "interval" if interval else None
        exact = alert.rule in ("nonfinite", MANUAL)
        job = Pending(alert, [alert], kept.call, kept.trace_id, kept.cohort, kept.time, exact, kept.environment,
                      args=kept.args, kwargs=kept.kwargs, outputs=kept.outputs, stats=stats, stats_scope=scope,
                      dropped=kept.dropped, reference=self.inputs.reference())  # fmt: skip
        self.writer.submit(job)

    def capture(self, trace_id: str) -> bool:
        """Capture the call labelled ``trace_id``: a kept recent call now (True), else the next
        call with that label when it ends (False)."""
        alert = _manual(-1, trace_id, None)
        kept = self._find(alert)
        if kept is not None:
            self._submit(alert, kept, self._interval)
            return True
        self._armed.add(trace_id)
        return False

    # ---- flushes -----------------------------------------------------------------------------

    def collect(self, taken: Any, ctx: Collect) -> None:
        if not ctx.fold:
            return
        if ctx.stats:
            self._interval = {name: merge_all(s for (_, n), s in ctx.stats if n == name)
                              for name in dict.fromkeys(n for (_, n), _ in ctx.stats)}  # fmt: skip
        with self._ring_lock:
            deferred, self._deferred = self._deferred, []
        for alert in deferred:
            with self._ring_lock:
                captured = alert.call in self._captured
            if not captured:
                self._from_ring(alert, self._interval)

    def take(self, *, keep: bool) -> Any:
        return None

    def lost(self) -> dict[str, int]:
        return {MISSED: self._missed}

    def close(self, timeout: float) -> None:
        self.writer.wait(timeout)


def _manual(call: int, trace_id: str, cohort: str | None) -> Alert:
    return Alert(MANUAL, "", "", float("nan"), float("nan"), call, time.time(), cohort, trace_id,
                 f"capture of trace id {trace_id!r} asked for with watch.capture()")  # fmt: skip


def _call_stats(detail: list[tuple[str, Any]], cast_dtypes: tuple[str, ...]) -> dict[str, ModuleStats]:
    """Per position, the statistics of one call's own measurements (in execution order)."""
    out: dict[str, ModuleStats] = {}
    for name, raw in detail:
        s = stats_from_raw(1, raw, cast_dtypes)
        out[name] = out[name].merge(s) if name in out else s
    return out
