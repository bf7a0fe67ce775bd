"""A candidate model version beside the primary, with a verdict that may be read at any time.

:func:`rollout` puts a candidate beside the serving model in one of two modes:

* ``"canary"`` — the rollout is what the server calls: each request goes to the candidate with
  probability ``share``, else to the primary, and the answer of the version that served it is
  returned. A candidate that raises is answered by the primary (counted as the candidate's
  error). Each version's rows are paired with the other's most recent rows (paired in time, never
  by value), and each version's latencies are kept apart.
* ``"shadow"`` — the primary serves every request (the server calls ``rollout(...)``, which calls
  the primary); a ``share`` of the calls also runs on the candidate off the serving path
  (:func:`torchwatch.shadow`), so every candidate row is paired with the primary's row for the
  same input.

Metrics (each oriented so that larger is worse for the candidate; defaults in
:data:`DEFAULT_TOLERANCES`):

========================  ==========================================================  ============
metric                    per sample (candidate vs primary)                           tolerance
========================  ==========================================================  ============
``agreement``             1 when the two top-1 classes differ (shadow only)            0.01
``confidence``            primary's top-1 probability minus the candidate's           0.05
``entropy``               candidate's entropy minus the primary's, over ``ln K``      0.05
``class_mix``             each class's share of predictions, either way               0.05
``abstention``            rows below ``abstain_below``, candidate minus primary        0.02
``errors``                calls that raised or returned non-finite, cand. - prim.     0.01
``accuracy``              primary correct minus candidate correct (labels)            0.01
``calibration``           top-label Brier score ``(conf - correct)^2``, c. - p.        0.01
``latency_p50/_p99``      quantile ratio candidate / primary - 1 (canary only)        0.10
========================  ==========================================================  ============

The verdict is ``"rollback"`` as soon as one metric shows the candidate worse than its tolerance
(level ``alpha_rollback``, split evenly over the metrics), ``"promote"`` once every metric has
shown it within tolerance (each at ``alpha_promote``; a false promotion needs every bad metric
to pass, so the level holds without a split), else ``"continue"``. Both error rates hold however
often the verdict is read (:mod:`torchwatch.rollout.sequential`). The first final verdict is
kept, handed once to ``on_verdict``, and after a rollback the canary sends nothing more to the
candidate.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import itertools
import math
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import _validate
from ..engine import AlertBus, watch_of
from ..errors import ConfigError
from ..monitors.outputs import OutputError, OutputMonitor
from ..shadow import shadow as start_shadow
from .evidence import DEFAULT_TOLERANCES, Verdict
from .ledger import LABELS, Ledger
from .monitor import RolloutMonitor

__all__ = ["DEFAULT_TOLERANCES", "Rollout", "Verdict", "rollout"]

MODES = ("canary", "shadow")


class Rollout:
    """A candidate beside a primary with an always-valid verdict; see :func:`rollout`.

    Attributes:
        mode, share: ``"canary"`` or ``"shadow"`` and the share of calls the candidate gets
            (settable: :meth:`set_share`). calls: root calls by version; errors: candidate calls
            that raised; dropped: calls whose evidence was dropped (queue full); labels_unmatched:
            labels for trace ids never seen (or seen too long ago). metric_names, tolerances: what
            the verdict decides on.
    """

    def __init__(self, primary: nn.Module, candidate: nn.Module, *, mode: str, share: float, metrics: tuple[str, ...],
                 tolerances: Mapping[str, float], alpha_rollback: float, alpha_promote: float,
                 select: OutputMonitor, on_verdict: Callable[[Verdict], object] | None, name: str, seed: int | None,
                 max_pending: int, max_traces: int, clock: Callable[[], float]) -> None:  # fmt: skip
        self.primary, self.candidate = primary, candidate
        self._clock = clock
        self.mode, self.share, self.name = mode, share, name
        self.metric_names = metrics
        self.alpha_rollback, self.alpha_promote = alpha_rollback, alpha_promote
        self._select = select
        self._on_verdict = on_verdict
        self._rng = random.Random(seed)
        self._lock = threading.Lock()  # the counters, from serving threads
        # the ledger: taken by the evidence thread for a batch, by verdict() from any thread
        self._evidence = threading.RLock()
        self.calls = {"primary": 0, "candidate": 0}
        self.errors = self.dropped = self.callback_errors = 0
        self._warnings = AlertBus("warn")
        self._ledger = Ledger(name, mode, metrics, tolerances, alpha_rollback=alpha_rollback,
                              alpha_promote=alpha_promote, abstain_below=select.abstain_below, max_traces=max_traces,
                              warn=self._warnings.warn_once)  # fmt: skip
        self.tolerances = self._ledger.tolerances
        self._final: Verdict | None = None
        self._tls = threading.local()
        # the serving thread appends (no lock, no wake-up); the evidence thread takes what has
        # gathered every few milliseconds: a wake-up per call would hand the GIL back and forth
        self._pending: collections.deque[Any] = collections.deque()
        self._max_pending = max_pending
        self._queued = itertools.count(1)  # next() is atomic: calls queued so far, from any thread
        self._last_queued = 0
        self._taken = 0  # items the evidence thread has finished with
        self._stop = threading.Event()
        self._closed = False
        self._shadow = None
        self._thread = threading.Thread(target=_work, args=(weakref.ref(self), self._pending, self._stop), daemon=True,
                                        name="torchwatch-rollout")  # fmt: skip
        self._thread.start()
        weakref.finalize(self, self._stop.set)
        _open.add(self)
        if mode == "shadow":
            # the shadow's own fixed limits would alert on a look the sequential test does not allow:
            # off (min_calls past reach); the verdict decides
            self._shadow = start_shadow(primary, candidate, sample=share, seed=seed, max_pending=max_pending,
                                        on_compare=self._on_compare, tag=self._current_trace,
                                        min_calls=2**62)  # fmt: skip
        self._monitor = None
        watch = watch_of(primary)
        if watch is not None:
            self._monitor = RolloutMonitor(self)
            watch.engine.add_monitor(self._monitor, replace=RolloutMonitor)  # the newest rollout of this model

    # ---- serving thread ----------------------------------------------------------------------

    def __call__(self, *args: Any, trace_id: str | None = None, **kwargs: Any) -> Any:
        """Serve one request: the answer of the version that served it. ``trace_id`` (taken by the
        rollout, not passed to the model) names the request for :meth:`record_labels`."""
        if self.mode == "shadow":
            self._tls.trace = trace_id
            try:
                with self._lock:
                    self.calls["primary"] += 1
                return self.primary(*args, **kwargs)
            finally:
                self._tls.trace = None
        use_candidate = self._final is None or self._final.decision != "rollback"
        use_candidate = use_candidate and self._rng.random() < self.share
        version = "candidate" if use_candidate else "primary"
        model = self.candidate if use_candidate else self.primary
        start = self._clock()
        try:
            output = model(*args, **kwargs)
        except Exception as exc:
            if not use_candidate:
                raise  # the primary's own failure is the server's, as without a rollout
            with self._lock:
                self.errors += 1
            message = (f"rollout {self.name!r}: the candidate raised {exc!r}; the primary answered; counted in "
                       "rollout.errors and the errors metric")  # fmt: skip
            self._warnings.warn_once("candidate-raised", message)
            self._put(("error", "candidate", trace_id))
            return self.primary(*args, **kwargs)
        seconds = self._clock() - start
        with self._lock:
            self.calls[version] += 1
        try:
            logits = self._select.logits(output).detach().clone()
        except OutputError as exc:  # the answer goes back whatever the evidence does
            self._warnings.warn_once("select", f"rollout {self.name!r}: no logits in the output ({exc}); "
                                     "the call counts for latency only")  # fmt: skip
            logits = None
        event = None
        if logits is not None and logits.is_cuda:
            event = torch.cuda.Event()
            event.record()
        self._put(("call", version, trace_id, logits, seconds, event))
        return output

    def _current_trace(self) -> str | None:
        return getattr(self._tls, "trace", None)

    def _put(self, item: tuple[Any, ...]) -> None:
        if len(self._pending) < self._max_pending:
            self._pending.append(item)
            self._last_queued = next(self._queued)
        else:
            with self._lock:
                self.dropped += 1
            self._warnings.warn_once("dropped", f"rollout {self.name!r}: evidence queue full; calls dropped from "
                                     "the evidence (not from serving) are counted in rollout.dropped")  # fmt: skip

    def _on_compare(self, expected: Any, got: Any, tag: Any, error: BaseException | None) -> None:
        """Shadow thread: one sampled call compared (or the candidate raised)."""
        with self._lock:
            self.calls["candidate"] += 1
            self.errors += error is not None
        self._put(("pair", tag, expected, got, error))

    def record_labels(self, trace_id: str, labels: Any) -> None:
        """The true classes of a served request's rows, once known (one per row, ints)."""
        if not set(LABELS) & set(self.metric_names):
            raise ConfigError(f"rollout {self.name!r} keeps no label metrics: rollout(..., labels=True)")
        if not isinstance(trace_id, str):
            raise ConfigError(f"record_labels: trace_id must be a str, got {type(trace_id).__name__}")
        if isinstance(labels, torch.Tensor):  # read to the host on the evidence thread, not here
            if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
                raise ConfigError(f"record_labels: labels must be integer classes, got {labels.dtype}")
            labels = labels.detach().clone()  # the caller may reuse its buffer
        else:
            labels = np.asarray(labels)
            if labels.size and not np.issubdtype(labels.dtype, np.integer):
                raise ConfigError(f"record_labels: labels must be integer classes, got {labels.dtype}")
        self._put(("labels", trace_id, labels))

    # ---- evidence thread ---------------------------------------------------------------------

    def _handle(self, item: tuple[Any, ...]) -> None:
        kind, ledger = item[0], self._ledger
        if kind == "error":
            ledger.call_error(item[1])
        elif kind == "pair":
            _, trace, expected, got, error = item
            try:
                prim = self._select.logits(expected)
            except OutputError:  # warned: without the primary's logits nothing compares
                self._warnings.warn_once("select", f"rollout {self.name!r}: no logits in the primary's output")
                return
            cand = None
            if error is None:
                try:
                    cand = self._select.logits(got)
                except OutputError:  # a candidate without the output: the candidate's error
                    cand = None
            ledger.shadow_pair(trace, prim, cand)
        elif kind == "labels":
            ledger.labels(item[1], item[2])

    def _handle_calls(self, items: list[tuple[Any, ...]]) -> None:
        for item in items:
            if item[5] is not None:  # the logits' copy was queued on the serving thread's stream
                item[5].synchronize()
        self._ledger.canary_calls(
            [(version, trace, logits, seconds) for _, version, trace, logits, seconds, _ in items]
        )

    def _decide(self) -> None:
        if self._final is not None or not self._ledger.final():
            return
        verdict = self.verdict()
        if verdict.decision != "continue":
            self._final = verdict
            if verdict.decision == "rollback" and self._shadow is not None:
                self._shadow.sample = 0.0  # no more calls sampled for the candidate
            if self._on_verdict is not None:
                try:
                    self._on_verdict(verdict)
                except Exception as exc:  # noqa: BLE001 - the evidence thread must go on
                    self.callback_errors += 1
                    self._warnings.warn_once("callback", f"rollout {self.name!r}: on_verdict raised {exc!r}")

    # ---- public ------------------------------------------------------------------------------

    def verdict(self) -> Verdict:
        """Where the rollout stands: ``promote``, ``continue`` or ``rollback`` with the evidence.

        A final verdict, once reached, is returned from then on. Valid whenever it is read.
        """
        if self._final is not None:
            return self._final
        with self._lock:
            calls, dropped, errors = dict(self.calls), self.dropped, self.errors
        with self._evidence:
            return self._ledger.verdict(calls, dropped, errors)

    @property
    def labels_unmatched(self) -> int:
        """Labels for trace ids never seen (or seen too long ago), or of the wrong length."""
        return self._ledger.labels_unmatched

    def set_share(self, share: float) -> None:
        """Change the candidate's share of calls (a gradual rollout raises it step by step)."""
        _check_share(share)
        self.share = float(share)
        if self._shadow is not None:
            self._shadow.sample = float(share)

    def wait(self, timeout: float = 60.0) -> bool:
        """Wait until the evidence of every call so far is in; False on timeout."""
        deadline = time.monotonic() + timeout
        if self._shadow is not None and not self._closed and not self._shadow.wait(timeout):
            return False
        return self._drain(deadline)

    def _drain(self, deadline: float) -> bool:
        target = self._last_queued
        while self._taken < target or self._pending:
            if time.monotonic() > deadline or not self._thread.is_alive():
                return False
            time.sleep(0.002)
        return True

    def close(self, timeout: float = 60.0) -> Verdict:
        """Stop taking evidence (the candidate gets no more calls); returns the verdict."""
        if not self._closed:
            self._closed = True
            self.share = 0.0
            if self._shadow is not None:
                self._shadow.close(timeout)  # its queued comparisons are compared first
            self._drain(time.monotonic() + timeout)
            self._stop.set()
            self._thread.join(timeout)
        return self.verdict()

    def __enter__(self) -> Rollout:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_open: weakref.WeakSet[Rollout] = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    """Rollouts left open stop before the interpreter does: a daemon thread still inside torch or
    numpy while the interpreter shuts down can abort the process."""
    for r in list(_open):
        with contextlib.suppress(Exception):
            r.close(timeout=5.0)


