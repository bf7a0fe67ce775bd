"""Activation statistics: the monitor whose measurements fill a record's ``stats`` and ``nonfinite``."""

from .monitor import POSITIONS_NOT_MEASURED, Activations
from .window import StatsWindow

__all__ = ["POSITIONS_NOT_MEASURED", "Activations", "StatsWindow"]
