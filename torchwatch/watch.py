"""``attach()``: forward hooks that measure module outputs, with sampling, labels and flushing.

Flow: the watched model's forward pre-hook opens a *root call* (index, sampled or not, labels);
each selected module's forward hook measures the floating-point tensors it returned (CPU tensors
through the C kernel into host accumulators; others into the slots of a device table, see
:mod:`torchwatch._table`); the model's forward hook closes the call (non-finite provenance,
``on_nonfinite``). Every ``flush_every`` root calls the serving thread swaps the window and starts
the device copies; the watch's worker thread waits for them, folds the window into the totals
since the last reset and hands a record to the sinks.

Under ``torch.compile`` or CUDA-graph capture the hooks run once, at trace time, so they take a
*graph path*: device-side operations only. The root pre-hook advances a call counter on the
device and sets the sampling flag there; the statistics kernels read both.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import contextvars
import functools
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from . import _validate
from . import edges as _edges
from . import rules as _rules
from ._accumulators import new_host_accumulator, stats_from_raw, to_module_stats
from ._casts import CastPlan, _float_dtypes, cast_plan, normalize_cast_dtypes
from ._drift_online import RING, DriftMonitor
from ._hooks import Hook
from ._outputs import tensors_in
from ._provenance import device_origins
from ._select import select_modules
from ._table import C_NAN, C_NEGINF, CALLS, ENABLED, DeviceTable, WindowRead
from ._window import DevicePart, Interval, RecordParts
from .alerts import Alert, FirstNonFinite, nonfinite_alert
from .errors import ConfigError, NonFiniteError, TorchwatchWarning
from .kernels import PLAIN_TENSOR_TYPES, host_stats, measurable, torch_ops
from .kernels import cpu as cpu_kernel
from .latency import CallTimer
from .sinks._dispatch import Worker
from .sinks.base import Record, Sink
from .snapshot import Snapshot
from .stats import DEFAULT_CAST_DTYPES, ModuleStats, merge_all

NONFINITE_POLICIES = ("ignore", "warn", "raise")
SAMPLING_MODES = ("python", "device")
OTHER_COHORT = "__other__"
OUTPUT = "<output>"  # the key of watch.errors for failures of the output-quality monitor
ROOT_CALL = "(root call)"  # the key of watch.errors for failures in the model's own hooks
WORKER = "(worker)"  # the key of watch.errors for failures while finishing a flush
MAX_ALERTS = 1000  # alerts kept in watch.alerts (oldest dropped first)
MAX_TRACE_IDS = 4096  # recent call index -> trace id, to label device-side provenance
MERGE_RECORDS_BEHIND = 8  # intervals waiting for the worker before it merges records for the sinks
# intervals waiting for the worker before automatic flushes stop cutting new ones and merge into the
# window (the last resort that bounds memory; normally the worker merges records, not intervals)
MAX_PENDING_FLUSHES = 64
RECORDS_NOT_WRITTEN = "records not written"  # flushes unfinished when detach() stopped waiting
POSITIONS_NOT_MEASURED = "positions not measured"  # measurements of output positions beyond the capacity
DRIFT_WINDOWS_LOST = "drift windows lost"  # completed faster than flushes read the device ring
LATENCY_LOST = "latency timings lost"  # device timings no flush read in time
_NO_PLAN = object()

# (cohort, trace_id) of the calls made in this context; see Watch.context.
_labels: contextvars.ContextVar[tuple[str | None, str | None]] = contextvars.ContextVar(
    "torchwatch_labels", default=(None, None)
)
_watches: weakref.WeakKeyDictionary[nn.Module, Watch] = weakref.WeakKeyDictionary()
_live: weakref.WeakSet[Watch] = weakref.WeakSet()
_registry_lock = threading.Lock()


_compiling: Callable[[], bool] = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling


class _Call:
    """One measured root call, private to the thread running it."""

    __slots__ = ("cohort", "device", "events", "index", "seq", "trace_id")

    def __init__(self, index: int, cohort: str | None, trace_id: str | None) -> None:
        self.index = index
        self.cohort = cohort
        self.trace_id = trace_id
        self.seq = 0  # measurements so far: execution order within the call
        self.events: list[tuple[int, str, int, int, int]] = []  # host NaN/Inf: (seq, name, nan, +inf, -inf)
        self.device: list[tuple[int, str, DeviceTable, int]] = []  # device measurements: (seq, name, table, slot)


class Watch:
    """Hooks on one model, their statistics, alerts and sinks. Create it with :func:`attach`.

    A ``Watch`` holds the model weakly: dropping the model frees it and its hooks. It is a
    context manager; leaving the block detaches.

    Attributes:
        modules: fully-qualified names of the watched modules.
        every: one root call in ``every`` is measured.
        sampling: ``"python"`` or ``"device"`` (see :func:`attach`).
        flush_every: root calls between flushes to the sinks.
        cast_dtypes: the dtypes would-underflow/overflow are counted against.
        on_nonfinite: ``"ignore" | "warn" | "raise"`` or a callable taking an :class:`Alert`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        modules: Any = None,
        every: int = 1,
        sampling: str = "python",
        sinks: Iterable[Sink] = (),
        flush_every: int = 100,
        cast_dtypes: Iterable[object] = DEFAULT_CAST_DTYPES,
        on_nonfinite: str | Callable[[Alert], object] = "warn",
        max_cohorts: int = 16,
        drift: Any = None,
        drift_arl: float | None = None,
        rules: Iterable[Any] | None = None,
        alert_policy: Any = None,
        inputs: Any = True,
        outputs: Any = None,
        timing: bool = False,
        _device_path: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"attach() needs a torch.nn.Module, got {type(model).__name__}")
        self.every = _validate.integer("attach()", "every", every)
        if sampling not in SAMPLING_MODES:
            raise ConfigError(f"sampling={sampling!r} is not valid: use 'python' (eager) or 'device' (graphs)")
        self.sampling = sampling
        self.flush_every = _validate.integer("attach()", "flush_every", flush_every)
        self._max_cohorts = _validate.integer("attach()", "max_cohorts", max_cohorts)
        self.cast_dtypes = normalize_cast_dtypes(cast_dtypes)
        self.on_nonfinite = _nonfinite_policy(on_nonfinite)
        self.rules = _rules.normalize(rules, self.cast_dtypes)
        self.alert_policy = alert_policy if alert_policy is not None else _rules.AlertPolicy()
        if not isinstance(self.alert_policy, _rules.AlertPolicy):
            raise ConfigError(f"alert_policy must be a tw.rules.AlertPolicy, got {type(alert_policy).__name__}")
        sinks = _sink_list(sinks)
        selected = select_modules(model, modules)
        self.modules = [name for name, _ in selected]
        self._device_path = _device_path  # measure CPU tensors the way accelerator ones are (tests)
        self._drift, drift_modules = _drift_monitor(model, drift, drift_arl)

        self._model = weakref.ref(model)
        self._lock = threading.Lock()  # window, totals, provenance, alerts: short critical sections
        self._flush_lock = threading.RLock()  # one flush / snapshot / reset at a time
        self._merge_lock = threading.Lock()  # device merges are several ops: one thread at a time
        self._tls = threading.local()
        # Every plan up front: under torch.compile a hook may not run Python that touches tensors.
        self._plans: dict[torch.dtype, CastPlan | None] = {}
        self._cpu_kernel: dict[torch.dtype, tuple[int, object, bool]] = {}  # dtype -> C kernel arguments
        for name in _float_dtypes():
            self._new_plan(getattr(torch, name))
        self._tables: dict[torch.device, DeviceTable] = {}
        self._cuda = False  # a table lives on a CUDA device: graph capture is possible
        self._table_capacity = 4 * len(selected) + 64
        self._calls = 0
        self._window: dict[tuple[str | None, str], Any] = {}
        self._window_calls = 0
        self._window_sampled = 0
        self._window_alerts: list[Alert] = []
        self._window_nonfinite: dict[str, FirstNonFinite] = {}
        self._totals: dict[tuple[str | None, str], ModuleStats] = {}
        self._order: dict[str, None] = {}  # positions in first-measured order
        self._since_reset_calls = 0
        self._since_reset_sampled = 0
        self._device_root_calls: dict[torch.device, int] = {}  # device call counters at the last read
        self._first_nonfinite: dict[str, FirstNonFinite] = {}
        self._trace_ids: collections.OrderedDict[int, str] = collections.OrderedDict()
        self._alerts: collections.deque[Alert] = collections.deque(maxlen=MAX_ALERTS)
        self._errors: collections.Counter[str] = collections.Counter()
        self._warned: set[str] = set()
        self._cohorts: set[str | None] = {None}
        self._seen: set[str] = set()
        self._completed_sampled = 0
        self._unseen_checked = False
        self._merged = 0  # automatic flushes deferred into the next one
        self._carry: RecordParts | None = None  # worker thread: intervals held back while the sinks are behind
        self._host_keys: set[tuple[str | None, str]] = set()  # host output positions admitted (bounded)
        self._positions_dropped = 0

        self._worker = Worker(sinks, _weak_callback(self._sink_failed), _weak_callback(self._job_failed))
        weakref.finalize(self, self._worker.close, 0)  # a watch dropped without detach() stops its thread
        # The model's own hook must run before _exit_root closes the call: it goes first.
        self._stat_hooks = [(weakref.ref(module), self._make_hook(name), module is model) for name, module in selected]
        self._stat_handles: list[torch.utils.hooks.RemovableHandle] = []
        self._drift_handles: list[torch.utils.hooks.RemovableHandle] = []
        self._installed = 0  # sampled calls in flight that need the module hooks (python sampling)
        self._fingerprint_monitor: Any = None
        cuda = _model_device(model).type == "cuda"
        self._timer = CallTimer(cuda=cuda)
        in_config, out_config = _input_monitor(inputs), _output_monitor(outputs)
        path = "torch" if _device_path else None  # CPU tensors through the device path's torch ops (tests)
        self._inputs = _edges._InputAccumulators(in_config, path=path) if in_config else None
        self._outputs = _edges._OutputAccumulator(out_config, path=path) if out_config else None
        self._input_totals: dict[str, _edges.InputStats] = {}
        self._output_total: _edges.OutputQuality | None = None
        if not isinstance(timing, bool):
            raise ConfigError(f"timing must be True or False, got {timing!r}")
        self._module_timers = {name: CallTimer(cuda=cuda) for name, _ in selected} if timing else {}
        self._timing_hooks = [(weakref.ref(module), self._make_timing_hooks(name)) for name, module in selected
                              if timing]  # fmt: skip
        self._trips = 0  # tripping alerts so far; healthy while it equals _trips_cleared
        self._trips_cleared = 0
        self._trip_alert: Alert | None = None
        self._triton_in_compile = False  # benchmarks/_compile_probe.py sets it to reproduce the crash
        self._install_lock = threading.Lock()
        self.attached = False
        self._new_table(_model_device(model))  # before any trace: tables cannot be made inside one

        with _registry_lock:
            other = _watches.get(model)
            if other is not None and other.attached:
                raise ConfigError(
                    f"this {type(model).__name__} is already watched by {other!r}; "
                    "call watch.detach() before attaching again, or keep using that watch"
                )
            self._root_handles = [
                model.register_forward_pre_hook(Hook(self._enter_root), prepend=True, with_kwargs=True),
                model.register_forward_hook(Hook(self._exit_root), always_call=True),
            ]
            if self.every == 1 or self.sampling == "device":
                self._install()
            # drift sees every call (windows count samples), whatever the statistics' sampling
            self._drift_handles = [m.register_forward_hook(self._make_drift_hook(n)) for n, m in drift_modules]
            _watches[model] = self
            _live.add(self)
            self.attached = True
        if hasattr(model, "_orig_mod"):
            self._warn_once(
                "compiled",
                "attach() was given a torch.compile'd module; hooks added after compiling are ignored "
                "by compiled code. Attach to the module first, then call torch.compile on it.",
            )

    # ---- public API --------------------------------------------------------------------

    @property
    def model(self) -> nn.Module | None:
        """The watched model, or None once it was garbage-collected."""
        return self._model()

    @property
    def calls(self) -> int:
        """Root calls of the watched model run eagerly since attaching (graph replays are
        counted on the device and show in snapshots and records)."""
        return self._calls

    @property
    def alerts(self) -> list[Alert]:
        """Alerts raised so far (the last 1000), oldest first."""
        with self._lock:
            return list(self._alerts)

    @property
    def healthy(self) -> bool:
        """False from a *tripping* alert until :meth:`mark_healthy`.

        Tripping alerts: NaN/Inf (``"nonfinite"``), weights changed in memory
        (``"fingerprint"``) and rules created with ``trips=True`` (by default: any value that
        would overflow a cast to float16/bfloat16). On CPU a NaN/Inf trips at the end of the call
        that produced it; on accelerators and for rules, at the flush that sees it. Reading it
        costs one attribute comparison (no lock).
        """
        return self._trips == self._trips_cleared

    @property
    def trips(self) -> int:
        """Tripping alerts since attaching (only grows; :class:`~torchwatch.CircuitBreaker` watches it)."""
        return self._trips

    @property
    def last_trip(self) -> Alert | None:
        """The most recent tripping alert, or None."""
        return self._trip_alert

    def mark_healthy(self) -> None:
        """Declare the current trips handled (after a fix or a reload): :attr:`healthy` is True again."""
        self._trips_cleared = self._trips

    @property
    def errors(self) -> dict[str, int]:
        """Failures torchwatch caught instead of breaking inference, and anything it could not
        record, by kind: hook errors by module name (``"(root call)"`` for the model's own call
        bookkeeping, ``"(worker)"`` for finishing a flush: that interval is lost), sink failures
        as ``"sink:<sink>"`` (the sink is disabled), ``"on_nonfinite"`` for errors of an
        ``on_nonfinite`` callable, ``"records not written"``
        (intervals still queued when ``detach()`` stopped waiting), ``"positions not measured"``
        (measurements of output positions beyond the capacity), ``"drift windows lost"`` and
        ``"latency timings lost"``. The same
        counts go out with every record (``record.errors``) and to Prometheus
        (``torchwatch_errors_total{kind}``)."""
        return self._error_counts()

    def _error_counts(self) -> dict[str, int]:
        """``watch.errors``: the counted failures plus what the monitors could not record."""
        lost = {
            POSITIONS_NOT_MEASURED: self._positions_dropped,
            DRIFT_WINDOWS_LOST: self._drift.lost if self._drift is not None else 0,
            LATENCY_LOST: self._timer.dropped + sum(t.dropped for t in self._module_timers.values()),
        }
        with self._lock:
            return {**self._errors, **{k: v for k, v in lost.items() if v}}

    @contextlib.contextmanager
    def context(self, *, cohort: str | None = None, trace_id: str | None = None) -> Iterator[None]:
        """Label the root calls made inside the block (this thread / async task only).

        Alerts and non-finite records carry the labels; ``snapshot(cohort=...)`` restricts the
        statistics to one cohort. Arguments left ``None`` keep the value of an outer block.
        At most ``max_cohorts`` distinct cohorts are kept apart; later ones are merged into
        ``"__other__"`` (warned once). Labels are Python state: calls replayed from a compiled
        graph or a CUDA graph are unlabelled.

        Example:
            >>> import torch, torchwatch as tw
            >>> model = torch.nn.Linear(3, 3)
            >>> with tw.attach(model) as watch:
            ...     with watch.context(cohort="eu", trace_id="req-1"):
            ...         _ = model(torch.randn(1, 3))
            ...     _ = model(torch.randn(2, 3))
            ...     watch.snapshot(cohort="eu")[""].count, watch.snapshot()[""].count
            (3, 9)
        """
        outer_cohort, outer_trace = _labels.get()
        token = _labels.set(
            (outer_cohort if cohort is None else str(cohort), outer_trace if trace_id is None else str(trace_id))
        )
        try:
            yield
        finally:
            _labels.reset(token)

    def snapshot(self, *, cohort: str | None = None) -> Snapshot:
        """Statistics merged since the last :meth:`reset` (waits for the device on GPU).

        Args:
            cohort: only calls made under ``context(cohort=...)``; ``None`` for all calls.
        """
        with self._flush_lock:
            self._worker.submit(None, wait=True)  # finish the flushes already started
            with self._lock:
                window = {key: to_module_stats(acc, self.cast_dtypes) for key, acc in self._window.items()}
                totals = dict(self._totals)
                calls = self._since_reset_calls + self._window_calls
                sampled = self._since_reset_sampled + self._window_sampled
                first = dict(self._first_nonfinite)
            device = self._device_reads(
                [(table, table.read_active()) for table in list(self._tables.values()) if table.keys], advance=False
            )
            calls += device.calls
            sampled += device.sampled
            for key, stats in device.stats:
                window[key] = window[key].merge(stats) if key in window else stats
            for name, record in device.firsts.items():
                first.setdefault(name, record)
            order = list(self._order)
            self._check_unseen()
            drift = self._drift_now(calls)
            errors = self._error_counts()
            inputs, outputs = self._edges_to_host(self._take_edges(keep=True), fold=False)
        parts: dict[str, list[ModuleStats]] = {}
        for (c, name), s in list(totals.items()) + list(window.items()):
            if cohort is None or c == cohort:
                parts.setdefault(name, []).append(s)
        stats = {name: merge_all(parts[name]) for name in order if name in parts}
        if cohort is not None:
            first = {k: v for k, v in first.items() if v.cohort == cohort}
        whole = cohort is None  # latency, inputs and outputs are not split by cohort
        return Snapshot(
            stats, calls=calls, sampled=sampled, cohort=cohort, nonfinite=first, errors=errors, drift=drift,
            latency=self._timer.peek() if whole else None, inputs=inputs if whole else {},
            outputs=outputs if whole else None,
            timing={n: t for n, timer in self._module_timers.items() if (t := timer.peek()).count} if whole else {},
        )  # fmt: skip

    def flush(self, *, timeout: float = 30.0) -> None:
        """Send the statistics gathered since the previous flush to the sinks and wait until
        they are written (at most ``timeout`` seconds)."""
        timeout = _validate.number("flush()", "timeout", timeout, low=0.0)
        self._flush(wait=True, timeout=timeout)

    def reset(self) -> None:
        """Forget statistics and non-finite records (alerts and error counts are kept)."""
        with self._flush_lock:
            self._worker.submit(None, wait=True)
            self._timer.reset()
            for timer in self._module_timers.values():
                timer.reset()
            self._take_edges(keep=False)
            for table in list(self._tables.values()):
                self._device_root_calls[table.device] = int(table.control[CALLS])
                table.reset()
            with self._lock:
                self._window = {}
                self._totals = {}
                self._order = {}
                self._window_calls = self._window_sampled = 0
                self._since_reset_calls = self._since_reset_sampled = 0
                self._first_nonfinite = {}
                self._window_nonfinite = {}
                self._input_totals, self._output_total = {}, None
            if self._drift is not None:
                self._drift.reset()

    def detach(self, *, timeout: float = 30.0) -> None:
        """Remove every hook this watch added, flush, and close the sinks. Safe to call twice.

        Waits at most ``timeout`` seconds for the sinks; what they had not written by then is
        counted in :attr:`errors` (``"records not written"``)."""
        timeout = _validate.number("detach()", "timeout", timeout, low=0.0)
        with _registry_lock:
            if not self.attached:
                return
            self.attached = False
            for handle in self._root_handles:
                handle.remove()
            with self._install_lock:
                for handle in self._stat_handles + self._drift_handles:
                    handle.remove()
                self._stat_handles = self._drift_handles = []
            model = self._model()
            if model is not None and _watches.get(model) is self:
                del _watches[model]
            _live.discard(self)
        if self._fingerprint_monitor is not None:
            self._fingerprint_monitor.stop(timeout)
        self._flush(wait=False)
        left = self._worker.close(timeout)
        if left:
            with self._lock:
                self._errors[RECORDS_NOT_WRITTEN] += left
            self._warn_once(
                "not-written",
                f"detach(): the sinks did not finish within {timeout:g} s; {left} flush(es) were not written by "
                f"then (counted in watch.errors[{RECORDS_NOT_WRITTEN!r}]; they still are if the sinks recover). "
                "Give detach(timeout=...) more time.",
            )

    def record_labels(self, trace_ids: str | Iterable[str], labels: Any) -> int:
        """Feed back the true classes of earlier calls: accuracy and calibration error (ECE).

        Needs ``attach(outputs=...)`` and calls made under ``watch.context(trace_id=...)``; the
        predictions of the last ``OutputMonitor.max_traces`` such calls are kept. Labels count in
        the next flush's ``record.outputs`` and in ``snapshot().outputs`` (``accuracy``, ``ece``).
        Runs on the caller's thread (it may wait for the device), never in a forward.

        Args:
            trace_ids: one trace id, or a sequence of them.
            labels: for one trace id, that call's labels (an int, or a sequence/tensor with one
                integer class per row of its logits); for a sequence, one such item per trace id.
                Negative labels (-100) mark rows to leave out.

        Returns:
            The number of rows labelled. Trace ids with no kept prediction (never seen, or too
            old) are skipped and counted in ``watch.errors["labels:unknown trace id"]``.

        Raises:
            ConfigError: no output monitor, mismatched lengths, a label count that differs from
                the call's rows, or non-integer labels; nothing is recorded then.

        Example:
            >>> import torch, torchwatch as tw
            >>> model = torch.nn.Linear(4, 3)
            >>> watch = tw.attach(model, outputs=True)
            >>> with watch.context(trace_id="req-1"):
            ...     logits = model(torch.randn(2, 4))
            >>> watch.record_labels("req-1", logits.argmax(-1))
            2
            >>> watch.snapshot().outputs.accuracy
            1.0
            >>> watch.detach()
        """
        if self._outputs is None:
            raise ConfigError("record_labels() needs output monitoring: attach(model, outputs='logits') or a selector")
        if isinstance(trace_ids, str):
            ids, items = [trace_ids], [labels]
        else:
            ids = [str(t) for t in trace_ids]
            items = list(labels) if not isinstance(labels, torch.Tensor) else list(labels.unbind(0))
            if len(items) != len(ids):
                raise ConfigError(f"record_labels: {len(ids)} trace ids but {len(items)} labels; give one per trace id")
        rows, unknown = self._outputs.record_labels(ids, items)
        if unknown:
            with self._lock:
                self._errors["labels:unknown trace id"] += len(unknown)
            self._warn_once(
                "labels-unknown",
                f"record_labels: no kept prediction for trace id(s) {unknown[:3]}{' ...' if len(unknown) > 3 else ''} "
                "(never seen under watch.context(trace_id=...), sampled out, or older than OutputMonitor.max_traces); "
                'skipped and counted in watch.errors["labels:unknown trace id"]',
            )
        return rows

    def verify_fingerprint_every(self, seconds: float, *, baseline: Any = None) -> Any:
        """Re-check the model's weights in memory every ``seconds``, on a background thread.

        Each check takes a :func:`torchwatch.fingerprint` (on the weights' device, on a side
        stream for CUDA) and compares it with ``baseline``. A change raises one ``"fingerprint"``
        :class:`Alert` per distinct corruption: in :attr:`alerts`, in the next record sent to the
        sinks, and as a warning once per module. Calling it again replaces the previous monitor;
        :meth:`detach` stops it.

        Args:
            seconds: period between checks (> 0).
            baseline: the :class:`torchwatch.Fingerprint` of the validated weights, e.g.
                ``tw.selftest(...).fingerprint``; default: one taken now.

        Returns:
            The :class:`~torchwatch.integrity.monitor.FingerprintMonitor` (``check_now()``,
            ``checks``, ``changes``, ``stop()``).

        Raises:
            ConfigError: ``seconds`` is not a positive number, the watch is detached or the model is gone.

        Example:
            >>> import torch, torchwatch as tw
            >>> import warnings; warnings.simplefilter("ignore", tw.TorchwatchWarning)
            >>> model = torch.nn.Linear(4, 2)
            >>> with tw.attach(model) as watch:
            ...     monitor = watch.verify_fingerprint_every(3600)
            ...     with torch.no_grad():
            ...         model.bias[1] = 7.0
            ...     changes = monitor.check_now()
            ...     print(changes[0].tensor, watch.alerts[-1].rule)
            bias fingerprint
        """
        from .integrity.monitor import FingerprintMonitor

        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
            raise ConfigError(f"verify_fingerprint_every() needs a positive number of seconds, got {seconds!r}")
        model = self._model()
        if not self.attached or model is None:
            raise ConfigError("verify_fingerprint_every() needs an attached watch whose model is alive")
        if self._fingerprint_monitor is not None:
            self._fingerprint_monitor.stop()
        self._fingerprint_monitor = FingerprintMonitor(
            model, float(seconds), baseline, _weak_callback(self._deliver_fingerprint)
        )
        return self._fingerprint_monitor

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def __repr__(self) -> str:
        model = self._model()
        name = type(model).__name__ if model is not None else "<collected>"
        state = "attached" if self.attached else "detached"
        return f"Watch({name}, {len(self.modules)} modules, every={self.every}, calls={self._calls}, {state})"

    # ---- hook management -----------------------------------------------------------------

    def _install(self) -> None:
        """Register the per-module hooks (refcounted across concurrent sampled calls)."""
        with self._install_lock:
            self._installed += 1
            if self._installed == 1:
                for module_ref, hook, is_root in self._stat_hooks:
                    module = module_ref()
                    if module is not None:
                        self._stat_handles.append(module.register_forward_hook(hook, prepend=is_root))
                for module_ref, (before, after) in self._timing_hooks:
                    module = module_ref()
                    if module is not None:  # after: first, so the statistics are not timed
                        self._stat_handles.append(module.register_forward_pre_hook(before))
                        self._stat_handles.append(module.register_forward_hook(after, prepend=True))

    def _uninstall(self) -> None:
        with self._install_lock:
            self._installed -= 1
            if self._installed == 0:
                for handle in self._stat_handles:
                    handle.remove()
                self._stat_handles = []

    def _make_hook(self, fqn: str) -> Callable[[nn.Module, Any, Any], None]:
        on_output = self._on_output

        def torchwatch_hook(module: nn.Module, args: Any, output: Any) -> None:
            on_output(fqn, output)

        return Hook(torchwatch_hook)

    def _make_timing_hooks(self, fqn: str) -> tuple[Callable[..., None], Callable[..., None]]:
        timer = self._module_timers[fqn]
        tls = self._tls

        def torchwatch_time_start(module: nn.Module, args: Any) -> None:
            if self._graph_mode():
                return
            try:
                stack = tls.__dict__.setdefault("timing", {}).setdefault(fqn, [])
                stack.append(timer.start())
            except Exception as exc:  # noqa: BLE001 - a hook never breaks inference
                self._hook_failed(fqn, exc)

        def torchwatch_time_stop(module: nn.Module, args: Any, output: Any) -> None:
            stack = getattr(tls, "timing", {}).get(fqn)
            if not stack or self._graph_mode():
                return
            try:
                timer.stop(stack.pop())
            except Exception as exc:  # noqa: BLE001 - a hook never breaks inference
                self._hook_failed(fqn, exc)

        return Hook(torchwatch_time_start), Hook(torchwatch_time_stop)

    def _make_drift_hook(self, fqn: str) -> Callable[[nn.Module, Any, Any], None]:
        observe = self._drift_observe

        def torchwatch_drift_hook(module: nn.Module, args: Any, output: Any) -> None:
            observe(fqn, output)

        return Hook(torchwatch_drift_hook)

    def _drift_observe(self, fqn: str, output: Any) -> None:
        if self._graph_mode():
            self._drift.observe(fqn, output, locked=False)
            return
        try:
            self._drift.observe(fqn, output)
        except Exception as exc:  # noqa: BLE001 - a hook never breaks inference
            self._hook_failed(fqn, exc)

    def _graph_mode(self) -> bool:
        """True while torch.compile traces, or while a CUDA graph is being captured."""
        return _compiling() or (self._cuda and torch.cuda.is_current_stream_capturing())

    # ---- root calls ------------------------------------------------------------------------

    def _enter_root(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        if self._graph_mode():
            self._tick()
            return
        tls = self._tls
        depth = getattr(tls, "depth", 0)
        tls.depth = depth + 1
        if depth:  # the model calling itself: part of the outer call
            return
        tls.call = None
        tls.flush_due = False
        tls.t0 = None
        try:
            tls.t0 = self._timer.start()
            with self._lock:
                index = self._calls
                self._calls += 1
                self._window_calls += 1
                sampled = index % self.every == 0
                if sampled:
                    self._window_sampled += 1
            tls.flush_due = (index + 1) % self.flush_every == 0
            if sampled:
                cohort, trace_id = _labels.get()
                tls.call = _Call(index, self._bounded_cohort(cohort), trace_id)
                if trace_id is not None and self._tables:
                    self._remember_trace(index, trace_id)
                if self.every > 1 and self.sampling == "python":
                    self._install()
        except Exception as exc:  # noqa: BLE001 - a hook never breaks inference
            tls.call = None
            self._hook_failed(ROOT_CALL, exc)
        if tls.call is not None and self._inputs is not None:
            try:
                with torch.no_grad():
                    self._observe_inputs(tls.call, args, kwargs)
            except Exception as exc:  # noqa: BLE001 - a hook never breaks inference
                self._hook_failed(_edges.INPUT, exc)

    def _observe_inputs(self, call: _Call, args: Any, kwargs: dict[str, Any]) -> None:
        """The root call's tensor arguments: floats measured like outputs (plus channel means),
        integers into frequency sketches."""
        acc = self._inputs
        limit = acc.config.max_inputs
        n = 0
        for base, value in [*((f"[{i}]" if i else "", v) for i, v in enumerate(args)),
                            *((f".{k}", v) for k, v in kwargs.items())]:  # fmt: skip
            found = (("", value),) if type(value) is torch.Tensor else tensors_in(value)
            for label, x in found:
                if n >= limit:
                    return
                if type(x) not in PLAIN_TENSOR_TYPES or x.layout is not torch.strided or x.is_meta:
                    continue
                name = _edges.INPUT + base + label
                if x.is_floating_point():
                    n += 1
                    self._measure(call, name, x)
                    acc.add_float(name, x)
                elif x.dtype in _edges.ID_DTYPES:
                    n += 1
                    acc.add_ids(name, x)

    def _tick(self) -> None:
        """Graph path of a root call: count it and decide sampling on the device."""
        for table in self._tables.values():
            control = table.control
            control[CALLS] += 1
            control[ENABLED] = ((control[CALLS] - 1) % self.every == 0).to(torch.int64)

    def _exit_root(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._graph_mode():
            return
        tls = self._tls
        depth = getattr(tls, "depth", 0)
        if depth == 0:  # attached while this call was already running
            return
        tls.depth = depth - 1
        if depth > 1:
            return
        call, tls.call = tls.call, None
        alert = None
        try:
            if tls.t0 is not None:
                self._timer.stop(tls.t0)
        except Exception as exc:  # noqa: BLE001 - timing must not cost the call its statistics
            self._hook_failed(ROOT_CALL, exc)
        try:
            if call is not None:
                if self.every > 1 and self.sampling == "python":
                    self._uninstall()
                if self._outputs is not None:
                    self._observe_output(output, call.trace_id)
                alert = self._finish_call(call)
                self._completed_sampled += 1
            if tls.flush_due:
                self._flush(wait=False, automatic=True)
        except Exception as exc:  # noqa: BLE001 - a hook never breaks inference
            self._hook_failed(ROOT_CALL, exc)
        if alert is not None and self.on_nonfinite == "raise":
            raise NonFiniteError(
                f"{alert.message}. Look at that module's inputs and weights; "
                'pass on_nonfinite="warn" to keep serving and only record it.',
                alert,
            )

    def _observe_output(self, output: Any, trace_id: str | None) -> None:
        try:
            with torch.no_grad():
                self._outputs.observe(output, trace_id)
        except _edges.OutputError as exc:
            with self._lock:
                self._errors["outputs"] += 1
            self._warn_once(
                "outputs",
                f"output quality not measured: {exc}. Pass attach(outputs=...) the key, index or a callable that "
                'selects the logits. Counted in watch.errors["outputs"]; inference was not affected.',
            )
        except Exception as exc:  # noqa: BLE001 - a hook never breaks inference
            self._hook_failed(OUTPUT, exc)

    def _bounded_cohort(self, cohort: str | None) -> str | None:
        if cohort in self._cohorts:
            return cohort
        with self._lock:
            if len(self._cohorts) <= self._max_cohorts:
                self._cohorts.add(cohort)
                return cohort
        self._warn_once(
            "cohorts",
            f"more than {self._max_cohorts} cohorts; cohort {cohort!r} and later new ones are merged "
            f"into {OTHER_COHORT!r}. Raise attach(max_cohorts=...) if you need them apart.",
        )
        return OTHER_COHORT

    def _remember_trace(self, index: int, trace_id: str) -> None:
        with self._lock:
            self._trace_ids[index] = trace_id
            if len(self._trace_ids) > MAX_TRACE_IDS:
                self._trace_ids.popitem(last=False)

    # ---- measuring -------------------------------------------------------------------------

    def _on_output(self, fqn: str, output: Any) -> None:
        if self._graph_mode():
            self._graph_output(fqn, output)
            return
        tls = self._tls
        call = getattr(tls, "call", None)
        if call is None and getattr(tls, "depth", 0):
            return  # an unsampled root call in this thread; the hooks are up for another
        try:
            orphan = call is None
            if orphan:
                call = self._orphan_call(fqn)
            if fqn not in self._seen:
                self._seen.add(fqn)
            if type(output) is torch.Tensor:
                self._measure(call, fqn, output)
            else:
                for label, tensor in tensors_in(output):
                    self._measure(call, fqn + label, tensor)
            if orphan:
                self._finish_call(call)
        except Exception as exc:  # noqa: BLE001 - a hook never breaks inference
            self._hook_failed(fqn, exc)

    def _new_plan(self, dtype: torch.dtype) -> CastPlan | None:
        """The cast plan of a dtype (None if not floating point), and its CPU kernel arguments."""
        plan = cast_plan(dtype, self.cast_dtypes) if dtype.is_floating_point else None
        if plan is not None and cpu_kernel.available and dtype in cpu_kernel.DTYPE_CODES:
            self._cpu_kernel[dtype] = (cpu_kernel.DTYPE_CODES[dtype], cpu_kernel.native_plan(plan), False)
        self._plans[dtype] = plan
        return plan

    def _new_table(self, device: torch.device) -> DeviceTable:
        with self._lock:
            table = self._tables.get(device)
            if table is None:
                table = DeviceTable(device, len(self.cast_dtypes), self._table_capacity)
                table.kernel = _triton_for(device)
                if table.kernel is not None:
                    table.scratch = table.kernel.Workspace(table, [p for p in self._plans.values() if p is not None])
                self._tables = {**self._tables, device: table}
                self._cuda = self._cuda or device.type == "cuda"
        return table

    def _orphan_call(self, fqn: str) -> _Call:
        self._warn_once(
            "orphan",
            f"{fqn!r} ran outside a call of the watched model (model.forward() called directly, a "
            "submodule called on its own, or another thread); its statistics are recorded with call "
            "index -1. Call the model itself, model(x), to get call indices and sampling.",
        )
        cohort, trace_id = _labels.get()
        return _Call(-1, self._bounded_cohort(cohort), trace_id)

    def _measure(self, call: _Call, name: str, x: torch.Tensor) -> None:
        # Cheapest checks first: in a real forward every tensor attribute is a cache-cold call.
        if type(x) not in PLAIN_TENSOR_TYPES:
            return
        plan = self._plans.get(x.dtype, _NO_PLAN)
        if plan is _NO_PLAN:
            plan = self._new_plan(x.dtype)
        if plan is None or x.layout is not torch.strided:
            return
        seq = call.seq
        call.seq = seq + 1
        if (x.is_cpu and not self._device_path) or (measurable(x) and x.numel() == 0):
            kernel = self._cpu_kernel.get(x.dtype)
            if kernel is not None and x.is_cpu and x.is_contiguous():  # the common case, inlined
                raw = cpu_kernel.tensor_stats(x.data_ptr(), x.numel(), *kernel)
            else:
                raw = host_stats(x, plan)
            key = (call.cohort, name)
            with self._lock:
                acc = self._window.get(key)
                # positions are bounded like the device tables' slots
                if acc is None and (key in self._host_keys or len(self._host_keys) < self._table_capacity):
                    self._host_keys.add(key)
                    acc = self._window[key] = new_host_accumulator(len(plan.names))
                    self._order.setdefault(name)
                if acc is not None:
                    acc.add(raw)
            if acc is None:
                self._table_full(name)
                return
            if raw[1] or raw[2] or raw[3]:
                call.events.append((seq, name, raw[1], raw[2], raw[3]))
            return
        if not measurable(x):
            return
        table = self._tables.get(x.device) or self._new_table(x.device)
        slot = table.slot((call.cohort, name))
        if slot is None:
            self._table_full(name)
            return
        if name not in self._order:
            with self._lock:
                self._order.setdefault(name)
        with self._merge_lock, torch.no_grad():
            _merge_for(table, x)(table, slot, x.detach(), plan, call.index, use_flag=False)
        call.device.append((seq, name, table, slot))

    def _graph_output(self, fqn: str, output: Any) -> None:
        """Graph path of a module's hook: device-side operations only, nothing to wait for."""
        items = (("", output),) if isinstance(output, torch.Tensor) else tensors_in(output)
        for label, x in items:
            if type(x) not in PLAIN_TENSOR_TYPES or not x.is_floating_point() or x.layout is not torch.strided:
                continue
            plan = self._plans.get(x.dtype)
            table = self._tables.get(x.device)
            if plan is None or table is None or x.numel() == 0:
                continue
            name = fqn + label
            slot = table.slot((None, name), tracing=_compiling())
            if slot is None:
                continue
            self._order.setdefault(name)
            self._seen.add(fqn)
            call = table.control[CALLS] - 1
            # Inside torch.compile the statistics are torch ops that inductor fuses into its own
            # kernels: it knows the real layout of every buffer it passes them. The hand-written
            # kernel is for eager launches and captured CUDA graphs (a compiled BERT-base that
            # launched it crashed with an illegal memory access on an H200; see RESULTS.md).
            merge = torch_ops.merge_into if _compiling() and not self._triton_in_compile else _merge_for(table, x)
            with torch.no_grad():
                merge(table, slot, x.detach(), plan, call, use_flag=True)

    def _table_full(self, name: str) -> None:
        with self._lock:
            self._positions_dropped += 1
        self._warn_once(
            "table-full",
            f"more than {self._table_capacity} output positions (per device and cohort); {name!r} and later new "
            f"ones are not measured (counted in watch.errors[{POSITIONS_NOT_MEASURED!r}]). Watch fewer modules "
            "(attach(modules=...)), or return fewer distinct keys from a module.",
        )

    # ---- non-finite provenance -------------------------------------------------------------

    def _finish_call(self, call: _Call) -> Alert | None:
        """Resolve where NaN/Inf started on this call. Device measurements are resolved at the
        next flush, unless ``on_nonfinite="raise"`` needs them now (one wait for the device)."""
        events = call.events
        if call.device and self.on_nonfinite == "raise":
            events = sorted(events + self._device_events(call))
        return self._nonfinite_found(call, events) if events else None

    def _device_events(self, call: _Call) -> list[tuple[int, str, int, int, int]]:
        """This call's device measurements that held NaN/Inf: one read per table (waits)."""
        found = []
        with self._flush_lock:
            columns = {}
            for table in {id(t): t for _, _, t, _ in call.device}.values():
                half = table.active
                columns[id(table)] = (
                    table.nfcalls[half, :, 1].tolist(),
                    table.counts[half, :, C_NAN : C_NEGINF + 1].tolist(),
                )
            for seq, name, table, slot in call.device:
                last, counts = columns[id(table)]
                if last[slot] == call.index:  # counts are the window's, a hint at the kind
                    found.append((seq, name, *(counts[slot] if any(counts[slot]) else (1, 0, 0))))
        return found

    def _nonfinite_found(self, call: _Call, events: list[tuple[int, str, int, int, int]]) -> Alert | None:
        """Record first occurrences and raise the alert for one call's NaN/Inf events."""
        _, origin, nan, posinf, neginf = events[0]  # the first in execution order
        names = list(dict.fromkeys(name for _, name, *_ in events))
        with self._lock:
            for name in names:
                if name not in self._first_nonfinite:
                    record = FirstNonFinite(name, call.index, call.trace_id, call.cohort, origin)
                    self._first_nonfinite[name] = self._window_nonfinite[name] = record
        alert = nonfinite_alert(
            origin, (nan, posinf, neginf), spread=len(names) - 1, call=call.index, cohort=call.cohort,
            trace_id=call.trace_id,
        )  # fmt: skip
        self._trip(alert)  # health follows NaN/Inf whatever the notification policy
        if self.on_nonfinite == "ignore":
            return None
        self._deliver(alert)
        return alert

    def _trip(self, alert: Alert) -> None:
        with self._lock:
            self._trip_alert = alert
            self._trips += 1

    def _deliver(self, alert: Alert, *, window: bool = True) -> None:
        """Keep the alert and act on it; ``window``: also send it with the next flush's record."""
        with self._lock:
            self._alerts.append(alert)
            if window:
                self._window_alerts.append(alert)
        if self.on_nonfinite == "warn":
            self._warn_once(
                f"nonfinite:{alert.module}", f"{alert.message}; see watch.alerts (warned once per origin module)"
            )
        elif callable(self.on_nonfinite):
            try:
                self.on_nonfinite(alert)
            except Exception as exc:  # noqa: BLE001 - only "raise" may raise into serving code
                with self._lock:
                    self._errors["on_nonfinite"] += 1
                self._warn_once("callback", f"the on_nonfinite callable raised {exc!r}; it was ignored")

    def _deliver_monitor(self, alert: Alert, *, window: bool) -> None:
        """Keep an alert of a built-in monitor (drift, fingerprint), send it with a record when
        ``window``, and warn once per rule and module."""
        with self._lock:
            self._alerts.append(alert)
            if window:
                self._window_alerts.append(alert)
        self._warn_once(f"{alert.rule}:{alert.module}", f"{alert.message}; see watch.alerts (warned once per module)")

    def _deliver_fingerprint(self, alert: Alert) -> None:
        """Weights changed in memory: trip the watch, then keep and send the alert like drift's."""
        self._trip(alert)
        self._deliver_monitor(alert, window=True)

    def _drift_now(self, step: int) -> dict:
        """Evaluate the drift windows completed so far (snapshot: the caller holds the flush lock
        and the worker is idle); alarms go out with the next record."""
        if self._drift is None:
            return {}
        statuses, alerts = self._drift.process(self._drift.start_read(), step)
        for alert in alerts:
            self._deliver_monitor(alert, window=True)
        self._warn_lost_windows()
        return statuses

    def _warn_lost_windows(self) -> None:
        if self._drift.lost:
            self._warn_once(
                "drift-lost",
                f"{self._drift.lost} drift windows completed faster than flushes read them and were skipped "
                f"(the device ring holds {RING}); flush more often (attach(flush_every=...)) or use a larger window",
            )

    def _device_firsts(self, ranges: dict[Hashable, tuple[int, int]]) -> dict[str, FirstNonFinite]:
        """FirstNonFinite records for positions not seen non-finite before, from a device window."""
        with self._lock:
            order = {name: i for i, name in enumerate(self._order)}
            known = set(self._first_nonfinite)
            traces = dict(self._trace_ids)
        keyed = {key: r for key, r in ranges.items() if key[1] not in known}
        if not keyed:
            return {}
        origins = device_origins(ranges, {key: order.get(key[1], len(order)) for key in ranges})
        return {
            key[1]: FirstNonFinite(key[1], call, traces.get(call), key[0], origin[1])
            for key, (call, origin) in origins.items()
            if key in keyed
        }

    # ---- flushing --------------------------------------------------------------------------

    def _flush(self, *, wait: bool, timeout: float = 30.0, automatic: bool = False) -> None:
        """Swap the window and start the device copies here; the worker thread does the rest.

        ``automatic`` (every ``flush_every`` calls, on the serving thread): when the worker
        already has ``MAX_PENDING_FLUSHES`` intervals waiting (it cannot even keep up with
        folding them), or another flush or snapshot is in progress, the window is left as it is
        and goes out with the next flush, which says so in ``record.merged``: nothing is
        dropped, memory stays bounded and the serving thread never waits.
        """
        if automatic:
            if self._worker.pending >= MAX_PENDING_FLUSHES or not self._flush_lock.acquire(blocking=False):
                with self._lock:
                    self._merged += 1  # this interval goes out with the next flush (record.merged)
                return
        else:
            self._flush_lock.acquire()
        try:
            with self._lock:
                window, self._window = self._window, {}
                calls, sampled = self._window_calls, self._window_sampled
                self._window_calls = self._window_sampled = 0
                alerts, self._window_alerts = self._window_alerts, []
                nonfinite, self._window_nonfinite = self._window_nonfinite, {}
                merged, self._merged = self._merged, 0
                step = self._calls
            reads = [(table, table.flip()[1]) for table in list(self._tables.values()) if table.keys]
            drift = self._drift.start_read() if self._drift is not None and (calls or reads) else None
            edges = self._take_edges(keep=False)
            if calls or window or reads or alerts or nonfinite or edges[1] is not None:
                interval = Interval(step, calls, sampled, window, reads, alerts, nonfinite, drift, edges, merged)
                # queued under the lock: intervals reach the worker in the order they were cut
                self._worker.submit(functools.partial(self._finish_flush, interval))
        finally:
            self._flush_lock.release()
        if wait:
            self._worker.submit(None, wait=True, timeout=timeout)

    def _take_edges(self, *, keep: bool) -> tuple[dict[str, Any], Any]:
        """Device copies of the input and output accumulators (zeroed unless ``keep``)."""
        inputs = self._inputs.take(keep=keep) if self._inputs is not None else {}
        outputs = self._outputs.take(keep=keep) if self._outputs is not None else None
        return inputs, outputs

    def _edges_to_host(self, edges: tuple[dict[str, Any], Any], *, fold: bool) -> tuple[dict, Any]:
        """Host statistics of taken accumulators; ``fold``: add them to the totals since the reset."""
        inputs = _edges.inputs_to_host(edges[0])
        outputs = _edges.output_to_host(edges[1])
        with self._lock:
            totals = dict(self._input_totals)
            for name, stats in inputs.items():
                totals[name] = totals[name].merge(stats) if name in totals else stats
            total_out = self._output_total
            if outputs is not None:
                total_out = outputs if total_out is None else total_out.merge(outputs)
            if fold:
                self._input_totals, self._output_total = totals, total_out
        return (inputs, outputs) if fold else (totals, total_out)

    def _device_reads(self, reads: list[tuple[DeviceTable, WindowRead]], *, advance: bool) -> DevicePart:
        """Fold device window reads: their statistics, the root calls replayed from graphs since
        the previous read, and where NaN/Inf first appeared. The one conversion used by both
        flushes (``advance``: these calls are now accounted for) and snapshots."""
        part = DevicePart()
        for table, read in reads:
            with self._lock:
                graph_calls = read.root_calls - self._device_root_calls.get(table.device, 0)
                if advance:
                    self._device_root_calls[table.device] = read.root_calls
            part.calls += graph_calls
            part.sampled += graph_calls if self.every == 1 else len(range(0, graph_calls, self.every))
            part.stats += [(key, self._raw_stats(n, raw)) for key, (n, raw) in read.stats.items()]
            part.counts.update({key[1]: tuple(raw[1:4]) for key, (_, raw) in read.stats.items() if any(raw[1:4])})
            for name, record in self._device_firsts(read.nonfinite).items():
                part.firsts.setdefault(name, record)
        return part

    def _finish_flush(self, interval: Interval, waiting: int) -> Record | None:
        """Worker thread: wait for the copies, fold the window into the totals, run the rules on
        it, and make the record. With ``MERGE_RECORDS_BEHIND`` or more intervals ``waiting``
        behind this one (the sinks are behind), the record is held back and merged into the
        next one's: rules still see every interval, the sinks get fewer, larger records,
        nothing is dropped."""
        converted = [(key, to_module_stats(acc, self.cast_dtypes)) for key, acc in interval.window.items()]
        device = self._device_reads([(table, table.read(handle)) for table, handle in interval.reads], advance=True)
        converted += device.stats
        calls = interval.calls + device.calls
        step = interval.step + device.calls
        sampled = interval.sampled + device.sampled
        with self._lock:
            for key, s in converted:
                total = self._totals.get(key)
                self._totals[key] = s if total is None else total.merge(s)
            self._since_reset_calls += calls
            self._since_reset_sampled += sampled
            new_firsts = {name: r for name, r in device.firsts.items() if name not in self._first_nonfinite}
            self._first_nonfinite.update(new_firsts)
        alerts = list(interval.alerts) + self._device_alerts(new_firsts, device.counts)
        drift_status: dict = {}
        if interval.drift is not None:
            drift_status, drift_alerts = self._drift.process(interval.drift, step)
            for alert in drift_alerts:
                self._deliver_monitor(alert, window=False)
            self._warn_lost_windows()
            alerts += drift_alerts
        self._check_unseen()
        now = time.time()
        latency = self._timer.take_sketch()
        if self._timer.dropped or any(t.dropped for t in self._module_timers.values()):
            self._warn_once(
                "latency-lost",
                "device timings of calls were dropped because no flush read them in time (counted in "
                f"watch.errors[{LATENCY_LOST!r}]); flush more often (attach(flush_every=...))",
            )
        inputs, outputs = self._edges_to_host(interval.edges, fold=True)
        timing = {name: timer.take_sketch() for name, timer in self._module_timers.items()}
        alerts += self._run_rules(step, now, converted, drift_status, latency.stats(), inputs, outputs)
        part = RecordParts(
            step=step, time=now, calls=calls, sampled=sampled, stats=converted,
            alerts=[a for a in alerts if self.alert_policy.admit(a, now)],
            nonfinite={**interval.nonfinite, **new_firsts}, drift=drift_status, latency=latency, inputs=inputs,
            outputs=outputs, timing=timing, merged=interval.merged,
        )  # fmt: skip
        if self._carry is not None:  # earlier intervals held back while the sinks were behind
            part = self._carry.merge(part)
            self._carry = None
        if waiting >= MERGE_RECORDS_BEHIND:
            self._carry = part
            return None
        return part.record(self._order_of, self._error_counts())

    def _order_of(self, names: Iterable[str]) -> list[str]:
        """``names`` in first-measured order."""
        with self._lock:
            return [name for name in self._order if name in names]

    def _run_rules(
        self, step: int, now: float, converted: list, drift_status: dict, latency: Any, inputs: dict, outputs: Any
    ) -> list[Alert]:
        """Worker thread: evaluate the rules on this interval, once per cohort."""
        if not self.rules or not (converted or latency.count or inputs or outputs is not None):
            return []
        by_cohort: dict[str | None, dict[str, list[ModuleStats]]] = {None: {}}
        for (cohort, name), s in converted:
            by_cohort.setdefault(cohort, {}).setdefault(name, []).append(s)
        out: list[Alert] = []
        for cohort, per_name in by_cohort.items():
            stats = {n: merge_all(v) for n, v in per_name.items()}
            if cohort is None:  # calls of every cohort: latency is not split by cohort
                interval = _rules.Interval(step, now, None, stats, drift_status, latency, inputs, outputs)
            else:
                interval = _rules.Interval(step, now, cohort, stats)
            for rule in self.rules:
                try:
                    found = list((rule.evaluate if isinstance(rule, _rules.Rule) else rule)(interval) or ())
                except Exception as exc:  # noqa: BLE001 - a broken rule never stops the flush
                    name = _rules.rule_name(rule)
                    with self._lock:
                        self._errors[f"rule:{name}"] += 1
                    self._warn_once(f"rule:{name}", f"rule {name!r} raised {exc!r}; counted in watch.errors")
                    continue
                for alert in found:
                    if not isinstance(alert, Alert):
                        continue
                    if _rules.trips(rule):
                        self._trip(alert)
                    out.append(alert)
        if out:
            with self._lock:
                self._alerts.extend(out)
            for alert in out:
                # one warning per rule: a fault that moves every module must not flood the log
                self._warn_once(f"rule-alert:{alert.rule}", f"{alert.message} (warned once per rule; see watch.alerts)")
        return out

    def _device_alerts(self, firsts: dict[str, FirstNonFinite], counts: dict[str, tuple[int, int, int]]) -> list[Alert]:
        """One alert per origin among positions that went non-finite on the device this window."""
        if counts:  # NaN/Inf on the device this window (first or not): the watch is unhealthy
            origin = next(iter(counts))
            self._trip(nonfinite_alert(origin, counts[origin], spread=len(counts) - 1, call=-1, cohort=None,
                                       trace_id=None))  # fmt: skip
        if self.on_nonfinite == "ignore" or not firsts:
            return []
        by_origin: dict[tuple[str, int], list[FirstNonFinite]] = {}
        for record in firsts.values():
            by_origin.setdefault((record.origin, record.call), []).append(record)
        out = []
        for (origin, call), records in sorted(by_origin.items(), key=lambda item: item[0][1]):
            alert = nonfinite_alert(
                origin, counts.get(origin, (1, 0, 0)), spread=len(records) - 1, call=call,
                cohort=records[0].cohort, trace_id=records[0].trace_id,
            )  # fmt: skip
            self._deliver(alert, window=False)  # it goes out with the record being made
            out.append(alert)
        return out

    def _raw_stats(self, calls: int, raw: tuple) -> ModuleStats:
        return stats_from_raw(calls, raw, self.cast_dtypes)

    # ---- failure reporting -----------------------------------------------------------------

    def _check_unseen(self) -> None:
        """Warn once if selected modules never ran while sampled calls completed."""
        if self._unseen_checked or self._completed_sampled == 0:
            return
        self._unseen_checked = True
        unseen = [name for name in self.modules if name not in self._seen]
        if not unseen:
            return
        hint = ""
        model = self._model()
        if model is not None and any(
            isinstance(m, (nn.TransformerEncoderLayer, nn.MultiheadAttention)) for m in model.modules()
        ):
            hint = (
                " nn.TransformerEncoderLayer/MultiheadAttention take a fused fast path in eval that "
                "skips their submodules' hooks: select the layers themselves, or call "
                "torch.backends.mha.set_fastpath_enabled(False)."
            )
        shown = ", ".join(repr(n) for n in unseen[:8]) + (" ..." if len(unseen) > 8 else "")
        self._warn_once(
            "unseen",
            f"{len(unseen)} watched module(s) never ran in the calls measured so far: {shown}. They may "
            f"be unused, or bypass hooks (called via .forward(), or a fused fast path).{hint}",
        )

    def _hook_failed(self, fqn: str, exc: BaseException) -> None:
        with self._lock:
            self._errors[fqn] += 1
        self._warn_once(
            f"hook:{type(exc).__name__}",
            f"the torchwatch hook of {fqn!r} failed with {exc!r}; inference was not affected. "
            "Failures are counted per module in watch.errors (warned once per kind of error).",
        )

    def _job_failed(self, exc: BaseException) -> None:
        with self._lock:
            self._errors[WORKER] += 1
        self._warn_once(f"worker:{type(exc).__name__}", f"finishing a flush failed with {exc!r}; its window was lost")

    def _sink_failed(self, sink: Sink, exc: BaseException) -> None:
        with self._lock:
            self._errors[f"sink:{sink!r}"] += 1
        self._warn_once(
            f"sink:{id(sink)}",
            f"{sink!r} failed with {exc!r} and is disabled; inference and the other sinks go on. "
            "Fix the destination (permissions, free space) and attach again to re-enable it.",
        )

    def _warn_once(self, key: str, message: str) -> None:
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        warnings.warn(f"torchwatch: {message}", TorchwatchWarning, stacklevel=3)


@functools.cache
def _triton_for(device: torch.device) -> Any:
    """The Triton kernel module for CUDA devices where Triton imports, else None."""
    if device.type != "cuda":
        return None
    try:
        from .kernels import triton_stats
    except ImportError:
        return None
    return triton_stats


def _merge_for(table: DeviceTable, x: torch.Tensor) -> Callable[..., None]:
    """The table's fused kernel where it takes this dtype, else the torch-ops twin."""
    kernel = table.kernel
    if kernel is not None and kernel.supports(x, table.k):
        return kernel.merge_into
    return torch_ops.merge_into


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _weak_callback(method: Callable[..., None]) -> Callable[..., None]:
    """Call ``method`` while its object lives; the worker thread must not keep a watch alive."""
    ref = weakref.WeakMethod(method)

    def call(*args: Any) -> None:
        bound = ref()
        if bound is not None:
            bound(*args)

    return call


def _drift_monitor(model: nn.Module, drift: Any, arl: Any) -> tuple[Any, list[tuple[str, nn.Module]]]:
    """The drift monitor for ``attach(drift=..., drift_arl=...)`` and the modules it hooks."""
    if drift is None:
        if arl is not None:
            raise ConfigError("drift_arl needs drift=: pass a torchwatch.Reference to monitor")
        return None, []
    from .drift import Reference

    if not isinstance(drift, Reference):
        raise ConfigError(f"drift= takes a torchwatch.Reference (Reference.fit or .load), got {type(drift).__name__}")
    if arl is not None and (isinstance(arl, bool) or not isinstance(arl, (int, float)) or not arl > 1):
        raise ConfigError(f"drift_arl must be a number of windows > 1, got {arl!r}")
    names = dict(model.named_modules())
    missing = [n for n in drift.modules if n not in names]
    if missing:
        raise ConfigError(
            f"the drift reference monitors modules this model does not have: {missing}; "
            f"fit the reference on this model (its modules include {list(names)[1:6]})"
        )
    return DriftMonitor(drift, _model_device(model), arl), [(n, names[n]) for n in drift.modules]


def _input_monitor(inputs: Any) -> _edges.InputMonitor | None:
    if inputs is True:
        return _edges.InputMonitor()
    if inputs is False or inputs is None:
        return None
    if isinstance(inputs, _edges.InputMonitor):
        return inputs
    raise ConfigError(f"inputs= takes True, False or a tw.InputMonitor, got {inputs!r}")


def _output_monitor(outputs: Any) -> _edges.OutputMonitor | None:
    if outputs is None or outputs is False:
        return None
    if outputs is True:
        return _edges.OutputMonitor(select=None)
    if isinstance(outputs, _edges.OutputMonitor):
        return outputs
    if isinstance(outputs, (str, int)) or callable(outputs):
        return _edges.OutputMonitor(select=outputs)
    raise ConfigError(
        f"outputs= takes a key ('logits'), an index, a callable output -> logits, True (the output is the "
        f"logits) or a tw.OutputMonitor, got {outputs!r}"
    )


def _nonfinite_policy(policy: object) -> str | Callable[[Alert], object]:
    if callable(policy) or policy in NONFINITE_POLICIES:
        return policy  # type: ignore[return-value]
    raise ConfigError(
        f"on_nonfinite={policy!r} is not valid: use one of {', '.join(map(repr, NONFINITE_POLICIES))} "
        "or a callable taking a torchwatch.Alert"
    )


def _sink_list(sinks: Iterable[Sink]) -> list[Sink]:
    if isinstance(sinks, Sink):
        raise ConfigError(f"sinks must be a list of sinks, got a single {sinks!r}; write sinks=[{sinks!r}]")
    try:
        items = list(sinks)
    except TypeError:
        raise ConfigError(f"sinks must be a list of sinks, got {sinks!r}") from None
    bad = [s for s in items if not callable(getattr(s, "write", None))]
    if bad:
        raise ConfigError(
            f"sinks: {bad[0]!r} is not a sink (it has no write(record) method); use tw.TensorBoardSink, "
            "tw.JsonlSink, tw.MemorySink or a subclass of tw.Sink"
        )
    return items


def attach(
    model: nn.Module,
    *,
    modules: Any = None,
    every: int = 1,
    sampling: str = "python",
    sinks: Iterable[Sink] = (),
    flush_every: int = 100,
    cast_dtypes: Iterable[object] = DEFAULT_CAST_DTYPES,
    on_nonfinite: str | Callable[[Alert], object] = "warn",
    max_cohorts: int = 16,
    drift: Any = None,
    drift_arl: float | None = None,
    rules: Iterable[Any] | None = None,
    alert_policy: Any = None,
    inputs: Any = True,
    outputs: Any = None,
    timing: bool = False,
) -> Watch:
    """Start measuring the outputs of ``model``'s modules on every ``every``-th call.

    Args:
        model: the model; its own ``model(...)`` calls are the *root calls* that are counted,
            sampled and labelled. Attach after moving it to its device and before
            ``torch.compile`` (hooks added after compiling are ignored by compiled code).
        modules: which modules: ``None`` (every leaf module except Dropout/Identity), a regex
            matched against the whole fully-qualified name, a list of names, a tuple of module
            types, or a callable ``(fqn, module) -> bool``.
        every: measure one root call in ``every`` (the first is always measured).
        sampling: ``"python"`` (default): unsampled eager calls run no per-module hook at all.
            ``"device"``: the hooks stay installed and a counter on the device decides which calls
            count, so sampling also works inside ``torch.compile`` and captured CUDA graphs
            (where Python does not run per call). Same as ``"python"`` when ``every == 1``.
        sinks: where flushes go: :class:`TensorBoardSink`, :class:`JsonlSink`, :class:`MemorySink`.
        flush_every: eager root calls between flushes (also on :meth:`Watch.flush`,
            :meth:`Watch.snapshot` reads, detach and exit).
        cast_dtypes: dtypes to count would-underflow/overflow against (at most 8).
        on_nonfinite: on NaN/Inf: ``"ignore"`` (record only), ``"warn"`` (an :class:`Alert` and
            one warning per origin module), ``"raise"`` (:class:`NonFiniteError` after the forward
            completes) or a callable receiving the :class:`Alert`. On accelerators ``"warn"`` and
            callables run when the window is flushed (one alert per origin per window);
            ``"raise"`` waits for the device once per call, and cannot raise from compiled code.
        max_cohorts: distinct ``context(cohort=...)`` values kept apart.
        drift: a :class:`~torchwatch.Reference`: monitor its modules' embeddings for drift on
            every call (whatever ``every`` is). Each window of ``reference.window`` samples is
            evaluated at the next flush or snapshot; alarms are :class:`Alert` s with
            ``rule="drift"`` in ``watch.alerts`` and the sinks (one warning per module), and
            ``snapshot().drift[fqn]`` holds the :class:`~torchwatch.DriftStatus`.
        drift_arl: target windows between false alarms (default: the reference's ``arl``);
            :func:`~torchwatch.arl_windows` turns "one a week at 50 requests/s" into windows.
        rules: alert rules evaluated at each flush, off the serving thread (default:
            :func:`torchwatch.rules.defaults`: cast overflow/underflow limits and baseline control
            charts of abs-max, std and zero fraction); ``[]`` turns them off. NaN/Inf and drift
            alerts are built in.
        alert_policy: a :class:`torchwatch.rules.AlertPolicy` (de-duplication cool-down and rate
            limit for what reaches the sinks; default: 5 minutes per rule/module/stat/cohort, 60 a minute).
        inputs: measure the root call's tensor arguments (default True): floating-point ones as
            ``"<input>"`` positions (``"<input>[1]"``, ``"<input>.key"`` for others) with the
            statistics of any output plus per-channel means; integer ones (token ids) in frequency
            sketches. ``snapshot().inputs`` / ``record.inputs``; a :class:`~torchwatch.InputMonitor`
            to configure, False to turn off. Eager calls only (not inside compiled graphs).
        outputs: output-quality monitoring of a classifier/LM head (default off): ``"logits"`` (a
            key or attribute of the output), an index, a callable ``output -> logits``, True for a
            model that returns the logits, or a :class:`~torchwatch.OutputMonitor`. Confidence,
            margin, entropy, predicted classes, abstentions; accuracy and ECE with
            :meth:`Watch.record_labels`. Eager calls only.
        timing: also time each watched module (pre- and post-hooks: wall clock on CPU, CUDA events
            on GPU; costs about 2 us per module per sampled call on CPU). ``snapshot().timing``.

    Returns:
        The :class:`Watch`, also a context manager that detaches on exit.

    Raises:
        ConfigError: a bad argument, a selector that matches nothing, or a model that is
            already watched (one watch per model: detach it first or keep using it).

    Example:
        >>> import torch, torchwatch as tw
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> watch = tw.attach(model)
        >>> _ = model(torch.randn(4, 8))
        >>> watch.snapshot()["1"].zeros >= 0, watch.snapshot()["2"].count
        (True, 8)
        >>> watch.detach()
    """
    return Watch(
        model, modules=modules, every=every, sampling=sampling, sinks=sinks, flush_every=flush_every,
        cast_dtypes=cast_dtypes, on_nonfinite=on_nonfinite, max_cohorts=max_cohorts, drift=drift,
        drift_arl=drift_arl, rules=rules, alert_policy=alert_policy, inputs=inputs, outputs=outputs, timing=timing,
    )  # fmt: skip


@atexit.register
def _detach_all() -> None:
    """Flush and close every live watch when the interpreter exits."""
    for watch in list(_live):
        try:
            watch.detach(timeout=10.0)
        except Exception:  # noqa: BLE001, S110 - nothing left to report to at exit
            pass
