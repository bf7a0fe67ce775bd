"""Where flushed statistics go. Sinks run on a background thread; a failing sink is disabled."""

from __future__ import annotations

from .base import Record, Sink
from .incidents import IncidentLog
from .jsonl import JsonlSink
from .memory import MemorySink
from .prometheus import PrometheusSink
from .tensorboard import TensorBoardSink

__all__ = ["IncidentLog", "JsonlSink", "MemorySink", "PrometheusSink", "Record", "Sink", "TensorBoardSink"]
