"""Would-underflow / would-overflow thresholds, learned from torch's own casts.

An element underflows on a cast to ``dst`` when it is finite, nonzero and ``x.to(dst) == 0``.
Rounding is monotone in |x|, so that set is ``0 < |x| <= t`` for one threshold ``t`` per
(source, destination) pair. Rather than deriving ``t`` from format tables (and getting ties,
double rounding through float32 and the fp8 variants subtly wrong), it is found by bisection
over the source dtype's bit patterns with the real cast, once per pair.

Overflow follows DESIGN.md: finite elements with ``|x| > finfo(dst).max``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .errors import ConfigError

MAX_CAST_DTYPES = 8

_INT_OF_WIDTH = {8: torch.uint8, 16: torch.int16, 32: torch.int32, 64: torch.int64}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``."""
    return str(dtype).removeprefix("torch.")


def _has_finfo(dtype: torch.dtype) -> bool:
    try:
        torch.finfo(dtype).max  # noqa: B018 - packed formats (float4_e2m1fn_x2) have no finfo
    except (TypeError, RuntimeError):
        return False
    return True


@functools.lru_cache(maxsize=1)
def float_dtypes() -> tuple[str, ...]:
    dtypes = {v for v in vars(torch).values() if isinstance(v, torch.dtype) and v.is_floating_point}
    return tuple(sorted(dtype_name(d) for d in dtypes if _has_finfo(d)))


def resolve_dtype(spec: object, *, what: str) -> torch.dtype:
    """A floating dtype from ``torch.float16`` or ``"float16"``; ConfigError otherwise."""
    dtype = spec
    if isinstance(spec, str):
        dtype = getattr(torch, spec.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or dtype_name(dtype) not in float_dtypes():
        raise ConfigError(
            f"{what}: {spec!r} is not a floating-point torch dtype; use one of {', '.join(float_dtypes())}"
        )
    return dtype


def normalize_cast_dtypes(cast_dtypes: Iterable[object] | None) -> tuple[str, ...]:
    """Validate ``cast_dtypes`` and return canonical names, in order, without repeats."""
    if cast_dtypes is None:
        return ()
    if isinstance(cast_dtypes, (str, torch.dtype)):
        raise ConfigError(
            f"cast_dtypes must be a sequence of dtypes, got the single value {cast_dtypes!r}; "
            f"write cast_dtypes=({cast_dtypes!r},)"
        )
    if not isinstance(cast_dtypes, Iterable):
        raise ConfigError(f"cast_dtypes must be a sequence of dtypes (names or torch dtypes), got {cast_dtypes!r}")
    names: list[str] = []
    for spec in cast_dtypes:
        name = dtype_name(resolve_dtype(spec, what="cast_dtypes"))
        if name not in names:
            names.append(name)
    if len(names) > MAX_CAST_DTYPES:
        raise ConfigError(f"cast_dtypes holds {len(names)} dtypes; at most {MAX_CAST_DTYPES} are supported")
    return tuple(names)


@dataclass(frozen=True)
class CastPlan:
    """What the statistics of one source dtype compare against.

    Attributes:
        names: cast dtype names, in the order of ``under`` and ``over``.
        tiny: smallest normal number of the source dtype (subnormal bound).
        under: per cast dtype, the largest |x| that still becomes 0 (0.0 if none does).
        over: per cast dtype, ``finfo(dst).max``.
        src_max: ``finfo(src).max`` (no value of the source dtype exceeds an ``over`` above it).
    """

    names: tuple[str, ...]
    tiny: float
    under: tuple[float, ...]
    over: tuple[float, ...]
    src_max: float = float("inf")


def _from_bits(bits: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor([bits], dtype=_INT_OF_WIDTH[torch.finfo(dtype).bits]).view(dtype)


def _bits_of(value: float, dtype: torch.dtype) -> int:
    return int(torch.tensor([value], dtype=torch.float64).to(dtype).view(_INT_OF_WIDTH[torch.finfo(dtype).bits]))


def _casts_to_zero(bits: int, src: torch.dtype, dst: torch.dtype) -> bool:
    return float(_from_bits(bits, src).to(dst).to(torch.float64)) == 0.0


@functools.cache
def underflow_threshold(src: torch.dtype, dst: torch.dtype) -> float:
    """Largest positive finite ``src`` value ``v`` with ``v.to(dst) == 0`` (0.0 if none)."""
    # Positive finite values of an IEEE-like format, read as integers, are ordered like the values.
    lo, hi = 0, _bits_of(torch.finfo(src).max, src)
    if _casts_to_zero(hi, src, dst):
        return float(torch.finfo(src).max)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _casts_to_zero(mid, src, dst):
            lo = mid
        else:
            hi = mid
    return float(_from_bits(lo, src).to(torch.float64))


@functools.cache
def cast_plan(src: torch.dtype, names: tuple[str, ...]) -> CastPlan:
    """The thresholds for tensors of dtype ``src`` against the cast dtypes ``names``."""
    dsts = [getattr(torch, name) for name in names]
    return CastPlan(
        names=names,
        tiny=float(torch.finfo(src).tiny),
        under=tuple(underflow_threshold(src, dst) for dst in dsts),
        over=tuple(float(torch.finfo(dst).max) for dst in dsts),
        src_max=float(torch.finfo(src).max),
    )