BATCH = 1024  # calls whose evidence is applied together: one update per metric, one look at the verdict
TICK = 0.002  # seconds the evidence thread waits when nothing is pending


def _work(ref: weakref.ref[Rollout], pending: collections.deque[Any], stop: threading.Event) -> None:
    """The evidence thread: takes what has gathered (up to ``BATCH`` calls at once), holding the
    rollout only while it does; ends when stopped or when the rollout is gone."""
    while True:
        if not pending:
            if stop.wait(TICK):
                return
            continue
        batch = [pending.popleft() for _ in range(min(len(pending), BATCH))]
        owner = ref()
        if owner is None:
            return
        _take(owner, batch)
        owner._taken += len(batch)  # after the verdict is decided: wait() then sees it
        del owner, batch


def _take(owner: Rollout, batch: list[tuple[Any, ...]]) -> None:
    with owner._evidence:
        _take_locked(owner, batch)


def _take_locked(owner: Rollout, batch: list[tuple[Any, ...]]) -> None:
    # runs of served calls are taken together (one pass over their rows); the rest one by one, in order
    runs: list[list[tuple[Any, ...]]] = []
    for item in batch:
        if item[0] == "call" and runs and runs[-1][0][0] == "call":
            runs[-1].append(item)
        else:
            runs.append([item])
    for run in runs:
        try:
            if run[0][0] == "call":
                owner._handle_calls(run)
            else:
                owner._handle(run[0])
        except Exception as exc:  # noqa: BLE001 - one bad item must not stop the evidence
            owner.callback_errors += 1
            owner._warnings.warn_once("evidence", f"rollout {owner.name!r}: evidence not taken: {exc!r}")
    try:
        owner._decide()
    except Exception as exc:  # noqa: BLE001 - counted; the evidence goes on
        owner.callback_errors += 1
        owner._warnings.warn_once("evidence", f"rollout {owner.name!r}: verdict not taken: {exc!r}")


