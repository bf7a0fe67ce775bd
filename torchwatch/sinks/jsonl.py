"""One JSON object per flush, one per line."""

from __future__ import annotations

import json
import os
from typing import IO

from .base import Record, Sink

FORMAT = "torchwatch.jsonl/1"


class JsonlSink(Sink):
    """Appends each flush :class:`Record` as a line of JSON to ``path``.

    Each line: ``{"format": "torchwatch.jsonl/1", "step", "time", "calls", "sampled",
    "modules": {fqn: ModuleStats fields}, "alerts": [...], "nonfinite": {...}, "errors": {...}}``;
    NaN/Inf values are written as ``null``. The file is opened on the first write (parent
    directories are created) and appended to, so a restarted process continues the same log.

    Args:
        path: the ``.jsonl`` file.

    Example:
        >>> import json, tempfile, torch, torchwatch as tw
        >>> path = tempfile.mkdtemp() + "/stats.jsonl"
        >>> model = torch.nn.Linear(4, 2)
        >>> with tw.attach(model, sinks=[tw.JsonlSink(path)]):
        ...     _ = model(torch.randn(3, 4))
        >>> json.loads(open(path).readline())["modules"][""]["count"]
        6
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._file: IO[str] | None = None

    def write(self, record: Record) -> None:
        if self._file is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open across writes
        line = json.dumps({"format": FORMAT, **record.to_json()}, allow_nan=False, separators=(",", ":"))
        self._file.write(line + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __repr__(self) -> str:
        return f"JsonlSink({self.path!r})"
