"""The files torchwatch writes: their format ids, JSON encoding, and JSON-lines logs.

Every file carries a ``"format"`` id (in its JSON, or in a safetensors file's metadata) that its
reader checks first. JSON never holds NaN or infinities (:func:`json_safe` writes ``null``).
JSON-lines logs (statistics, incidents, shadow comparisons) are appended one whole line per
``write``; a line torn by a crash is cut off before the next append and skipped by readers.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterator
from typing import Any

from ._files import open_log, parse_json, read_regular, replaced, shown
from .errors import FormatError, TorchwatchWarning

STATS = "torchwatch.jsonl/1"  # JsonlSink: one Record per line
INCIDENT = "torchwatch.incident/1"  # IncidentLog: one Alert per line
COMPARISON = "torchwatch.comparison/1"  # Comparison.save and the shadow log
MANIFEST = "torchwatch.manifest/1"
CANARY = "torchwatch.canary/1"
REFERENCE = "torchwatch.reference/1"
BUNDLE = "torchwatch.bundle/1"  # an incident bundle (capture): safetensors metadata
CAPTURE = "torchwatch.capture/1"  # the index of a capture directory, one line per bundle
REPLAY = "torchwatch.replay/1"  # a replay verdict, saved beside its bundle


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by None, ready for strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def json_line(doc: dict[str, Any]) -> bytes:
    """One compact JSON line (NaN/Inf as null), newline included."""
    return (json.dumps(json_safe(doc), allow_nan=False, separators=(",", ":")) + "\n").encode()


_warned_replaced: set[str] = set()


class JsonlLog:
    """A JSON-lines file appended to by one writer.

    Opened on the first :meth:`append` (parent directories are created; a torn last line is cut
    back first). A file deleted or rotated away while it is written is started again at the same
    path (warned once per path), never written into unlinked. Each append is whole lines.
    """

    def __init__(self, path: str, owner: str) -> None:
        self.path = path
        self._owner = owner
        self._fd: int | None = None

    def append(self, data: bytes, *, fsync: bool = False) -> None:
        if self._fd is not None and replaced(self._fd, self.path):
            os.close(self._fd)
            self._fd = None
            if self.path not in _warned_replaced:
                _warned_replaced.add(self.path)
                warnings.warn(
                    f"torchwatch: {self._owner}: the file was deleted or rotated away while it was being written; a "
                    "new one was started at the same path (check what removes the log directory)",
                    TorchwatchWarning,
                    stacklevel=3,
                )
        if self._fd is None:
            self._fd = open_log(self.path)
        written = os.write(self._fd, data)
        while written < len(data):  # a partial write (pipes, signals): finish the line
            written += os.write(self._fd, data[written:])
        if fsync:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def append_once(path: str, data: bytes, *, fsync: bool = False) -> None:
    """Append whole lines to ``path`` and close it (a torn last line is cut first; a FIFO
    without a reader fails, never blocks); ``fsync``: on disk before it returns."""
    fd = open_log(path)
    try:
        os.write(fd, data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(
    path: str | os.PathLike[str], what: str, kind: str, format_id: str
) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, object)`` for every complete line of a JSON-lines ``what`` whose lines are a
    ``kind`` of ``format_id``.

    A torn last line (a killed writer) is skipped; blank lines too.

    Raises:
        FormatError: the file is missing or not a regular file, a complete line is not JSON, or
            not an object of ``format_id`` (the message names the file and line).
    """
    lines = read_regular(path, what).split(b"\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{shown(path)} line {number}"
        try:
            doc = parse_json(line, where)
        except FormatError:
            if number == len(lines):  # no newline after it: torn
                continue
            raise
        if not isinstance(doc, dict) or doc.get("format") != format_id:
            raise FormatError(f"{where} is not a torchwatch {kind} ({format_id})")
        yield where, doc


# A directory holding this file is one run of `torchwatch demo`; `torchwatch report` of the directory above
# reads the latest run (see cli.report.choose_run). A JSON object: "started" (Unix time), "command",
# "torchwatch" (version), the run's settings, and "phases": [{"name", "call", "time"}], each phase's
# name, the watched model's root calls before it began and its start time; the HTML report marks them.
RUN_MARKER = "torchwatch-run.json"
