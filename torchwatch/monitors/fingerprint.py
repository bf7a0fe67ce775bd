"""Re-checking the weights in memory while a model serves, off the serving thread
(:meth:`torchwatch.Watch.verify_fingerprint_every`)."""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable

import torch

from ..alerts import Alert
from ..integrity.fingerprinting import Fingerprint, FingerprintChange, fingerprint
from .base import Monitor

__all__ = ["FingerprintMonitor"]


def fingerprint_alert(changes: list[FingerprintChange], baseline: Fingerprint) -> Alert:
    """The ``"fingerprint"`` alert: which tensors changed since the baseline, and where."""
    first = changes[0]
    module = first.tensor.rpartition(".")[0]
    tensors = sorted({c.tensor for c in changes})
    more = f" and {len(tensors) - 1} other tensor(s)" if len(tensors) > 1 else ""
    message = (
        f"weights changed in memory since the fingerprint baseline {baseline.digest[:12]}…: {first}{more}; "
        "the model may be serving corrupted weights — reload it and run tw.selftest"
    )
    return Alert(
        rule="fingerprint", module=module, stat="weights", value=float(len(changes)), expected=0.0, call=-1,
        time=time.time(), cohort=None, trace_id=None, message=message,
    )  # fmt: skip


class FingerprintMonitor(Monitor):
    """A daemon thread that fingerprints a model every ``period`` seconds and compares it to a baseline.

    Made by :meth:`torchwatch.Watch.verify_fingerprint_every`. On CUDA the fingerprint runs on its
    own stream and waits only for itself; on CPU it competes with inference for cores while it runs
    (about 1.3 GB/s on two cores: a BERT-base check takes ~0.3 s of CPU).

    A monitor with no hooks and no value: a change is a tripping ``"fingerprint"`` alert passed
    to ``on_change`` (the watch's alert bus); detaching the watch stops the thread.

    Attributes:
        baseline: the fingerprint compared against.
        checks: fingerprints taken so far; last: the latest one; changes: its differences (empty
            while the weights are intact); errors: checks that raised (the thread goes on).
    """

    name = "fingerprint"

    def __init__(
        self,
        model: torch.nn.Module,
        period: float,
        baseline: Fingerprint | None,
        on_change: Callable[[Alert], object],
    ) -> None:
        self._model = weakref.ref(model)
        self.period = period
        self.baseline = baseline if baseline is not None else fingerprint(model)
        self._on_change = on_change
        self.checks = 0
        self.errors = 0
        self.last: Fingerprint | None = None
        self.changes: list[FingerprintChange] = []
        self._alerted: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="torchwatch-fingerprint", daemon=True)
        self._thread.start()

    def check_now(self) -> list[FingerprintChange]:
        """Fingerprint now (on the calling thread), alert on a new change, return the differences."""
        model = self._model()
        if model is None:
            self._stop.set()
            return []
        current = fingerprint(model, chunk_bytes=self.baseline.chunk_bytes)
        changes = self.baseline.diff(current)
        self.last, self.changes = current, changes
        self.checks += 1
        if changes and current.digest != self._alerted:  # one alert per distinct corruption
            self._alerted = current.digest
            self._on_change(fingerprint_alert(changes, self.baseline))
        return changes

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.check_now()
            except Exception:  # noqa: BLE001 - a failed check must not kill monitoring or serving
                self.errors += 1

    def close(self, timeout: float) -> None:
        self.stop(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the thread (a check in progress finishes first). Safe to call twice."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()
