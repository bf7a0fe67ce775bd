"""Fixed limits: cast overflow/underflow fractions (:class:`CastRange`) and latency (:class:`LatencySLO`)."""

from __future__ import annotations

from dataclasses import dataclass

from .. import _validate
from ..alerts import Alert
from ..errors import ConfigError
from .interval import Interval, where


@dataclass
class CastRange:
    """Alert when the fraction of a module's values that a cast would break exceeds ``max_fraction``.

    Args:
        dtype: a name in ``attach(cast_dtypes=...)``, e.g. ``"float16"``.
        kind: ``"overflow"`` (|x| above the dtype's max: inf, or saturation for fp8) or
            ``"underflow"`` (nonzero values that become 0).
        max_fraction: the largest tolerated fraction of the interval's elements (0: any).
        trips: whether the alert marks the watch unhealthy (see :attr:`torchwatch.Watch.healthy`).
    """

    dtype: str
    kind: str = "overflow"
    max_fraction: float = 0.0
    trips: bool = False
    name: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.dtype, str):
            raise ConfigError(f"CastRange: dtype must be a dtype name such as 'float16', got {self.dtype!r}")
        if self.kind not in ("overflow", "underflow"):
            raise ConfigError(f"CastRange kind={self.kind!r} is not valid: use 'overflow' or 'underflow'")
        _validate.number("CastRange", "max_fraction", self.max_fraction, low=0.0, high=1.0)
        if self.max_fraction >= 1:
            raise ConfigError(f"CastRange max_fraction must be in [0, 1), got {self.max_fraction!r}")
        _validate.flag("CastRange", "trips", self.trips)
        self.name = self.name or f"cast_{self.kind}"
        if not isinstance(self.name, str):
            raise ConfigError(f"CastRange: name must be a string, got {self.name!r}")

    def evaluate(self, interval: Interval) -> list[Alert]:
        out = []
        for module, s in interval.stats.items():
            counts = s.overflow if self.kind == "overflow" else s.underflow
            n = counts.get(self.dtype)
            if n is None or s.count == 0:
                continue
            fraction = n / s.count
            if fraction > self.max_fraction:
                verb = "overflow (become inf or saturate)" if self.kind == "overflow" else "underflow to 0"
                out.append(interval.alert(
                    self.name, module, f"{self.kind}.{self.dtype}", fraction, self.max_fraction,
                    f"{n:,} of {s.count:,} values of {module!r}{where(interval.cohort)} would {verb} in "
                    f"{self.dtype} ({fraction:.3%}, limit {self.max_fraction:.3%})",
                ))  # fmt: skip
        return out


@dataclass
class LatencySLO:
    """Alert when a latency quantile of an interval exceeds a service-level objective.

    Args:
        max_ms: the objective, in milliseconds.
        quantile: ``"p50"``, ``"p95"`` or ``"p99"`` (within the sketch's 1% relative accuracy).
        min_calls: intervals with fewer calls are not judged (a p99 of 10 calls is their maximum).
        trips: whether the alert marks the watch unhealthy.

    Example:
        >>> from torchwatch import rules
        >>> from torchwatch.monitors.latency import LatencySketch
        >>> sketch = LatencySketch()
        >>> sketch.add_all([0.010] * 90 + [0.250] * 10)
        >>> interval = rules.Interval(100, 0.0, None, {}, latency=sketch.stats())
        >>> [a.stat for a in rules.LatencySLO(max_ms=100, quantile="p95", min_calls=50).evaluate(interval)]
        ['latency.p95_ms']
    """

    max_ms: float
    quantile: str = "p99"
    min_calls: int = 100
    trips: bool = False
    name: str = "latency_slo"

    def __post_init__(self) -> None:
        if self.quantile not in ("p50", "p95", "p99"):
            raise ConfigError(f"LatencySLO quantile={self.quantile!r} is not valid: use 'p50', 'p95' or 'p99'")
        _validate.number("LatencySLO", "max_ms", self.max_ms, above=0.0)
        _validate.integer("LatencySLO", "min_calls", self.min_calls, low=1)
        _validate.flag("LatencySLO", "trips", self.trips)

    def evaluate(self, interval: Interval) -> list[Alert]:
        lat = interval.latency
        if lat is None or lat.count < self.min_calls:
            return []
        value = getattr(lat, f"{self.quantile}_ms")
        if not value > self.max_ms:
            return []
        return [interval.alert(
            self.name, "", f"latency.{self.quantile}_ms", value, self.max_ms,
            f"{self.quantile} latency {value:.1f} ms over {lat.count} calls exceeds its objective, {self.max_ms:g} ms",
        )]  # fmt: skip
