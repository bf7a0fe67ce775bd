"""An append-only incident log: one JSON line per incident, fsynced, readable after any crash."""

from __future__ import annotations

import os
from typing import Any

from .. import _validate, formats, incidents
from .._schema import Fields
from ..alerts import Alert
from ..records import Record
from .base import Sink

FORMAT = formats.INCIDENT


class IncidentLog(Sink):
    """Appends every alert that passed the alert policy to ``path``, one incident per line.

    An incident is one fault (:mod:`torchwatch.incidents`): the alerts one interval raised about
    module outputs are one line, led by the module where the change showed first in execution
    order (a x255 input: the input, not the 40 modules after it); NaN/Inf (already one per call,
    naming its origin), fingerprint and drift alerts are lines of their own.

    Each line: ``{"format": "torchwatch.incident/1", "step": ..., "rule", "module", "stat",
    "value", "expected", "call", "time", "cohort", "trace_id", "message"}`` of the lead alert,
    ``"summary"``: its message and how far the change spread, and ``"related"``: the other alerts of
    the incident, each with the alert fields (nothing is dropped; ``[]`` for a single alert). The lines of one flush
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
        self._log = formats.JsonlLog(self.path, repr(self))

    def write(self, record: Record) -> None:
        if record.alerts:
            lines = b"".join(
                formats.json_line({
                    "format": FORMAT, "step": record.step, **incident.lead.to_dict(), "summary": incident.summary(),
                    "related": [a.to_dict() for a in incident.related],
                })
                for incident in incidents.group(record.alerts, list(record.stats))
            )  # fmt: skip
            self._log.append(lines, fsync=True)

    def close(self) -> None:
        self._log.close()

    @staticmethod
    def read(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
        """Every complete incident in the log, oldest first (a torn last line is skipped).

        Raises:
            FormatError: the file is missing or not a regular file, or a complete line is not
                an incident (the message names the line and the field).
        """
        out = []
        for where, item in formats.read_jsonl(path, "incident log", "incident", FORMAT):
            Alert.from_dict(item, where)  # every field of the alert checked
            f = Fields(item, where)
            f.int("step")
            for i, related in enumerate(f.list("related")):  # missing in logs written before it
                Alert.from_dict(related, f"{where}, related[{i}]")
            out.append(item)
        return out

    def __repr__(self) -> str:
        return f"IncidentLog({self.path!r})"
