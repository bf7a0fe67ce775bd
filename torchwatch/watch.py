"""``attach()`` and :class:`Watch`: one line in serving code turns torchwatch on.

A :class:`Watch` is a thin facade: :func:`attach` validates the options once into a frozen
:class:`~torchwatch.config.WatchConfig`, builds the monitors they turn on
(:mod:`torchwatch.monitors`) and hands them to the :class:`~torchwatch.engine.core.Engine`,
which runs the hooks, the windows, the alert bus and the sink worker. Every public method here
is a call into one of those.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from . import _validate
from .alerts import Alert
from .capture.monitor import CaptureMonitor
from .config import WatchConfig
from .engine import registry
from .engine.bus import AlertBus
from .engine.core import Engine
from .errors import ConfigError
from .fleet.identity import replica_name
from .integrity.canary import Canary
from .monitors.base import Monitor, labels
from .monitors.canary import CanaryMonitor
from .monitors.fingerprint import FingerprintMonitor
from .monitors.outputs import Outputs
from .records import Snapshot
from .sinks.base import Sink
from .stats import DEFAULT_CAST_DTYPES


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
        rules: the alert rules evaluated at each flush.
        alert_policy: the :class:`~torchwatch.rules.AlertPolicy` of what reaches the sinks.
        config: every option, validated (:class:`~torchwatch.config.WatchConfig`).
        engine: the :class:`~torchwatch.engine.core.Engine` (for monitors and tools built on torchwatch).
    """

    def __init__(self, model: nn.Module, **options: Any) -> None:
        config = WatchConfig.of(model, **options)
        self.config = config
        self.modules = list(config.selected)
        self.every = config.every
        self.sampling = config.sampling
        self.flush_every = config.flush_every
        self.cast_dtypes = config.cast_dtypes
        self.on_nonfinite = config.on_nonfinite
        self.rules = list(config.rules)
        self.alert_policy = config.alert_policy
        self.attached = False
        self._model = weakref.ref(model)
        self._bus = AlertBus(config.on_nonfinite)
        monitors = config.build_monitors(model)
        self._outputs = next((m for m in monitors if isinstance(m, Outputs)), None)
        self._capture = next((m for m in monitors if isinstance(m, CaptureMonitor)), None)
        self.engine = self._engine = Engine(
            model, monitors, modules=config.modules(model), every=config.every, sampling=config.sampling,
            flush_every=config.flush_every, max_cohorts=config.max_cohorts, rules=self.rules,
            alert_policy=config.alert_policy, sinks=list(config.sinks), bus=self._bus,
        )  # fmt: skip
        registry.register(model, self, functools.partial(self._start, model))
        if hasattr(model, "_orig_mod"):
            self._bus.warn_once(
                "compiled",
                "attach() was given a torch.compile'd module; hooks added after compiling are ignored "
                "by compiled code. Attach to the module first, then call torch.compile on it.",
            )

    def _start(self, model: nn.Module) -> None:
        self._engine.start(model)
        self.attached = True

    # ---- public API --------------------------------------------------------------------

    @property
    def model(self) -> nn.Module | None:
        """The watched model, or None once it was garbage-collected."""
        return self._model()

    @property
    def calls(self) -> int:
        """Root calls of the watched model run eagerly since attaching (graph replays are
        counted on the device and show in snapshots and records)."""
        return self._engine.calls

    @property
    def alerts(self) -> list[Alert]:
        """Alerts raised so far (the last 1000), oldest first."""
        return self._bus.alerts

    @property
    def healthy(self) -> bool:
        """False from a *tripping* alert until :meth:`mark_healthy`.

        Tripping alerts: NaN/Inf (``"nonfinite"``), weights changed in memory
        (``"fingerprint"``) and rules created with ``trips=True`` (by default: any value that
        would overflow a cast to float16/bfloat16). On CPU a NaN/Inf trips at the end of the call
        that produced it; on accelerators and for rules, at the flush that sees it. Reading it
        costs one attribute comparison (no lock).
        """
        return self._bus.trips == self._bus.trips_cleared

    @property
    def trips(self) -> int:
        """Tripping alerts since attaching (only grows; :class:`~torchwatch.CircuitBreaker` watches it)."""
        return self._bus.trips

    @property
    def last_trip(self) -> Alert | None:
        """The most recent tripping alert, or None."""
        return self._bus.last_trip

    def mark_healthy(self) -> None:
        """Declare the current trips handled (after a fix or a reload): :attr:`healthy` is True again."""
        self._bus.trips_cleared = self._bus.trips

    @property
    def errors(self) -> dict[str, int]:
        """Failures torchwatch caught instead of breaking inference, and anything it could not
        record, by kind: hook errors by module name (``"(root call)"`` for the model's own call
        bookkeeping, ``"(worker)"`` for finishing a flush: that interval is lost), sink failures
        as ``"sink:<sink>"`` (the sink is disabled), ``"on_nonfinite"`` for errors of an
        ``on_nonfinite`` callable, ``"records not written"``
        (intervals still queued when ``detach()`` stopped waiting), ``"positions not measured"``
        (measurements of output positions beyond the capacity), ``"outputs changed in place before
        their grouped launch"`` (not measured on that call), ``"grouped launches failed"`` (measured
        one launch each instead), ``"drift windows lost"``,
        ``"latency timings lost"``, and a custom monitor's failures under its ``error_key``. The same
        counts go out with every record (``record.errors``) and to Prometheus
        (``torchwatch_errors_total{kind}``)."""
        return self._engine.errors()

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
        outer_cohort, outer_trace = labels.get()
        token = labels.set(
            (outer_cohort if cohort is None else str(cohort), outer_trace if trace_id is None else str(trace_id))
        )
        try:
            yield
        finally:
            labels.reset(token)

    def snapshot(self, *, cohort: str | None = None) -> Snapshot:
        """Statistics merged since the last :meth:`reset` (waits for the device on GPU).

        Args:
            cohort: only calls made under ``context(cohort=...)``; ``None`` for all calls.
        """
        return self._engine.snapshot(cohort)

    def flush(self, *, timeout: float = 30.0) -> None:
        """Send the statistics gathered since the previous flush to the sinks and wait until
        they are written (at most ``timeout`` seconds)."""
        timeout = _validate.number("flush()", "timeout", timeout, low=0.0)
        self._engine.flush(wait=True, timeout=timeout)

    def reset(self) -> None:
        """Forget statistics and non-finite records (alerts and error counts are kept)."""
        self._engine.reset()

    def detach(self, *, timeout: float = 30.0) -> None:
        """Remove every hook this watch added, flush, and close the sinks. Safe to call twice.

        Waits at most ``timeout`` seconds for the sinks; what they had not written by then is
        counted in :attr:`errors` (``"records not written"``)."""
        timeout = _validate.number("detach()", "timeout", timeout, low=0.0)
        if registry.unregister(self._model(), self, self._remove_hooks):
            self._engine.stop(timeout)

    def _remove_hooks(self) -> None:
        self.attached = False
        self._engine.remove_hooks()

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
        outputs = self._outputs
        if outputs is None:
            raise ConfigError("record_labels() needs output monitoring: attach(model, outputs='logits') or a selector")
        if isinstance(trace_ids, str):
            ids, items = [trace_ids], [labels]
        else:
            ids = [str(t) for t in trace_ids]
            items = list(labels) if not isinstance(labels, torch.Tensor) else list(labels.unbind(0))
            if len(items) != len(ids):
                raise ConfigError(f"record_labels: {len(ids)} trace ids but {len(items)} labels; give one per trace id")
        rows, unknown, repeated = outputs.accumulator.record_labels(ids, items)
        skipped = (
            ("labels:already labelled", repeated, "were labelled already; a call's labels count once"),
            ("labels:unknown trace id", unknown, "have no kept prediction (never seen under "
             "watch.context(trace_id=...), sampled out, or older than OutputMonitor.max_traces)"),
        )  # fmt: skip
        for key, ids_skipped, why in skipped:
            if ids_skipped:
                self._bus.count(key, len(ids_skipped))
                more = " ..." if len(ids_skipped) > 3 else ""
                self._bus.warn_once(
                    key, f"record_labels: trace id(s) {ids_skipped[:3]}{more} {why}; skipped and counted in "
                    f'watch.errors["{key}"]'
                )  # fmt: skip
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
            The :class:`~torchwatch.monitors.fingerprint.FingerprintMonitor` (``check_now()``,
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
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
            raise ConfigError(f"verify_fingerprint_every() needs a positive number of seconds, got {seconds!r}")
        model = self._model()
        if not self.attached or model is None:
            raise ConfigError("verify_fingerprint_every() needs an attached watch whose model is alive")
        monitor = FingerprintMonitor(model, float(seconds), baseline, functools.partial(self._bus.publish, trip=True))
        self._engine.add_monitor(monitor, replace=FingerprintMonitor)
        return monitor

    def verify_canary_every(self, seconds: float, canary: Any, *, wait: float = 30.0) -> Any:
        """Re-run ``canary`` every ``seconds`` while the model serves, between requests.

        Each check takes the model to itself for one canary forward: calls in flight finish first,
        new ones wait at their start until it is done (the cost of a forward on the canary's small
        batch, once a period; never concurrently with a request), and the canary's forward is not
        counted or measured by this watch. The outputs are compared as :func:`torchwatch.selftest`
        does (:meth:`Canary.verify`); a failure is a tripping ``"canary"`` alert. Every check's
        output digests (bitwise) and the weights' fingerprint digest go out with the next record
        (``record.extra["canary"]``) and to Prometheus as ``torchwatch_canary_info{replica, output,
        digest, weights}``, so replicas can be compared with each other (docs/fleet.md). Calling it
        again replaces the previous check; :meth:`detach` stops it.

        Args:
            seconds: period between checks (> 0; minutes are typical: 300).
            canary: a :class:`~torchwatch.Canary` or the path of a canary file.
            wait: longest wait, in seconds, for calls in flight to finish before a check (a check
                that cannot start is skipped and counted in ``watch.errors["canary checks not run"]``).

        Returns:
            The :class:`~torchwatch.monitors.canary.CanaryMonitor` (``check_now()``, ``checks``,
            ``failures``, ``last``, ``stop()``).

        Raises:
            ConfigError: bad arguments, an unreadable canary file, or a detached watch.

        Example:
            >>> import torch, torchwatch as tw
            >>> import warnings; warnings.simplefilter("ignore", tw.TorchwatchWarning)
            >>> model = torch.nn.Linear(4, 2)
            >>> canary = tw.Canary.record(model, torch.randn(3, 4))
            >>> with tw.attach(model) as watch:
            ...     checks = watch.verify_canary_every(300, canary)
            ...     print(checks.check_now().ok, watch.calls)
            ...     with torch.no_grad():
            ...         model.bias[0] += 1.0
            ...     print(checks.check_now().ok, watch.healthy, watch.alerts[-1].rule)
            True 0
            False False canary
        """
        seconds = _validate.number("verify_canary_every()", "seconds", seconds, above=0.0)
        wait = _validate.number("verify_canary_every()", "wait", wait, low=0.0)
        model = self._model()
        if not self.attached or model is None:
            raise ConfigError("verify_canary_every() needs an attached watch whose model is alive")
        if isinstance(canary, (str, os.PathLike)):
            canary = Canary.load(canary)
        _validate.instance("verify_canary_every()", "canary", canary, Canary, "a tw.Canary or a canary file's path")
        replica = functools.partial(replica_name, self.config.replica)
        monitor = CanaryMonitor(model, seconds, canary, wait=wait, exclusive=self._engine.exclusive, replica=replica)
        self._engine.add_monitor(monitor, replace=CanaryMonitor)
        return monitor

    def capture(self, trace_id: str) -> bool:
        """Capture the call labelled ``trace_id`` (``watch.context(trace_id=...)``) as an incident bundle.

        A call among the ``Capture(keep=...)`` recent ones is written now; otherwise the next call
        with that label is captured when it ends.

        Returns:
            True if a kept call was queued for writing, False if the next such call will be.

        Raises:
            ConfigError: the watch was attached without ``capture=tw.Capture(...)``.

        Example:
            >>> import tempfile, torch, torchwatch as tw
            >>> model = torch.nn.Linear(2, 2)
            >>> capture = tw.Capture(tempfile.mkdtemp(), inputs=True)
            >>> with tw.attach(model, capture=capture) as watch:
            ...     watch.capture("req-7")
            ...     with watch.context(trace_id="req-7"):
            ...         _ = model(torch.ones(1, 2))
            False
            >>> tw.Incident.load(tw.Incident.list(capture.directory)[0]).trace_id
            'req-7'
        """
        if self._capture is None:
            raise ConfigError("watch.capture() needs attach(model, capture=tw.Capture(directory, inputs=True))")
        return self._capture.capture(str(trace_id))

    def publish(self, alert: Alert, *, trip: bool = False) -> None:
        """Raise an alert of your own through this watch (a custom monitor, a serving check).

        It is kept in :attr:`alerts`, sent with the next record (sinks, incident log), warned
        about once per rule and module, and with ``trip`` makes the watch unhealthy until
        :meth:`mark_healthy`. Safe from any thread.

        Example:
            >>> import time, torch, torchwatch as tw
            >>> import warnings; warnings.simplefilter("ignore", tw.TorchwatchWarning)
            >>> with tw.attach(torch.nn.Linear(2, 2)) as watch:
            ...     watch.publish(tw.Alert("queue", "", "depth", 900.0, 100.0, -1, time.time(), None, None,
            ...                            "request queue is 9x deeper than usual"), trip=True)
            ...     watch.healthy, watch.alerts[-1].rule
            (False, 'queue')
        """
        if not isinstance(alert, Alert):
            raise ConfigError(f"publish() takes a tw.Alert, got {type(alert).__name__}")
        self._bus.publish(alert, trip=trip)

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def __repr__(self) -> str:
        model = self._model()
        name = type(model).__name__ if model is not None else "<collected>"
        state = "attached" if self.attached else "detached"
        return f"Watch({name}, {len(self.modules)} modules, every={self.every}, calls={self.calls}, {state})"


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
    monitors: Iterable[Monitor] = (),
    capture: Any = None,
    replica: str | None = None,
) -> Watch:
    """Start measuring the outputs of ``model``'s modules on every ``every``-th call.

    Args:
        model: the model; its own ``model(...)`` calls are the *root calls* that are counted,
            sampled and labelled. Attach after moving it to its device and before
            ``torch.compile`` (hooks added after compiling are ignored by compiled code).
        modules: which modules: ``None`` (every leaf module except Dropout/Identity/padding; a
            torch.nn layer such as Conv2d or Linear that holds helper modules, a padding layer or
            a weight parametrization, counts as one leaf), a regex matched against the whole
            fully-qualified name, a list of names, a tuple of module types, or a callable
            ``(fqn, module) -> bool``.
        every: measure one root call in ``every`` (the first is always measured).
        sampling: ``"python"`` (default): unsampled eager calls run no per-module hook at all.
            ``"device"``: the hooks stay installed and a counter on the device decides which calls
            count, so sampling also works inside ``torch.compile`` and captured CUDA graphs
            (where Python does not run per call). Same as ``"python"`` when ``every == 1``.
        sinks: where flushes go: :class:`TensorBoardSink`, :class:`JsonlSink`, :class:`MemorySink`.
        flush_every: eager root calls between flushes (also on :meth:`Watch.flush`,
            :meth:`Watch.snapshot` reads, detach and exit). A flush is one interval of the
            baseline rules, which learn each baseline over 30 intervals first: with the defaults
            no baseline alert is possible before 3,000 calls (NaN/Inf, cast overflow and the
            fingerprint alert from the first call).
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
        outputs: output-quality monitoring of a classifier/LM head (default off): ``"auto"`` or
            True (a tensor output as is, a Hugging Face output's ``logits``, a tuple's first
            tensor), a key or attribute name, an index, a callable ``output -> logits``, or a
            :class:`~torchwatch.OutputMonitor`. Confidence,
            margin, entropy, predicted classes, abstentions; accuracy and ECE with
            :meth:`Watch.record_labels`. Eager calls only.
        timing: also time each watched module (pre- and post-hooks: wall clock on CPU, CUDA events
            on GPU; costs about 2 us per module per sampled call on CPU). ``snapshot().timing``.
        monitors: monitors of your own (:class:`torchwatch.monitors.Monitor` subclasses), each
            with a distinct ``name``; their values are in ``snapshot().extra[name]`` and
            ``record.extra[name]``.
        capture: a :class:`~torchwatch.Capture`: write an incident bundle (statistics of the call,
            and its inputs and outputs if asked) for the call behind a tripping alert or a named
            rule, for ``torchwatch replay`` (docs/incidents.md). Off by default.

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
        monitors=monitors, capture=capture, replica=replica,
    )  # fmt: skip


@atexit.register
def _detach_all() -> None:
    """Flush and close every live watch when the interpreter exits."""
    for watch in registry.live():
        try:
            watch.detach(timeout=10.0)
        except Exception:  # noqa: BLE001, S110 - nothing left to report to at exit
            pass
