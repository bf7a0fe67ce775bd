"""Re-running the canary while a model serves, between requests
(:meth:`torchwatch.Watch.verify_canary_every`).

A daemon thread waits ``period`` seconds, then takes the model to itself for one canary forward
(``Engine.exclusive``: calls in flight finish first, new ones wait at their start; the canary's
own forward is not counted or measured by the watch), compares the outputs as the startup
self-test does, and fingerprints the weights (outside the exclusive part: it only reads them).
A failure is a tripping ``"canary"`` alert (one per distinct set of output digests). Each check's
output digests and the weights' fingerprint digest are this monitor's value in the next record,
and go to Prometheus as ``torchwatch_canary_info{replica, output, digest, weights}``: replicas
that should agree bitwise show the same digests, and a query finds the one that does not.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import values
from .._schema import Fields
from ..alerts import Alert
from ..integrity.canary import Canary, CanaryReport
from ..integrity.fingerprinting import fingerprint
from .base import Binding, Monitor

__all__ = ["CanaryMonitor", "CanaryStatus"]

INFO = "torchwatch_canary_info"
CHECKS = "torchwatch_canary_checks"


@dataclass(frozen=True)
class CanaryStatus:
    """The canary re-checks of an interval (``record.extra["canary"]``).

    Attributes:
        checks, failed: checks run and failed in the interval.
        ok: whether the latest check passed; reason: why not ("" when it passed).
        digests: the latest check's output digests by output name; weights: the weights'
            fingerprint digest at that check.
        time: Unix time of the latest check; seconds: how long the model was held for it.
        replica: the replica's name.
    """

    checks: int
    failed: int
    ok: bool
    reason: str
    digests: dict[str, str] = field(default_factory=dict)
    weights: str = ""
    time: float = 0.0
    seconds: float = 0.0
    replica: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"checks": self.checks, "failed": self.failed, "ok": self.ok, "reason": self.reason,
                "digests": self.digests, "weights": self.weights, "time": self.time, "seconds": self.seconds,
                "replica": self.replica}  # fmt: skip

    @classmethod
    def from_dict(cls, doc: object, where: str = "canary") -> CanaryStatus:
        f = Fields(doc, where)
        digests = f.obj("digests", optional=True)
        return cls(
            checks=f.count("checks"), failed=f.count("failed"), ok=bool(f.get("ok")), reason=f.str("reason", ""),
            digests={k: digests.str(k) for k in digests.doc} if digests is not None else {},
            weights=f.str("weights", ""), time=f.float("time", 0.0), seconds=f.float("seconds", 0.0),
            replica=f.str("replica", ""),
        )  # fmt: skip

    def merge(self, later: CanaryStatus) -> CanaryStatus:
        return CanaryStatus(self.checks + later.checks, self.failed + later.failed, later.ok, later.reason,
                            later.digests, later.weights, later.time, later.seconds, later.replica)  # fmt: skip


def canary_alert(report: CanaryReport) -> Alert:
    failed = report.failed
    first = failed[0] if failed else None
    message = (f"the canary re-check failed while serving ({report.mode}): "
               + (f"output {first.name!r}: {first.reason}" if first else "outputs missing")
               + (f" and {len(failed) - 1} more output(s)" if len(failed) > 1 else "")
               + "; the model computes differently than when validated: check weights, settings, device")  # fmt: skip
    return Alert(rule="canary", module="", stat=first.name if first else "outputs", value=float(len(failed)),
                 expected=0.0, call=-1, time=time.time(), cohort=None, trace_id=None, message=message)  # fmt: skip


class CanaryMonitor(Monitor):
    """A daemon thread that re-runs a canary every ``period`` seconds between requests.

    Made by :meth:`torchwatch.Watch.verify_canary_every`. Attributes: ``canary``, ``period``,
    ``checks``, ``failures``, ``last`` (the latest :class:`~torchwatch.CanaryReport`), ``errors``
    (checks that could not run: the model never idle within ``wait``, or the forward raised).
    """

    name = "canary"

    def __init__(
        self, model: torch.nn.Module, period: float, canary: Canary, *, wait: float,
        exclusive: Callable[[float], AbstractContextManager[None]], replica: Callable[[], str],
    ) -> None:  # fmt: skip
        self._model = weakref.ref(model)
        self.period = period
        self.canary = canary
        self.wait = wait
        self._exclusive = exclusive
        self._replica = replica
        self.checks = self.failures = self.errors = 0
        self.last: CanaryReport | None = None
        self._status: CanaryStatus | None = None  # not yet in a record
        self._alerted: tuple[tuple[str, str], ...] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="torchwatch-canary", daemon=True)

    def bind(self, binding: Binding) -> None:
        self._bus = binding.bus
        self._thread.start()

    def check_now(self) -> CanaryReport | None:
        """Run one check now on the calling thread (it waits for calls in flight, at most ``wait``
        seconds); None if the model is gone."""
        model = self._model()
        if model is None:
            self._stop.set()
            return None
        with self._exclusive(self.wait):
            start = time.perf_counter()
            outputs = self.canary.run(model)
            held = time.perf_counter() - start
        report = self.canary.compare(outputs, model)
        report.seconds = held
        weights = fingerprint(model).digest
        digests = tuple(sorted(report.digests.items()))
        status = CanaryStatus(1, 0 if report.ok else 1, report.ok, "" if report.ok else report.summary(),
                              dict(report.digests), weights, time.time(), held, self._replica())  # fmt: skip
        with self._lock:
            self.checks += 1
            self.failures += not report.ok
            self.last = report
            self._status = status if self._status is None else self._status.merge(status)
        if not report.ok and digests != self._alerted:  # one alert per distinct wrong answer
            self._alerted = digests
            self._bus.publish(canary_alert(report), trip=True)
        return report

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.check_now()
            except Exception as exc:  # noqa: BLE001 - a failed check must not kill monitoring or serving
                self.errors += 1
                self._bus.count("canary checks not run")
                self._bus.warn_once("canary-check", f"a canary re-check could not run: {exc!r}; counted in "
                                    'watch.errors["canary checks not run"]')  # fmt: skip

    def take(self, *, keep: bool) -> CanaryStatus | None:
        with self._lock:
            status = self._status
            if not keep:
                self._status = None
        return status

    def merge(self, earlier: CanaryStatus, later: CanaryStatus) -> CanaryStatus:
        return earlier.merge(later)

    def active(self, value: CanaryStatus) -> bool:
        return value.checks > 0

    def close(self, timeout: float) -> None:
        self.stop(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the thread (a check in progress finishes first). Safe to call twice."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()


def _export(value: CanaryStatus, record: Any) -> Iterator[values.Series]:
    info_help = ("The latest canary re-check's digest of each output (value 1; replicas that agree bitwise show "
                 "the same digest), with the weights' fingerprint digest.")  # fmt: skip
    for output, digest in value.digests.items():
        labels = (("replica", value.replica), ("output", output), ("digest", digest), ("weights", value.weights))
        yield values.Series(INFO, "gauge", info_help, 1.0, labels)
    passed = value.checks - value.failed
    if passed:
        yield values.Series(CHECKS, "counter", "Canary re-checks while serving, by result.", passed,
                            (("result", "pass"),))  # fmt: skip
    if value.failed:
        yield values.Series(CHECKS, "counter", "Canary re-checks while serving, by result.", value.failed,
                            (("result", "fail"),))  # fmt: skip


values.register("canary", decode=CanaryStatus.from_dict, export=_export)
