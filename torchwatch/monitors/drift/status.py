"""What a watch reports about drift: :class:`DriftStatus` per module, and ARLs in windows."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ... import _validate, values
from ..._schema import Fields, entries
from ...errors import FormatError
from ...values import Export, Scalar, Series, module_label


@dataclass(frozen=True)
class DriftStatus:
    """A monitored module's drift state.

    Attributes:
        score: the largest of this module's detector statistics after the last window, each as a
            fraction of its alarm threshold (the per-window CUSUM, shared by the reference's
            modules, and the module's two accumulating detectors): 1 or more is an alarm. It does
            not restart during drift.
        p_value: this module's calibrated p-value for the last window (small: unlike reference).
        alarm: the module is in a drift episode: an alarm pointed at it and its detectors have
            not yet all returned to their no-drift level.
        windows: windows evaluated since the last reset.
        threshold: the level of ``score`` that alarms (1.0).
    """

    score: float
    p_value: float
    alarm: bool
    windows: int
    threshold: float

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("score", "p_value", "alarm", "windows", "threshold")}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "drift status") -> DriftStatus:
        """Inverse of :meth:`to_dict` (null numbers read as NaN); FormatError naming a bad field."""
        f = Fields(data, where)
        alarm = data.get("alarm", False)
        if not isinstance(alarm, bool):
            raise FormatError(f"{where}: field 'alarm' must be true or false, got {alarm!r}")
        return cls(f.float("score"), f.float("p_value"), alarm, f.count("windows"), f.float("threshold"))


def arl_windows(*, days: float, requests_per_second: float, window: int) -> float:
    """Windows between false alarms for "at most one false alarm every ``days``", at a rate of
    ``requests_per_second`` samples reaching the monitored modules.

    Example:
        >>> import torchwatch as tw
        >>> tw.arl_windows(days=7, requests_per_second=50, window=32)
        945000.0
    """
    days = _validate.number("arl_windows()", "days", days, above=0.0)
    rate = _validate.number("arl_windows()", "requests_per_second", requests_per_second, above=0.0)
    window = _validate.integer("arl_windows()", "window", window)
    return days * 86400 * rate / window


def _decode(doc: Any, where: str) -> dict[str, DriftStatus]:
    return {name: DriftStatus.from_dict(f.doc, f.where) for name, f in entries(doc, where)}


def _export(value: Mapping[str, DriftStatus], record: Any) -> Iterator[Export]:
    """Per module: score, p-value and the interval's drift alarms (TensorBoard); score and p-value
    (Prometheus gauges)."""
    for name, status in value.items():
        module = module_label(name)
        alarms = sum(1 for a in record.alerts if a.rule == "drift" and a.module == name)
        yield Scalar(f"drift/{module}/score", status.score)
        yield Scalar(f"drift/{module}/p_value", status.p_value)
        yield Scalar(f"drift/{module}/alarms", float(alarms))
        labels = (("module", module),)
        yield Series("torchwatch_drift_score", "gauge", "Drift score of the latest window.", status.score, labels)
        yield Series("torchwatch_drift_p_value", "gauge", "Drift p-value of the latest window.", status.p_value, labels)


values.register("drift", decode=_decode, export=_export)
