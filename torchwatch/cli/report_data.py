"""What ``torchwatch report`` reads from a log directory, whichever logs it came from."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModuleSeries:
    """One module's per-interval values (x axis: step)."""

    steps: list[int] = field(default_factory=list)
    nonfinite: list[int] = field(default_factory=list)
    absmax: list[float] = field(default_factory=list)
    count: int = 0
    nan: int = 0
    posinf: int = 0
    neginf: int = 0
    first_nonfinite_step: int | None = None
    under: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))  # per-interval fractions
    over: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    under_total: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # counts (JSONL)
    over_total: dict[str, float] = field(default_factory=lambda: defaultdict(float))


@dataclass
class LogData:
    """Everything read from a log directory."""

    logdir: str
    sources: list[str] = field(default_factory=list)
    exact: bool = True  # counts from JSONL (True) or fractions from TensorBoard scalars
    calls: int = 0
    steps: int = 0
    first_time: float | None = None
    last_time: float | None = None
    modules: dict[str, ModuleSeries] = field(default_factory=dict)
    origins: dict[str, dict[str, Any]] = field(default_factory=dict)
    replicas: dict[str, dict[str, Any]] = field(default_factory=dict)  # record.identity by replica name
    drift: dict[str, list[tuple[int, float, float]]] = field(default_factory=dict)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    outputs: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # (step, record["outputs"])
    latency: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    inputs: dict[str, list[tuple[int, dict[str, Any]]]] = field(default_factory=dict)
    comparisons: list[dict[str, Any]] = field(default_factory=list)  # the last of each comparison file
    phases: list[dict[str, Any]] = field(default_factory=list)  # {"name", "call", "time"} from run markers
    charted_only: list[str] = field(default_factory=list)  # in TensorBoard logs, not summarised from them
    times: dict[int, float] = field(default_factory=dict)  # wall time of each record's step (JSONL logs)
    skipped: list[str] = field(default_factory=list)  # log-like files that could not be read, and why
    baselines: dict[str, int] | None = None  # the rules' warm-up as of the latest record that says
    baselines_step: int = -1
    # tag -> (edges, counts summed over the records): every histogram a monitor's value exports
    histograms: dict[str, tuple[tuple[float, ...], list[float]]] = field(default_factory=dict)
    captures: list[dict[str, Any]] = field(default_factory=list)  # capture indexes' bundles, with replay verdicts
