"""Embedding drift: a reference fitted once (:mod:`.reference`, :mod:`.statistics`), checked by
:mod:`.calibration`, and detected online in the hooks (:mod:`.online`, :mod:`.sequential`)."""

from .calibration import CalibrationReport
from .online import Drift
from .reference import Reference
from .status import DriftStatus, arl_windows

__all__ = ["CalibrationReport", "Drift", "DriftStatus", "Reference", "arl_windows"]
