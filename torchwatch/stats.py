"""Per-module activation statistics: what is measured, and how two measurements merge."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from ._schema import Fields

DEFAULT_CAST_DTYPES = ("float16", "bfloat16", "float8_e4m3fn")

_NAN = math.nan


def chan(n_a: int, mean_a: float, m2_a: float, n_b: int, mean_b: float, m2_b: float) -> tuple[int, float, float]:
    """Chan et al.'s parallel merge of (count, mean, sum of squared deviations)."""
    if n_b == 0:
        return n_a, mean_a, m2_a
    if n_a == 0:
        return n_b, mean_b, m2_b
    n = n_a + n_b
    delta = mean_b - mean_a
    w_b = n_b / n
    return n, mean_a + delta * w_b, m2_a + m2_b + delta * delta * n_a * w_b


@dataclass(frozen=True)
class ModuleStats:
    """Statistics of the floating-point tensors one module output position produced.

    Counts are exact Python integers. ``mean``/``std``/``min``/``max``/``absmax`` are over the
    finite elements only (population std, ddof=0) and are NaN when there were none.

    Attributes:
        calls: how many tensors were measured (one per sampled module call).
        count: elements seen, NaN and Inf included.
        mean, std, min, max, absmax: over finite elements.
        nan, posinf, neginf: exact non-finite counts.
        zeros: elements equal to zero (either sign).
        subnormal: finite nonzero elements below ``finfo(dtype).tiny`` of their own dtype.
        underflow: per cast dtype name, finite nonzero elements that ``x.to(dtype)`` makes 0.
        overflow: per cast dtype name, finite elements with ``|x| > finfo(dtype).max``.

    Example:
        >>> import torch, torchwatch as tw
        >>> s = tw.tensor_stats(torch.tensor([1.0, -3.0, float("nan"), 1e-9]))
        >>> s.count, s.nan, s.min, s.max, s.underflow["float16"]
        (4, 1, -3.0, 1.0, 1)
    """

    calls: int = 0
    count: int = 0
    mean: float = _NAN
    std: float = _NAN
    min: float = _NAN
    max: float = _NAN
    absmax: float = _NAN
    nan: int = 0
    posinf: int = 0
    neginf: int = 0
    zeros: int = 0
    subnormal: int = 0
    underflow: Mapping[str, int] = field(default_factory=dict)
    overflow: Mapping[str, int] = field(default_factory=dict)

    @property
    def nonfinite(self) -> int:
        """NaN + Inf + -Inf elements."""
        return self.nan + self.posinf + self.neginf

    @property
    def finite(self) -> int:
        """Elements the moments are computed over."""
        return self.count - self.nonfinite

    def merge(self, other: ModuleStats) -> ModuleStats:
        """The statistics of both measurements together (Chan's formula for the moments).

        Example:
            >>> import torch, torchwatch as tw
            >>> a, b = torch.randn(100), torch.randn(50) + 3
            >>> merged = tw.tensor_stats(a).merge(tw.tensor_stats(b))
            >>> abs(merged.std - torch.cat([a, b]).double().std(correction=0).item()) < 1e-6
            True
        """
        n_a, n_b = self.finite, other.finite
        n, mean, m2 = chan(n_a, self.mean if n_a else 0.0, _m2(self), n_b, other.mean if n_b else 0.0, _m2(other))
        lo = min(_finite_or(self.min, math.inf), _finite_or(other.min, math.inf))
        hi = max(_finite_or(self.max, -math.inf), _finite_or(other.max, -math.inf))
        return ModuleStats(
            calls=self.calls + other.calls,
            count=self.count + other.count,
            mean=mean if n else _NAN,
            std=math.sqrt(max(m2, 0.0) / n) if n else _NAN,
            min=lo if n else _NAN,
            max=hi if n else _NAN,
            absmax=max(-lo, hi) if n else _NAN,
            nan=self.nan + other.nan,
            posinf=self.posinf + other.posinf,
            neginf=self.neginf + other.neginf,
            zeros=self.zeros + other.zeros,
            subnormal=self.subnormal + other.subnormal,
            underflow=_add_counts(self.underflow, other.underflow),
            overflow=_add_counts(self.overflow, other.overflow),
        )

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (float NaN kept; JSON writers turn it into null)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["underflow"] = dict(self.underflow)
        out["overflow"] = dict(self.overflow)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "statistics") -> ModuleStats:
        """Inverse of :meth:`to_dict`; ``None`` floats read back as NaN.

        Raises:
            FormatError: a field of the wrong type (a negative count, a string for a number),
                naming ``where`` and the field.
        """
        f = Fields(data, where)
        kwargs: dict[str, Any] = {}
        for field_ in fields(cls):
            if field_.name in ("underflow", "overflow"):
                kwargs[field_.name] = f.counts(field_.name)
            elif field_.type == "float":
                kwargs[field_.name] = f.float(field_.name)
            else:
                kwargs[field_.name] = f.count(field_.name)
        return cls(**kwargs)


def merge_all(items: Iterable[ModuleStats]) -> ModuleStats:
    """Merge any number of :class:`ModuleStats` (an empty iterable gives an empty one)."""
    out = ModuleStats()
    for item in items:
        out = out.merge(item)
    return out


def _m2(s: ModuleStats) -> float:
    return s.std * s.std * s.finite if s.finite else 0.0


def _finite_or(value: float, default: float) -> float:
    return default if math.isnan(value) else value


def _add_counts(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    out = dict(a)
    for key, value in b.items():
        out[key] = out.get(key, 0) + value
    return out