def _check_share(share: float) -> None:
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
        raise ConfigError(f"rollout share must be in [0, 1], got {share!r}")


def rollout(
    primary: nn.Module,
    candidate: nn.Module,
    *,
    mode: str = "canary",
    share: float = 0.05,
    labels: bool = False,
    metrics: Iterable[str] | None = None,
    tolerances: Mapping[str, float] | None = None,
    alpha_rollback: float = 0.01,
    alpha_promote: float = 0.05,
    outputs: str | int | Callable[[Any], Any] | None = "auto",
    abstain_below: float | None = None,
    on_verdict: Callable[[Verdict], object] | None = None,
    name: str = "candidate",
    seed: int | None = None,
    max_pending: int = 256,
    max_traces: int = 4096,
    clock: Callable[[], float] = time.perf_counter,
) -> Rollout:
    """Put ``candidate`` beside ``primary`` and decide, with error guarantees, whether to promote it.

    Args:
        primary, candidate: the serving version and the new one (classifiers: their outputs hold
            logits, chosen by ``outputs`` as :class:`~torchwatch.OutputMonitor` does).
        mode: ``"canary"`` (the candidate answers a ``share`` of the requests) or ``"shadow"``
            (the primary answers all; a ``share`` also runs on the candidate, off the serving path).
        share: the candidate's share of calls, in ``[0, 1]`` (:meth:`Rollout.set_share`).
        labels: keep ``accuracy`` and ``calibration``, fed by :meth:`Rollout.record_labels`.
        metrics: the metrics to decide on (default: every one the mode supports; the label
            metrics with ``labels=True``; ``abstention`` when ``abstain_below`` is given).
        tolerances: per metric, the worsening that matters (defaults in the module docstring).
        alpha_rollback, alpha_promote: the largest chance of rolling back a candidate that is
            within every tolerance, and of promoting one worse than a tolerance.
        on_verdict: called once, on the evidence thread, with the first final :class:`Verdict`.
        name: the rollout's name (Prometheus label ``rollout``). seed: seed of the routing.
        max_pending: calls whose evidence may wait; more are dropped (counted, never blocking).
        max_traces: requests remembered for labels.
        clock: seconds for the latency metrics, read before and after each call on the serving
            thread (on a GPU that is the time until the call returns, launches included, not the
            device's time: synchronise inside the model, or give a clock that does, to measure it).

    Returns:
        A :class:`Rollout`: call it to serve; :meth:`~Rollout.verdict` at any time.

    Raises:
        ConfigError: bad arguments (a metric the mode cannot measure, a tolerance out of range).

    Example:
        >>> import copy, torch, torchwatch as tw
        >>> primary = torch.nn.Linear(8, 4)
        >>> ro = tw.rollout(primary, copy.deepcopy(primary), share=0.5, seed=0, metrics=["confidence"])
        >>> for _ in range(200):
        ...     _ = ro(torch.randn(16, 8))
        >>> ro.close().decision
        'promote'
    """
    if not isinstance(primary, nn.Module) or not isinstance(candidate, nn.Module):
        raise ConfigError("rollout() needs two torch.nn.Module models")
    if primary is candidate:
        raise ConfigError("rollout() needs two different models: the candidate is the primary")
    _validate.one_of("rollout()", "mode", mode, MODES)
    _check_share(share)
    if mode == "shadow" and share == 0:
        raise ConfigError("rollout(mode='shadow') needs share > 0 (the share of calls also run on the candidate)")
    for arg, value in (("alpha_rollback", alpha_rollback), ("alpha_promote", alpha_promote)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 0.5:
            raise ConfigError(f"rollout() {arg} must be in (0, 0.5), got {value!r}")
    for arg, value in (("max_pending", max_pending), ("max_traces", max_traces)):
        _validate.integer("rollout()", arg, value)
    _validate.seed("rollout()", "seed", seed)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"rollout() name must be a non-empty str, got {name!r}")
    supported = ["confidence", "entropy", "class_mix", "errors"]
    supported += ["agreement"] if mode == "shadow" else ["latency_p50", "latency_p99"]
    supported += ["abstention"] if abstain_below is not None else []
    supported += list(LABELS) if labels else []
    if metrics is None:
        chosen = tuple(supported)
    else:
        chosen = tuple(dict.fromkeys(metrics))
        unknown = [m for m in chosen if m not in DEFAULT_TOLERANCES]
        if unknown:
            raise ConfigError(f"rollout(): unknown metric(s) {unknown}; known: {sorted(DEFAULT_TOLERANCES)}")
        cannot = [m for m in chosen if m not in supported]
        if cannot:
            raise ConfigError(f"rollout(): {mode} mode cannot measure {cannot} with these arguments (label metrics "
                              "need labels=True, abstention needs abstain_below, agreement is shadow-only, latency "
                              "canary-only)")  # fmt: skip
        if not chosen:
            raise ConfigError("rollout(): metrics is empty; name at least one")
    tolerances = dict(tolerances or {})
    for m, tol in tolerances.items():
        if m not in chosen:
            raise ConfigError(f"rollout(): a tolerance for {m!r}, which is not among the metrics {list(chosen)}")
        high = math.inf if m.startswith("latency") else 1.0
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < high:
            raise ConfigError(f"rollout(): tolerance for {m!r} must be in (0, {high}), got {tol!r}")
    select = OutputMonitor(select=outputs, abstain_below=abstain_below)
    return Rollout(primary, candidate, mode=mode, share=float(share), metrics=chosen, tolerances=tolerances,
                   alpha_rollback=float(alpha_rollback), alpha_promote=float(alpha_promote), select=select,
                   on_verdict=on_verdict, name=name, seed=seed, max_pending=max_pending,
                   max_traces=max_traces, clock=clock)  # fmt: skip
