"""Integer frequency sketches: token ids, categorical inputs, predicted classes.

:class:`IdStats` holds exact counts for values in ``[0, exact)`` (special tokens, padding,
classes), a hashed count table for the rest, and a ring of recent values that names heavy hashed
buckets. The accumulator runs on the data's device with torch operations (no host sync); on CPU
one pass of the C extension, or the torch ops where it was not built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .._schema import Fields
from .._transfer import HostCopy, copy_to_host, state_mode
from ..errors import FormatError
from ..kernels import cpu as cpu_kernel

__all__ = ["IdStats"]

_P = 2_147_483_647  # 2**31 - 1: ids are reduced modulo this prime before hashing
_A, _B = 1_103_515_245, 12_345
RING = 256  # recent ids kept per integer input (names heavy hashed buckets)
RING_PER_CALL = 16
TOP = 10
ID_DTYPES = frozenset({torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8})


def resolve_path(device: torch.device, path: str | None) -> str:
    """How a monitor computes on ``device``: ``"c"`` (one pass of the C extension) on CPU where it
    was built, else ``"torch"`` ops (the device path; on CPU its twin, forced with ``path="torch"``)."""
    if device.type != "cpu" or path == "torch" or not cpu_kernel.available:
        return "torch"
    return "c"


def hashed_bucket(value: int, buckets: int) -> int:
    """The hashed bucket of an integer outside the exact range (host oracle of the device op)."""
    return ((value % _P) * _A + _B) % _P % buckets


class IdAccumulator:
    """Device-side counts for one integer input (or the predicted classes of an output).

    ``state`` (int64): [count, min, max, ring position, counts[exact + hashed], ring[RING]].
    On CPU the same arithmetic runs in one pass of the C extension (``kernels.cpu.id_counts``: ~1 us
    for 128 ids, where each torch op costs ~5-20 us), or in the torch ops where it was not built;
    ``path="torch"`` forces the device path on CPU (its twin, tested against the C pass).
    """

    def __init__(self, device: torch.device, exact: int, hashed: int, *, path: str | None = None) -> None:
        self.exact, self.hashed = exact, hashed
        self._base = 4
        self._ring = 4 + exact + hashed
        with state_mode():
            self.state = torch.zeros(self._ring + RING, dtype=torch.int64, device=device)
        self.path = path = resolve_path(device, path)
        self._fresh()

    def _fresh(self) -> None:
        big = torch.iinfo(torch.int64)
        with torch.no_grad():
            self.state[1] = big.max
            self.state[2] = big.min

    def add(self, ids: torch.Tensor) -> None:
        if self.path == "c":  # fewest tensor calls: each costs microseconds on a small CPU
            v = ids if ids.dtype is torch.int64 and ids.is_contiguous() else ids.to(torch.int64).contiguous()
            n = v.numel()
            if n:
                cpu_kernel.id_counts(
                    v.data_ptr(), n, self.state.data_ptr(), self.exact, self.hashed, RING, RING_PER_CALL
                )
            return
        v = ids.detach().reshape(-1)
        n = v.numel()
        if n == 0:
            return
        v = v.to(torch.int64)
        s = self.state
        s[0:1] += n
        torch.minimum(s[1:2], v.min().reshape(1), out=s[1:2])
        torch.maximum(s[2:3], v.max().reshape(1), out=s[2:3])
        inside = (v >= 0) & (v < self.exact)
        bucket = torch.remainder(torch.remainder(v, _P) * _A + _B, _P).remainder_(self.hashed).add_(self.exact)
        s[self._base : self._ring].index_add_(0, torch.where(inside, v, bucket), torch.ones_like(v))
        m = min(n, RING_PER_CALL)
        sample = v[:: max(1, n // m)][:m]
        where = (s[3] + torch.arange(sample.numel(), device=v.device)).remainder_(RING)
        s[self._ring :].index_copy_(0, where, sample)
        s[3:4] += sample.numel()

    def take(self, *, keep: bool = False) -> HostCopy:
        """Start a host copy of the counts (see :func:`torchwatch._transfer.copy_to_host`); unless ``keep``, the
        accumulator restarts (the ring is kept: it names buckets)."""
        out = copy_to_host([self.state])
        if keep:
            return out
        self.state[: self._ring].zero_()
        self._fresh()
        return out


@dataclass(frozen=True)
class IdStats:
    """Frequencies of an integer input (or of predicted classes) over an interval or since a reset.

    Attributes:
        count: values seen. ``min``/``max``: their range (None when no value).
        exact: how many values are counted exactly (``[0, exact)``); ``counts[:exact]`` are those
            counts and ``counts[exact:]`` the hashed buckets of all other values.
        recent: a sample of recent values (names the values behind heavy hashed buckets).
    """

    count: int
    min: int | None
    max: int | None
    exact: int
    counts: np.ndarray = field(repr=False)
    recent: tuple[int, ...] = field(default=(), repr=False)

    @classmethod
    def from_state(cls, state: np.ndarray, exact: int, hashed: int) -> IdStats:
        count = int(state[0])
        ring_at = 4 + exact + hashed
        filled = min(int(state[3]), RING)
        return cls(
            count=count, min=int(state[1]) if count else None, max=int(state[2]) if count else None, exact=exact,
            counts=state[4:ring_at].astype(np.int64), recent=tuple(int(x) for x in state[ring_at : ring_at + filled]),
        )  # fmt: skip

    def merge(self, other: IdStats) -> IdStats:
        if not other.count:
            return self
        if not self.count:
            return other
        return IdStats(
            self.count + other.count, min(self.min, other.min), max(self.max, other.max), self.exact,
            self.counts + other.counts, (self.recent + other.recent)[-RING:],
        )  # fmt: skip

    @property
    def top1_fraction(self) -> float:
        """Share of the most frequent value (an upper bound when it is hashed): 1.0 for constant or
        padding-only inputs."""
        return float(self.counts.max()) / self.count if self.count else math.nan

    @property
    def distinct(self) -> float:
        """Distinct values: exact below ``exact``, a linear-counting estimate above."""
        if not self.count:
            return 0.0
        exact = int(np.count_nonzero(self.counts[: self.exact]))
        buckets = self.counts[self.exact :]
        empty = int(np.count_nonzero(buckets == 0))
        hashed = len(buckets) if empty == 0 else -len(buckets) * math.log(empty / len(buckets))
        return exact + hashed

    def top(self, k: int = TOP) -> list[tuple[int | None, int, bool]]:
        """The ``k`` most frequent values as ``(value, count, exact)``; a hashed bucket is named by
        a recent value that falls in it (None when none does) and its count is an upper bound."""
        order = np.argsort(-self.counts, kind="stable")[:k]
        names: dict[int, int] = {}
        hashed = len(self.counts) - self.exact
        for v in self.recent:
            if not 0 <= v < self.exact:
                names.setdefault(self.exact + hashed_bucket(v, hashed), v)
        out = []
        for i in order:
            c = int(self.counts[i])
            if c == 0:
                break
            out.append((int(i), c, True) if i < self.exact else (names.get(int(i)), c, False))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count, "min": self.min, "max": self.max, "top1_fraction": self.top1_fraction,
            "distinct": self.distinct, "top": [list(t) for t in self.top()],
        }  # fmt: skip

    @staticmethod
    def summary_from_json(f: Fields) -> dict[str, Any]:
        """The :meth:`to_dict` summary read back from JSON, every field checked (FormatError)."""
        top = []
        for item in f.list("top"):
            ok = isinstance(item, list) and len(item) == 3 and (item[0] is None or type(item[0]) is int)
            if not (ok and type(item[1]) is int and isinstance(item[2], bool)):
                raise FormatError(f"{f.where}: field 'top' must hold [value, count, exact] items, got {item!r}")
            top.append(tuple(item))
        return {
            "count": f.count("count"), "min": f.int("min", None), "max": f.int("max", None),
            "top1_fraction": f.float("top1_fraction"), "distinct": f.float("distinct"), "top": top,
        }  # fmt: skip


# ---- inputs ------------------------------------------------------------------------------------
