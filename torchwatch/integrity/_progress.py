"""A one-line progress display for long jobs, shown only on a terminal."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


class Progress:
    """Thread-safe byte counter that redraws ``label: 1.2/4.0 GB 30% 1.3 GB/s`` on stderr.

    Nothing is printed unless the stream is a terminal and the job is at least ``min_total``
    bytes, so scripts, logs and tests see no output.
    """

    def __init__(self, label: str, total: int, *, stream: TextIO | None = None, min_total: int = 1 << 30) -> None:
        self.label, self.total = label, max(int(total), 1)
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = bool(isatty and isatty()) and total >= min_total
        self.done = 0
        self._lock = threading.Lock()
        self._start = self._last = time.perf_counter()

    def update(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.perf_counter()
            if self.enabled and now - self._last >= 0.2:
                self._last = now
                self._draw(now)

    def close(self) -> None:
        if self.enabled:
            with self._lock:
                self._draw(time.perf_counter())
                self.stream.write("\n")
                self.stream.flush()

    def _draw(self, now: float) -> None:
        rate = self.done / max(now - self._start, 1e-9)
        self.stream.write(
            f"\r{self.label}: {self.done / 1e9:.1f}/{self.total / 1e9:.1f} GB "
            f"{100 * self.done / self.total:3.0f}% {rate / 1e9:.2f} GB/s"
        )
        self.stream.flush()
