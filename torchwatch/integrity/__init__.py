"""Startup self-test and in-memory checks: is the loaded model the one that was validated?

* :class:`Manifest` / :func:`verify_weights` — sha256 of every tensor, from a checkpoint's bytes
  or from memory, optionally pinned and HMAC-signed;
* :func:`fingerprint` — a fast on-device fingerprint that locates a changed chunk;
* :class:`Canary` — a reference batch and its recorded outputs;
* :func:`selftest` — all of the above before serving;
* :func:`write_key` — a new signing key file (mode 0600).
"""

from __future__ import annotations

from .canary import Canary, CanaryReport, OutputCheck, Tolerances
from .fingerprinting import Fingerprint, FingerprintChange, fingerprint
from .keys import write_key
from .manifest import Manifest, TensorEntry
from .startup import SelfTestReport, selftest
from .verify import WeightReport, verify_weights

__all__ = [
    "Canary",
    "CanaryReport",
    "Fingerprint",
    "FingerprintChange",
    "Manifest",
    "OutputCheck",
    "SelfTestReport",
    "TensorEntry",
    "Tolerances",
    "WeightReport",
    "fingerprint",
    "selftest",
    "verify_weights",
    "write_key",
]
