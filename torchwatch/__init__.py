"""torchwatch: catch the silent failures of PyTorch models at inference time.

>>> import torch, torchwatch as tw
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
>>> with tw.attach(model) as watch:
...     _ = model(torch.randn(8, 4))
...     print(watch.snapshot()["0"].count)
32
"""

from __future__ import annotations

from .alerts import Alert, FirstNonFinite
from .drift import CalibrationReport, DriftStatus, Reference, arl_windows
from .errors import (
    CanaryError,
    ConfigError,
    FormatError,
    IntegrityError,
    NonFiniteError,
    TorchwatchError,
    TorchwatchWarning,
)
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
)
from .sinks import JsonlSink, MemorySink, Record, Sink, TensorBoardSink
from .snapshot import Snapshot
from .stats import DEFAULT_CAST_DTYPES, ModuleStats, tensor_stats
from .watch import Watch, attach

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("torchwatch")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "DEFAULT_CAST_DTYPES",
    "Alert",
    "CalibrationReport",
    "Canary",
    "CanaryError",
    "CanaryReport",
    "ConfigError",
    "DriftStatus",
    "Fingerprint",
    "FingerprintChange",
    "FirstNonFinite",
    "FormatError",
    "IntegrityError",
    "JsonlSink",
    "Manifest",
    "MemorySink",
    "ModuleStats",
    "NonFiniteError",
    "OutputCheck",
    "Record",
    "Reference",
    "SelfTestReport",
    "Sink",
    "Snapshot",
    "TensorBoardSink",
    "Tolerances",
    "TorchwatchError",
    "TorchwatchWarning",
    "Watch",
    "WeightReport",
    "arl_windows",
    "attach",
    "fingerprint",
    "selftest",
    "tensor_stats",
    "verify_weights",
]
