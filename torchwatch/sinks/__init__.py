"""Where flushed statistics go. Sinks run on a background thread; a failing sink is disabled."""

from __future__ import annotations

from ..records import Record
from .base import Sink
from .incidents import IncidentLog
from .jsonl import JsonlSink
from .memory import MemorySink
from .prometheus import PrometheusSink
from .tensorboard import TensorBoardSink

__all__ = ["IncidentLog", "JsonlSink", "MemorySink", "PrometheusSink", "Record", "Sink", "TensorBoardSink"]
