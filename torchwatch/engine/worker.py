"""The watch's background thread: finishes flushes and writes sinks, off the serving thread.

A flush on the serving thread only swaps windows and starts device copies; the job it queues
here waits for those copies, folds the window into the totals, and returns a :class:`Record`
that this thread hands to the sinks.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence

from ..records import Record
from ..sinks.base import Sink

_STOP = object()


class Worker:
    """Runs jobs in order on one daemon thread, started on first use.

    A job is called with one argument, how many jobs are waiting behind it, and returns a
    :class:`Record` (written to every active sink) or ``None``. A job that sees many waiting
    may hold its record back and fold it into the next job's: when the sinks are slower than
    the flushes, records are merged, never dropped. A sink whose ``write``/``flush``/``close``
    raises is disabled and reported through ``on_sink_failure`` (once per sink); a job that
    raises is reported through ``on_job_failure``.
    """

    def __init__(
        self,
        sinks: Sequence[Sink],
        on_sink_failure: Callable[[Sink, BaseException], None],
        on_job_failure: Callable[[BaseException], None],
    ) -> None:
        self._active = list(sinks)
        self._on_sink_failure = on_sink_failure
        self._on_job_failure = on_job_failure
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._closed = False
        self._pending = 0  # jobs queued and not yet started
        self._pending_lock = threading.Lock()

    def submit(self, job: Callable[[int], Record | None] | None, *, wait: bool = False, timeout: float = 30.0) -> bool:
        """Queue a job; with ``wait``, block until it and everything before it ran and the sinks
        were flushed. ``None`` queues nothing but still waits. Returns False if closed or timed out."""
        if self._closed:
            return False
        if job is None and self._thread is None:
            return True  # nothing ever queued: nothing to wait for
        self._ensure_thread()
        done = threading.Event() if wait else None
        if job is not None:
            with self._pending_lock:
                self._pending += 1
        self._queue.put((job, done))
        return done.wait(timeout) if done is not None else True

    @property
    def pending(self) -> int:
        """Jobs queued that the thread has not started yet."""
        return self._pending

    def close(self, timeout: float = 30.0) -> int:
        """Run what is queued, close every sink and stop the thread.

        Waits up to ``timeout`` seconds for that; with 0 it only asks the thread to finish.
        Returns how many jobs were unfinished when the wait ended, the one in progress included
        (0: everything was written).
        """
        if self._closed:
            return 0
        self._closed = True
        if self._thread is None:
            self._close_sinks()
            return 0
        self._queue.put(_STOP)
        if timeout:
            self._thread.join(timeout)
            return self._pending + 1 if self._thread.is_alive() else 0
        return 0

    def _ensure_thread(self) -> None:
        if self._thread is None:
            with self._start_lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="torchwatch-worker", daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                self._close_sinks()
                return
            job, done = item  # type: ignore[misc]
            del item  # hold nothing between jobs: a finished job must not keep its watch alive
            if job is not None:
                with self._pending_lock:
                    self._pending -= 1
                self._run_job(job)
                del job
            if done is not None:
                self._call_all("flush")
                done.set()
            del done

    def _run_job(self, job: Callable[[int], Record | None]) -> None:
        try:
            record = job(self._pending)
        except Exception as exc:  # noqa: BLE001 - reported; the thread must keep serving later jobs
            self._on_job_failure(exc)
            return
        if record is not None:
            self._call_all("write", record)

    def _call_all(self, method: str, *args: object) -> None:
        for sink in list(self._active):
            try:
                getattr(sink, method)(*args)
            except Exception as exc:  # noqa: BLE001 - any sink failure disables that sink only
                self._active.remove(sink)
                self._on_sink_failure(sink, exc)
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
