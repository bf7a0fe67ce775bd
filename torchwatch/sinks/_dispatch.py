"""The writer thread: sinks are called here, never on the serving thread."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence

from .base import Record, Sink

MAX_PENDING = 64  # records waiting for slow sinks; beyond this new ones are dropped and counted

_STOP = object()


class Dispatcher:
    """Hands flush records to sinks on one daemon thread, started on first use.

    A sink whose ``write``/``flush`` raises is disabled and reported through ``on_failure``
    (once per sink); the others keep receiving records.
    """

    def __init__(self, sinks: Sequence[Sink], on_failure: Callable[[Sink, BaseException], None]) -> None:
        self._active = list(sinks)
        self._on_failure = on_failure
        self._queue: queue.Queue[object] = queue.Queue(MAX_PENDING)
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._closed = False
        self.dropped = 0

    def submit(self, record: Record | None, *, wait: bool = False, timeout: float = 30.0) -> bool:
        """Queue a record; with ``wait``, also block until sinks wrote and flushed everything
        queued so far. ``None`` sends nothing (with ``wait``: just the wait).

        Returns False when the record was dropped (queue full, closed, or timed out waiting).
        """
        if self._closed or not self._active:
            return False
        self._ensure_thread()
        done = threading.Event() if wait else None
        try:
            self._queue.put((record, done), block=wait, timeout=timeout if wait else None)
        except queue.Full:
            self.dropped += 1
            return False
        return done.wait(timeout) if done is not None else True

    def close(self, timeout: float = 30.0) -> None:
        """Deliver what is queued, close every sink and stop the thread.

        Waits up to ``timeout`` seconds for that; with 0 it only asks the thread to finish.
        """
        if self._closed:
            return
        self._closed = True
        if self._thread is None:
            self._close_sinks()
            return
        try:
            self._queue.put(_STOP, timeout=timeout or None)
        except queue.Full:
            return
        if timeout:
            self._thread.join(timeout)

    def _ensure_thread(self) -> None:
        if self._thread is None:
            with self._start_lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="torchwatch-sinks", daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                self._close_sinks()
                return
            record, done = item  # type: ignore[misc]
            if record is not None:
                self._call_all("write", record)
            if done is not None:
                self._call_all("flush")
                done.set()

    def _call_all(self, method: str, *args: object) -> None:
        for sink in list(self._active):
            try:
                getattr(sink, method)(*args)
            except Exception as exc:  # noqa: BLE001 - any sink failure disables that sink only
                self._active.remove(sink)
                self._on_failure(sink, exc)
                _close_quietly(sink)

    def _close_sinks(self) -> None:
        self._call_all("flush")
        self._call_all("close")
        self._active = []


def _close_quietly(sink: Sink) -> None:
    try:
        sink.close()
    except Exception:  # noqa: BLE001, S110 - the sink already failed and was reported
        pass
