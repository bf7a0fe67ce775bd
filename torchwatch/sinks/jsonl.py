"""One JSON object per flush, one per line."""

from __future__ import annotations

import os

from .. import _validate, formats
from ..records import Record
from .base import Sink

FORMAT = formats.STATS


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
        self._log = formats.JsonlLog(self.path, repr(self))

    def write(self, record: Record) -> None:
        self._log.append(formats.json_line({"format": FORMAT, **record.to_json()}))

    def close(self) -> None:
        self._log.close()

    def __repr__(self) -> str:
        return f"JsonlSink({self.path!r})"
