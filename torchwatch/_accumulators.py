"""Running totals for one output position: on the host for CPU tensors, on the device otherwise.

A raw measurement (from :mod:`torchwatch.kernels`) is the tuple
``(finite, nan, posinf, neginf, zeros, subnormal, mean, m2, min, max, under, over)``;
``mean``/``m2`` are over finite elements, ``min``/``max`` are +inf/-inf when there were none.

Device measurements are the same fields packed in two tensors (``ints`` int64 and
``floats`` float64, see :func:`torchwatch.kernels.torch_ops.device_stats`); the device
accumulator merges them with tensor ops only, so nothing waits for the device until
:meth:`DeviceAccumulator.to_stats` is called at flush time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .stats import ModuleStats, chan

Raw = tuple  # (finite, nan, posinf, neginf, zeros, subnormal, mean, m2, min, max, under, over)

# Layout of the packed device tensors.
INT_FIELDS = ("finite", "nan", "posinf", "neginf", "zeros", "subnormal")
N_INT = len(INT_FIELDS)
FLOAT_FIELDS = ("mean", "m2", "min", "max")


def merge_raw(a: Raw, b: Raw) -> Raw:
    """Two raw measurements of disjoint parts of one tensor, as one."""
    n, mean, m2 = chan(a[0], a[6], a[7], b[0], b[6], b[7])
    return (
        n, a[1] + b[1], a[2] + b[2], a[3] + b[3], a[4] + b[4], a[5] + b[5],
        mean, m2, min(a[8], b[8]), max(a[9], b[9]),
        tuple(x + y for x, y in zip(a[10], b[10], strict=True)),
        tuple(x + y for x, y in zip(a[11], b[11], strict=True)),
    )  # fmt: skip


def _to_stats(
    calls: int, ints: Sequence[int], mean: float, m2: float, lo: float, hi: float,
    under: Sequence[int], over: Sequence[int], names: Sequence[str],
) -> ModuleStats:  # fmt: skip
    finite, nan, posinf, neginf, zeros, subnormal = ints
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
    """Totals kept as Python numbers: exact integers, float64 moments."""

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
        if raw[8] < self.min:
            self.min = raw[8]
        if raw[9] > self.max:
            self.max = raw[9]
        for i, c in enumerate(raw[10]):
            self.under[i] += c
        for i, c in enumerate(raw[11]):
            self.over[i] += c
        self.calls += 1

    def to_stats(self, names: Sequence[str]) -> ModuleStats:
        return _to_stats(self.calls, self.ints, self.mean, self.m2, self.min, self.max, self.under, self.over, names)


class DeviceAccumulator:
    """Totals kept in two small tensors on the measured tensor's device.

    Must be created outside ``torch.inference_mode`` (it is updated in place from both sides);
    :func:`new_device_accumulator` takes care of that.
    """

    __slots__ = ("calls", "floats", "ints")

    def __init__(self, k: int, device: torch.device) -> None:
        self.calls = 0
        self.ints = torch.zeros(N_INT + 2 * k, dtype=torch.int64, device=device)
        self.floats = torch.tensor([0.0, 0.0, math.inf, -math.inf], dtype=torch.float64, device=device)

    def add(self, ints: torch.Tensor, floats: torch.Tensor) -> None:
        """Merge one packed measurement; enqueues tensor ops only (no host sync)."""
        acc = self.floats
        n_a = self.ints[0].to(torch.float64)
        n_b = ints[0].to(torch.float64)
        w_b = n_b / (n_a + n_b).clamp(min=1.0)  # 0 when both are empty
        delta = floats[0] - acc[0]
        merged = torch.stack(
            (
                acc[0] + delta * w_b,
                acc[1] + floats[1] + delta * delta * n_a * w_b,
                torch.minimum(acc[2], floats[2]),
                torch.maximum(acc[3], floats[3]),
            )
        )
        acc.copy_(merged)
        self.ints.add_(ints)
        self.calls += 1

    def to_stats(self, names: Sequence[str]) -> ModuleStats:
        """Read the totals back (waits for the device)."""
        ints = self.ints.tolist()
        mean, m2, lo, hi = self.floats.tolist()
        k = len(names)
        return _to_stats(self.calls, ints[:N_INT], mean, m2, lo, hi, ints[N_INT : N_INT + k], ints[N_INT + k :], names)


def new_device_accumulator(k: int, device: torch.device) -> DeviceAccumulator:
    with torch.inference_mode(False), torch.no_grad():
        return DeviceAccumulator(k, device)
