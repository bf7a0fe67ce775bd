"""An append-only incident log: one JSON line per alert, fsynced, readable after any crash."""

from __future__ import annotations

import json
import os
from typing import Any

from .. import _validate
from .._files import open_log, parse_json, read_regular, replaced, shown
from .._schema import Fields
from ..alerts import Alert
from ..errors import FormatError
from .base import Record, Sink, _json_safe, _warn_replaced

FORMAT = "torchwatch.incident/1"


class IncidentLog(Sink):
    """Appends every alert that passed the alert policy to ``path``, one JSON object per line.

    Each line: ``{"format": "torchwatch.incident/1", "step": ..., "rule", "module", "stat",
    "value", "expected", "call", "time", "cohort", "trace_id", "message"}``. The lines of one flush
    are written with a single ``write`` and the file is fsynced before the sink returns, so an
    alert that was reported is on disk. A process killed in the middle of a write leaves at most
    one partial last line; it is cut off when the log is opened again, so the log a restarted
    process continues is always whole lines (:meth:`read` also skips it). A log file deleted or
    rotated away while the sink writes is started again at ``path`` (warned once).

    Args:
        path: the ``.jsonl`` file (parent directories are created).

    Example:
        >>> import tempfile, torch, torchwatch as tw
        >>> path = tempfile.mkdtemp() + "/incidents.jsonl"
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> with tw.attach(model, sinks=[tw.IncidentLog(path)], on_nonfinite=[].append):
        ...     _ = model(torch.tensor([[float("nan"), 1.0]]))
        >>> [(i["rule"], i["module"]) for i in tw.IncidentLog.read(path)]
        [('nonfinite', '<input>')]
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = _validate.path("IncidentLog", "path", path)
        self._fd: int | None = None

    def write(self, record: Record) -> None:
        if not record.alerts:
            return
        if self._fd is not None and replaced(self._fd, self.path):
            self._reopened()
        if self._fd is None:
            self._fd = open_log(self.path)
        lines = "".join(
            json.dumps(_json_safe({"format": FORMAT, "step": record.step, **a.to_dict()}), separators=(",", ":")) + "\n"
            for a in record.alerts
        ).encode()
        os.write(self._fd, lines)
        os.fsync(self._fd)

    def _reopened(self) -> None:
        os.close(self._fd)
        self._fd = None
        _warn_replaced(self)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def read(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
        """Every complete incident in the log, oldest first (a torn last line is skipped).

        Raises:
            FormatError: the file is missing or not a regular file, or a complete line is not
                an incident (the message names the line and the field).
        """
        data = read_regular(path, "incident log")
        out = []
        lines = data.split(b"\n")
        for number, line in enumerate(lines[:-1], 1):  # the part after the last newline is torn or empty
            where = f"{shown(path)} line {number}"
            item = parse_json(line, where)
            if not isinstance(item, dict) or item.get("format") != FORMAT:
                raise FormatError(f"{where} is not a torchwatch incident ({FORMAT})")
            Alert.from_dict(item, where)  # every field of the alert checked
            Fields(item, where).int("step")
            out.append(item)
        return out

    def __repr__(self) -> str:
        return f"IncidentLog({self.path!r})"
