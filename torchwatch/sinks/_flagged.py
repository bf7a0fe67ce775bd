"""Runs of their own for the modules alerts name, so TensorBoard draws each in its own colour.

TensorBoard colours a chart's lines by run: every module of the main run is drawn in one colour
(told apart only by hovering). A module an alert names gets a run directory of its own under
``<logdir>/flagged/``, holding a few statistics under the same tags in every such run; the
layout's "what changed" charts match those tags, so each alerted module is one coloured line
there, beside the others that alerted. The run starts with the module's recent history (kept for
every module, a small array per record) so its baseline shows before the jump.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import TorchwatchWarning
from ..records import Record
from .base import ROOT_LABEL

# (tag leaf, chart title, value of a ModuleStats); the leaves end unlike any main-run tag, so the
# main layout's per-module patterns (".*/absmax$", ...) never match a flagged run's lines twice.
# abs-max in decades: a x255 input bug (+2.4) and an fp16 overflow (+5) both show on one linear
# chart; an interval without a finite nonzero value has no point (NaN+Inf and zeros show it).
FLAGGED_STATS: tuple[tuple[str, str, Callable[[Any], float]], ...] = (
    ("log10-abs-max", "abs-max, log10", lambda s: math.log10(s.absmax) if s.absmax > 0 else math.nan),
    ("NaN+Inf", "NaN + Inf per interval", lambda s: float(s.nan + s.posinf + s.neginf)),
    ("zero-fraction", "zero fraction", lambda s: s.zeros / max(s.count, 1)),
)
# the statistics of a module's output an alert can name: the root output ("") is flagged only for
# these, since "" is also how an alert says "no module" (latency, a custom check)
MODULE_STATS = frozenset(
    {"nan", "posinf", "neginf", "mean", "std", "min", "max", "absmax", "zeros", "zero_fraction", "subnormal",
     "overflow", "underflow"}
)  # fmt: skip
MAX_FLAGGED = 8  # runs of their own per sink, open at once: the most severe alerted (all stay in the main run)
# how severe an alert's rule is (lower: more): a fault first (NaN/Inf origin, changed weights, a
# cast that breaks), then the rest; a flagged run goes to the most severe, not to the first alerted
SEVERITY = {"nonfinite": 0, "fingerprint": 0, "cast_overflow": 1}
OTHER = 2
HISTORY = 32  # records of every module kept to start a flagged run with its baseline


def tag(prefix: str, leaf: str) -> str:
    return f"{prefix}flagged/{leaf}"


def charts() -> dict[str, list[Any]]:
    """The layout's charts of the flagged runs, one line (and colour) per flagged module."""
    return {
        f"alerted modules: {title} (one colour each)": ["Multiline", [rf"(.*/)?flagged/{re.escape(leaf)}$"]]
        for leaf, title, _ in FLAGGED_STATS
    }


def run_name(label: str) -> str:
    """A directory name for a module's run: path separators and odd characters become ``_``."""
    name = re.sub(r"[^A-Za-z0-9._\-\[\]]", "_", label.replace("<", "").replace(">", ""))
    return name if name.strip(".") else "_" + name


