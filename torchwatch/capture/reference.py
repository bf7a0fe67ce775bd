"""The range of recent healthy calls' inputs: what a replay holds a captured call's inputs against.

A fault that enters with the data need not be NaN: a preprocessing change that scales images by
255 overflows float16 a few layers in, and a replay that only looked for non-finite inputs would
blame the precision. While a capture is armed, every healthy call judged on the host adds each
floating-point input position's abs-max here (the first entries of its measurements: the input
monitor measures before any module runs); a bundle carries the median and 99th percentile of the
last :data:`KEEP` calls, and the replay calls an input :data:`FACTOR` times above that 99th
percentile a data fault.
"""

from __future__ import annotations

import collections
import statistics
import threading
from typing import Any

from ..monitors.inputs import INPUT

KEEP = 256  # recent healthy calls per input position
MIN_CALLS = 32  # fewer than this say nothing about a range
FACTOR = 4.0  # abs-max over FACTOR x the 99th percentile of healthy calls: the data changed


class InputRange:
    """Recent healthy calls' abs-max per floating-point input position (thread-safe)."""

    def __init__(self) -> None:
        self._absmax: dict[str, collections.deque[float]] = {}
        self._lock = threading.Lock()

    def add(self, detail: list[tuple[str, Any]]) -> None:
        """A healthy call's measurements (``(position, raw)``, inputs first)."""
        for name, raw in detail:
            if not name.startswith(INPUT):
                return
            if raw[0]:  # finite elements: raw[8], raw[9] are their min and max
                with self._lock:
                    kept = self._absmax.get(name)
                    if kept is None:
                        kept = self._absmax[name] = collections.deque(maxlen=KEEP)
                    kept.append(max(-raw[8], raw[9]))

    def reference(self) -> dict[str, dict[str, float]]:
        """Per input position with enough calls: ``{"calls", "absmax_median", "absmax_p99"}``."""
        with self._lock:
            kept = {name: sorted(values) for name, values in self._absmax.items() if len(values) >= MIN_CALLS}
        return {
            name: {"calls": len(v), "absmax_median": statistics.median(v), "absmax_p99": v[int(0.99 * (len(v) - 1))]}
            for name, v in kept.items()
        }


def out_of_range(name: str, absmax: float, reference: Any) -> str | None:
    """Why an input's abs-max is outside its bundle's reference (None if it is not, or if the
    reference says too little)."""
    r = reference.get(name) if isinstance(reference, dict) else None
    if not isinstance(r, dict):
        return None
    calls, p99 = r.get("calls"), r.get("absmax_p99")
    if not isinstance(calls, int) or calls < MIN_CALLS or not isinstance(p99, (int, float)) or not p99 > 0:
        return None
    if not absmax > FACTOR * p99:
        return None
    return (
        f"input {name!r} reached abs-max {absmax:.4g}, {absmax / p99:.0f}x the 99th percentile of the last {calls} "
        f"healthy calls ({p99:.4g}): the data changed before the model (preprocessing, scaling, a new source)"
    )
