"""One JSON object per flush, one per line."""

from __future__ import annotations

import json
import os

from .. import _validate
from .._files import open_log, replaced
from .base import Record, Sink, _warn_replaced

FORMAT = "torchwatch.jsonl/1"


class JsonlSink(Sink):
    """Appends each flush :class:`Record` as a line of JSON to ``path``.

    Each line: ``{"format": "torchwatch.jsonl/1", "step", "time", "calls", "sampled",
    "modules": {fqn: ModuleStats fields}, "alerts": [...], "nonfinite": {...}, "errors": {...}}``;
    NaN/Inf values are written as ``null``. The file is opened on the first write (parent
    directories are created) and appended to, so a restarted process continues the same log;
    a last line torn by a crash is cut off first. Each record is one ``write`` of a whole line.
    A file deleted or rotated away while the sink writes is started again at ``path`` (warned
    once), never written into unlinked.

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
        self.path = _validate.path("JsonlSink", "path", path)
        self._fd: int | None = None

    def write(self, record: Record) -> None:
        if self._fd is not None and replaced(self._fd, self.path):
            os.close(self._fd)
            self._fd = None
            _warn_replaced(self)
        if self._fd is None:
            self._fd = open_log(self.path)
        line = json.dumps({"format": FORMAT, **record.to_json()}, allow_nan=False, separators=(",", ":"))
        data = (line + "\n").encode()
        written = os.write(self._fd, data)
        while written < len(data):  # a partial write (pipes, signals): finish the line
            written += os.write(self._fd, data[written:])

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __repr__(self) -> str:
        return f"JsonlSink({self.path!r})"