class FlaggedRuns:
    """The flagged modules' runs of one :class:`~torchwatch.TensorBoardSink` (its worker thread only).

    ``acquire(path)``/``release(path)`` share event-file writers with the sink; ``event(step, time,
    values)`` builds one scalar event.
    """

    def __init__(
        self,
        logdir: str,
        prefix: str,
        acquire: Callable[[str], Any],
        release: Callable[[str], None],
        event: Callable[[int, float, list[tuple[str, float]]], Any],
    ) -> None:
        self._root = os.path.join(logdir, "flagged")
        self._prefix = prefix
        self._acquire, self._release, self._event = acquire, release, event
        self._runs: dict[str, tuple[str, Any]] = {}  # module -> (run directory, writer) while open
        self._severity: dict[str, int] = {}  # module -> the severity its run was opened for
        self._dirs: dict[str, str] = {}  # module -> run directory, kept after close
        self._history: deque[tuple[int, float, dict[str, int], np.ndarray]] = deque(maxlen=HISTORY)
        self.not_flagged: set[str] = set()  # alerted once the runs were all taken, or whose run failed
        self._failed = False
        self._full_warned = False

    def write(self, record: Record) -> None:
        index = {name: i for i, name in enumerate(record.stats)}
        values = np.array([[f(s) for _, _, f in FLAGGED_STATS] for s in record.stats.values()], dtype=np.float64)
        # the most severe first; within a severity, execution order (where a fault showed first)
        ranked = sorted(
            (SEVERITY.get(a.rule, OTHER), index.get(a.module, -1), a.module) for a in record.alerts if a.module in index
        )
        for severity, _, module in ranked:
            new = module not in self._runs and module not in self.not_flagged
            if new and (module or any(a.stat.partition(".")[0] in MODULE_STATS for a in record.alerts
                                      if a.module == module)):  # fmt: skip
                self._flag(module, severity)
        for name, (_, writer) in self._runs.items():
            if name in index:
                writer.add_event(self._event(record.step, record.time, self._scalars(values[index[name]])))
        self._history.append((record.step, record.time, index, values))

    def _flag(self, name: str, severity: int) -> None:
        if len(self._runs) >= MAX_FLAGGED:
            least = max(self._runs, key=lambda m: self._severity[m])
            if self._severity[least] > severity:  # a worse fault takes the least severe one's place
                path, writer = self._runs.pop(least)
                writer.flush()
                self._release(path)  # its run keeps what it holds; its module stays in the main run
                self.not_flagged.add(least)
        if len(self._runs) >= MAX_FLAGGED:
            if not self._full_warned:
                self._full_warned = True
                warnings.warn(
                    f"torchwatch: TensorBoardSink: more than {MAX_FLAGGED} modules alerted; {name!r} and later ones "
                    f"have no run of their own under {self._root} unless a more severe alert names them (all are "
                    "still charted in the main run)",
                    TorchwatchWarning,
                    stacklevel=2,
                )
            self.not_flagged.add(name)
            return
        taken = set(self._dirs.values())
        base = os.path.join(self._root, run_name(self._prefix + (name or ROOT_LABEL)))
        path, n = base, 1
        while path in taken:  # two labels that read the same once cleaned
            n += 1
            path = f"{base}~{n}"
        try:
            writer = self._acquire(path)
        except OSError as exc:  # the main run is written already: only this module's own run is lost
            self.not_flagged.add(name)
            if not self._failed:
                self._failed = True
                warnings.warn(
                    f"torchwatch: TensorBoardSink: cannot write a run for the alerted module {name!r} under "
                    f"{self._root} ({exc}); alerted modules are still charted in the main run",
                    TorchwatchWarning,
                    stacklevel=2,
                )
            return
        self._runs[name] = (path, writer)
        self._severity[name] = severity
        self._dirs[name] = path
        for step, time, index, values in self._history:  # its baseline, before the alert
            if name in index:
                writer.add_event(self._event(step, time, self._scalars(values[index[name]])))

    def _scalars(self, row: np.ndarray) -> list[tuple[str, float]]:
        scalars = zip(FLAGGED_STATS, row.tolist(), strict=True)
        return [(tag(self._prefix, leaf), v) for (leaf, _, _), v in scalars if not math.isnan(v)]

    @property
    def modules(self) -> dict[str, str]:
        """Flagged module -> its run directory (a copy: safe from any thread)."""
        return dict(self._dirs)

    def flush(self) -> None:
        for _, writer in self._runs.values():
            writer.flush()

    def close(self) -> None:
        runs, self._runs = self._runs, {}
        for path, writer in runs.values():
            writer.flush()
            self._release(path)
