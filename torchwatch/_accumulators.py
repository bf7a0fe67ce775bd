"""Running totals for one output position: on the host for CPU tensors, on the device otherwise.

A raw measurement (from :mod:`torchwatch.kernels`) is the tuple
``(finite, nan, posinf, neginf, zeros, subnormal, mean, m2, min, max, under, over)``;
``mean``/``m2`` are over finite elements, ``min``/``max`` are +inf/-inf when there were none.

Host accumulators take raw tuples with ``add(raw)`` and report ``state() -> (calls, raw totals)``:
the C ``_cstats.Accumulator`` where the kernel was built, else :class:`HostAccumulator`.
Accelerator measurements go to a :class:`torchwatch._table.DeviceTable` instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch

from .stats import ModuleStats, chan

Raw = tuple  # (finite, nan, posinf, neginf, zeros, subnormal, mean, m2, min, max, under, over)

N_INT = 6  # finite, nan, posinf, neginf, zeros, subnormal: the leading ints of raw and packed forms


class Accumulator(Protocol):
    def state(self) -> tuple[int, Raw]: ...


def to_module_stats(acc: Accumulator, names: Sequence[str]) -> ModuleStats:
    """The accumulator's totals as :class:`ModuleStats`."""
    return stats_from_raw(*acc.state(), names)


def stats_from_raw(calls: int, raw: Raw, names: Sequence[str]) -> ModuleStats:
    """``calls`` measurements merged into one raw tuple, as :class:`ModuleStats`."""
    finite, nan, posinf, neginf, zeros, subnormal, mean, m2, lo, hi, under, over = raw
    return ModuleStats(
        calls=calls,
        count=finite + nan + posinf + neginf,
        mean=mean if finite else math.nan,
        std=math.sqrt(max(m2, 0.0) / finite) if finite else math.nan,
        min=lo if finite else math.nan,
        max=hi if finite else math.nan,
        absmax=max(-lo, hi) if finite else math.nan,
        nan=nan,
        posinf=posinf,
        neginf=neginf,
        zeros=zeros,
        subnormal=subnormal,
        underflow=dict(zip(names, under, strict=True)),
        overflow=dict(zip(names, over, strict=True)),
    )


class HostAccumulator:
    """Totals kept as Python numbers: exact integers, float64 moments.

    The compiled kernel provides the same interface in C (``_cstats.Accumulator``), which
    :func:`torchwatch.kernels.cpu.new_host_accumulator` prefers; this class is used where it was not built.
    """

    __slots__ = ("calls", "ints", "m2", "max", "mean", "min", "over", "under")

    def __init__(self, k: int) -> None:
        self.calls = 0
        self.ints = [0] * N_INT
        self.mean = 0.0
        self.m2 = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.under = [0] * k
        self.over = [0] * k

    def add(self, raw: Raw) -> None:
        ints = self.ints
        _, self.mean, self.m2 = chan(ints[0], self.mean, self.m2, raw[0], raw[6], raw[7])
        for i in range(N_INT):
            ints[i] += raw[i]
        self.min = min(self.min, raw[8])
        self.max = max(self.max, raw[9])
        for i, c in enumerate(raw[10]):
            self.under[i] += c
        for i, c in enumerate(raw[11]):
            self.over[i] += c
        self.calls += 1

    def state(self) -> tuple[int, Raw]:
        return self.calls, (*self.ints, self.mean, self.m2, self.min, self.max, tuple(self.under), tuple(self.over))


def unpack(ints: torch.Tensor, floats: torch.Tensor, k: int) -> Raw:
    """Packed tensors as a raw tuple (a device-to-host copy)."""
    i = ints.tolist()
    return (*i[:N_INT], *floats.tolist(), tuple(i[N_INT : N_INT + k]), tuple(i[N_INT + k :]))
