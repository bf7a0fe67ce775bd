"""torchwatch: catch the silent failures of PyTorch models at inference time.

>>> import torch, torchwatch as tw
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
>>> with tw.attach(model) as watch:
...     _ = model(torch.randn(8, 4))
...     print(watch.snapshot()["0"].count)
32
"""

from __future__ import annotations

from . import rules
from ._dist import DISTRIBUTION
from .alerts import Alert, FirstNonFinite
from .capture import Capture
from .capture.incident import Incident
from .capture.verdict import ReplayReport
from .containment import CircuitBreaker
from .errors import (
    CanaryError,
    CircuitOpenError,
    ConfigError,
    FormatError,
    IntegrityError,
    NonFiniteError,
    TorchwatchError,
    TorchwatchWarning,
)
from .fleet.identity import Identity
from .integrity import (
    Canary,
    CanaryReport,
    Fingerprint,
    FingerprintChange,
    Manifest,
    OutputCheck,
    SelfTestReport,
    Tolerances,
    WeightReport,
    fingerprint,
    selftest,
    verify_weights,
    write_key,
)
from .measure import tensor_stats
from .monitors import Monitor
from .monitors.drift import CalibrationReport, DriftStatus, Reference, arl_windows
from .monitors.ids import IdStats
from .monitors.inputs import InputMonitor, InputStats
from .monitors.outputs import OutputMonitor, OutputQuality
from .records import Record, Snapshot
from .rollout import MetricEvidence, Rollout, Verdict, rollout
from .shadow import Comparison, Shadow, compare, shadow
from .sinks import IncidentLog, JsonlSink, MemorySink, PrometheusSink, Sink, TensorBoardSink
from .stats import DEFAULT_CAST_DTYPES, ModuleStats
from .watch import Watch, attach

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version(DISTRIBUTION)
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "DEFAULT_CAST_DTYPES",
    "Alert",
    "CalibrationReport",
    "Canary",
    "CanaryError",
    "CanaryReport",
    "Capture",
    "CircuitBreaker",
    "CircuitOpenError",
    "Comparison",
    "ConfigError",
    "DriftStatus",
    "Fingerprint",
    "FingerprintChange",
    "FirstNonFinite",
    "FormatError",
    "IdStats",
    "Identity",
    "Incident",
    "IncidentLog",
    "InputMonitor",
    "InputStats",
    "IntegrityError",
    "JsonlSink",
    "Manifest",
    "MemorySink",
    "MetricEvidence",
    "ModuleStats",
    "Monitor",
    "NonFiniteError",
    "OutputCheck",
    "OutputMonitor",
    "OutputQuality",
    "PrometheusSink",
    "Record",
    "Reference",
    "ReplayReport",
    "Rollout",
    "SelfTestReport",
    "Shadow",
    "Sink",
    "Snapshot",
    "TensorBoardSink",
    "Tolerances",
    "TorchwatchError",
    "TorchwatchWarning",
    "Verdict",
    "Watch",
    "WeightReport",
    "arl_windows",
    "attach",
    "compare",
    "fingerprint",
    "rollout",
    "rules",
    "selftest",
    "shadow",
    "tensor_stats",
    "verify_weights",
    "write_key",
]
