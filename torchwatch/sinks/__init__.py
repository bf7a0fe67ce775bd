"""Where flushed statistics go. Sinks run on a background thread; a failing sink is disabled."""

from __future__ import annotations

from .base import Record, Sink
from .jsonl import JsonlSink
from .memory import MemorySink
from .tensorboard import TensorBoardSink

__all__ = ["JsonlSink", "MemorySink", "Record", "Sink", "TensorBoardSink"]
