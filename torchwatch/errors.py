"""Exceptions and warnings raised by torchwatch.

The tree::

    TorchwatchError(Exception)
    ├── ConfigError(TorchwatchError, ValueError)    bad argument or selector, at setup time
    ├── FormatError(TorchwatchError, ValueError)    a file torchwatch cannot read
    ├── IntegrityError(TorchwatchError)             weights differ from their manifest
    ├── CanaryError(TorchwatchError)                reference outputs do not match
    ├── NonFiniteError(TorchwatchError)             NaN/Inf seen with on_nonfinite="raise"
    └── CircuitOpenError(TorchwatchError)           a CircuitBreaker without fallback is open

    TorchwatchWarning(UserWarning)                  something was skipped or disabled; inference goes on

Every message says what failed, names the module, tensor or file, gives expected vs. got where
there is one, and says how to fix it.
"""

from __future__ import annotations

__all__ = [
    "CanaryError",
    "CircuitOpenError",
    "ConfigError",
    "FormatError",
    "IntegrityError",
    "NonFiniteError",
    "TorchwatchError",
    "TorchwatchWarning",
]


class TorchwatchError(Exception):
    """Base class of every exception torchwatch raises on purpose."""


class ConfigError(TorchwatchError, ValueError):
    """An argument, selector or configuration is invalid; raised before anything is changed."""


class FormatError(TorchwatchError, ValueError):
    """A file is missing, truncated, corrupt or of an unknown format version."""


class IntegrityError(TorchwatchError):
    """Loaded weights do not match the manifest they are checked against (or the manifest was tampered with).

    Attributes:
        report: the :class:`torchwatch.WeightReport` (or :class:`torchwatch.SelfTestReport`) with
            every failed tensor by name, when there is one; else None.
    """

    def __init__(self, message: str, *, report: object = None) -> None:
        super().__init__(message)
        self.report = report


class CanaryError(TorchwatchError):
    """A model's outputs on the reference batch differ from the recorded ones.

    Attributes:
        report: the :class:`torchwatch.CanaryReport` naming each failed output, when there is one.
    """

    def __init__(self, message: str, *, report: object = None) -> None:
        super().__init__(message)
        self.report = report


class NonFiniteError(TorchwatchError):
    """A forward produced NaN or Inf while ``on_nonfinite="raise"``.

    Raised after the forward of the watched model completed.

    Attributes:
        alert: the :class:`torchwatch.Alert` describing it; ``alert.module`` is the first module,
            in execution order, whose output was not finite on that call.
    """

    def __init__(self, message: str, alert: object) -> None:
        super().__init__(message)
        self.alert = alert


class CircuitOpenError(TorchwatchError):
    """A :class:`torchwatch.CircuitBreaker` with no fallback is open: the model is not called."""


class TorchwatchWarning(UserWarning):
    """torchwatch skipped or disabled something (a failing hook or sink); inference continues."""
