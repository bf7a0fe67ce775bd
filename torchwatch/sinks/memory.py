"""Keep flush records in memory (tests, notebooks, custom exporters)."""

from __future__ import annotations

import collections
import threading

from .. import _validate
from ..records import Record
from .base import Sink


class MemorySink(Sink):
    """Keeps the last ``maxlen`` flush :class:`Record` objects in :attr:`records`.

    Args:
        maxlen: how many records to keep (oldest dropped first, >= 1); ``None`` keeps all.

    Raises:
        ConfigError: ``maxlen`` is not a positive integer or None.

    Example:
        >>> import torch, torchwatch as tw
        >>> sink = tw.MemorySink()
        >>> model = torch.nn.Linear(4, 2)
        >>> with tw.attach(model, sinks=[sink]):
        ...     _ = model(torch.randn(3, 4))
        >>> sink.records[-1].stats[""].count  # "" is the watched model itself
        6
    """

    def __init__(self, maxlen: int | None = 1000) -> None:
        maxlen = _validate.optional(_validate.integer, "MemorySink", "maxlen", maxlen, low=1, high=2**62)
        self._records: collections.deque[Record] = collections.deque(maxlen=maxlen)
        self._lock = threading.Lock()

    def write(self, record: Record) -> None:
        with self._lock:
            self._records.append(record)

    @property
    def records(self) -> list[Record]:
        """The kept records, oldest first (a copy)."""
        with self._lock:
            return list(self._records)
