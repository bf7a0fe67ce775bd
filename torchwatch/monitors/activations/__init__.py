"""Activation statistics: the monitor whose value is a record's ``stats`` and ``nonfinite``."""

from .monitor import POSITIONS_NOT_MEASURED, Activations
from .window import ActivationPart, StatsWindow

__all__ = ["POSITIONS_NOT_MEASURED", "ActivationPart", "Activations", "StatsWindow"]
