"""Would-underflow / would-overflow thresholds, learned from torch's own casts.

An element underflows on a cast to ``dst`` when it is finite, nonzero and ``x.to(dst) == 0``.
Rounding is monotone in |x|, so that set is ``0 < |x| <= t`` for one threshold ``t`` per
(source, destination) pair. Rather than deriving ``t`` from format tables (and getting ties,
double rounding through float32 and the fp8 variants subtly wrong), it is found by bisection
over the source dtype's bit patterns with the real cast, once per pair.

Overflow follows DESIGN.md: finite elements with ``|x| > finfo(dst).max``.

A thread on which ``torch.set_flush_denormal(True)`` is on reads and writes subnormals as 0 in
hardware conversions, so zeros and threshold values are read by their bits here: the thresholds
are the same in either mode, except for casts to or from float64, whose conversion torch does in
hardware on that thread.
"""

from __future__ import annotations

import functools
import math
import struct
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


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)

# Thresholds near the bottom of the float range are subnormal in float32. On a thread where
# torch.set_flush_denormal(True) is on, every hardware conversion of a subnormal (float32 <->
# float64, float32 <- double) reads or writes it as 0, so the conversions below are integer arithmetic.


def float32_bits(value: float) -> int:
    """The float32 bit pattern of ``value`` (a threshold: a value float32 holds exactly, else cut
    toward zero; beyond float32's range, infinity's)."""
    a = abs(value)
    sign = 0x80000000 if math.copysign(1.0, value) < 0 else 0
    if a == 0 or a > _FLOAT32_MAX:
        return sign | (0x7F800000 if a else 0)
    m, e = math.frexp(a)  # a = m * 2**e, 1/2 <= m < 1
    if e - 1 >= -126:  # a normal float32: 1.f * 2**(e - 1)
        return sign | ((e + 126) << 23) | (int(math.ldexp(m, 24)) - (1 << 23))
    return sign | int(math.ldexp(a, 149))  # a subnormal: f * 2**-149


def float32_value(bits: int) -> float:
    """The value of a float32 bit pattern of a finite number."""
    e, f = (bits >> 23) & 0xFF, bits & 0x7FFFFF
    value = math.ldexp(f + (1 << 23 if e else 0), (e or 1) - 150)
    return -value if bits & 0x80000000 else value


def _value_of(bits: int, src: torch.dtype) -> float:
    """The value of a finite ``src`` bit pattern as a Python float."""
    if src == torch.float64:
        return struct.unpack("<d", struct.pack("<q", bits))[0]  # a copy of the bits, no conversion
    # every narrower format widens to float32 by integer operations in torch (float16 and float8
    # subnormals are float32 normals, bfloat16 shifts its bits)
    return float32_value(int(_from_bits(bits, src).to(torch.float32).view(torch.int32)))


def _casts_to_zero(bits: int, src: torch.dtype, dst: torch.dtype) -> bool:
    # the result's bits, widened as _value_of widens (float8_e8m0fnu has no zero: its pattern 0 is
    # 2**-127), since a flushing thread would read a subnormal result as 0
    out = _from_bits(bits, src).to(dst)
    if dst == torch.float64:
        return int(out.view(torch.int64)) & 0x7FFFFFFFFFFFFFFF == 0
    return int(out.to(torch.float32).view(torch.int32)) & 0x7FFFFFFF == 0


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
    return _value_of(lo, src)


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
