"""Accumulators for every output position measured on one device, in fixed slots.

One :class:`DeviceTable` per (watch, device). Every measurement is merged into the slot of its
output position by one device-side operation (the Triton kernel on CUDA, torch ops elsewhere),
so nothing waits for the device in a hook, and a captured CUDA graph or a compiled forward keeps
counting on replay: the slots' addresses never change once a table exists.

Layout (``H`` = 2 halves, ``C`` = slot capacity, ``K`` = cast dtypes)::

    counts   int64   [H, C, 7 + 2K]  calls, finite, nan, posinf, neginf, zeros, subnormal, under.., over..
    moments  float64 [H, C, 4]       mean, m2 (over finite elements), min, max
    nfcalls  int64   [H, C, 2]       first and last call index with NaN/Inf in this window
    control  int64   [4]             root calls, sampling flag, active half, NaN/Inf in the current call

Measurements go to the *active* half. A flush flips ``control[ACTIVE]`` on the device (ordered
after every measurement already queued), copies the other half to pinned host memory on a side
stream, then clears it there; the serving thread never waits for the copy.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch

from ._transfer import copy_to_host

CALLS, ENABLED, ACTIVE, CALL_NONFINITE = range(4)
# counts columns
C_CALLS, C_FINITE, C_NAN, C_POSINF, C_NEGINF, C_ZEROS, C_SUBNORMAL = range(7)
N_FIXED = 7
NO_CALL = 2**62  # "never" for the first-call column


def n_counts(k: int) -> int:
    return N_FIXED + 2 * k


@dataclass
class WindowRead:
    """One flushed half, on the host: per slot key, raw statistics and non-finite call range."""

    stats: dict[Hashable, tuple]  # key -> (calls, raw tuple as in _accumulators)
    nonfinite: dict[Hashable, tuple[int, int]]  # key -> (first call, last call)
    root_calls: int  # the device's root-call counter when read


class DeviceTable:
    """Slots for the output positions measured on ``device``; see the module docstring."""

    def __init__(self, device: torch.device, k: int, capacity: int) -> None:
        self.device = device
        self.k = k
        self.capacity = capacity
        self.slots: dict[Hashable, int] = {}
        self.keys: list[Hashable] = []
        self.active = 0  # host mirror of control[ACTIVE]
        self._lock = threading.Lock()
        self._reset_done: torch.cuda.Event | None = None
        self._side: torch.cuda.Stream | None = None
        # pinned host buffers for flushed halves, reused once the worker has decoded them
        self._free_host: list[tuple[torch.Tensor, ...]] = []
        with torch.inference_mode(False), torch.no_grad():
            self.counts = torch.zeros(2, capacity, n_counts(k), dtype=torch.int64, device=device)
            self.moments = torch.zeros(2, capacity, 4, dtype=torch.float64, device=device)
            self.nfcalls = torch.zeros(2, capacity, 2, dtype=torch.int64, device=device)
            self.control = torch.zeros(4, dtype=torch.int64, device=device)
            self.control[ENABLED] = 1
            self._clear(slice(None))
        if device.type == "cuda":
            mark_static(self.counts, self.moments, self.nfcalls, self.control)
            self._free_host = [self._new_host_buffers(), self._new_host_buffers()]
        self.kernel: Any = None  # the fused-kernel module for this device, if any (set by the watch)
        self.scratch: Any = None  # that kernel's per-slot workspace
        self.grouped: Any = None  # the kernel module whose merge_group measures a call's small outputs at once

    def tick(self, every: int) -> None:
        """Graph path of a root call: count it and decide sampling, on the device."""
        self.control[CALLS] += 1
        self.control[ENABLED] = ((self.control[CALLS] - 1) % every == 0).to(torch.int64)

    def root_calls(self) -> int:
        """Root calls counted on the device so far (waits for it)."""
        return int(self.control[CALLS])

    def slot(self, key: Hashable, *, tracing: bool = False) -> int | None:
        """The slot of ``key``, assigned on first use; None when the table is full.

        ``tracing``: called while torch.compile traces, which cannot enter a lock (and runs
        one trace at a time).
        """
        slot = self.slots.get(key)
        if slot is not None:
            return slot
        if tracing:
            return self._assign(key)
        with self._lock:  # another thread may have assigned it meanwhile
            slot = self.slots.get(key)
            return slot if slot is not None else self._assign(key)

    def _assign(self, key: Hashable) -> int | None:
        if len(self.keys) >= self.capacity:
            return None
        slot = self.slots[key] = len(self.keys)
        self.keys.append(key)
        return slot

    def _clear(self, half: int | slice) -> None:
        # fill_ with Python scalars: kernel arguments, never a host-to-device copy
        self.counts[half].zero_()
        self.moments[half].zero_()
        self.moments[half][..., 2].fill_(math.inf)
        self.moments[half][..., 3].fill_(-math.inf)
        self.nfcalls[half][..., 0].fill_(NO_CALL)
        self.nfcalls[half][..., 1].fill_(-1)

    def flip(self) -> tuple[int, object]:
        """Send new measurements to the other half; start copying the finished one to the host.

        Returns the finished half and a handle for :meth:`read`; nothing here waits for the device.
        """
        with torch.no_grad(), torch.inference_mode(False):
            done = self.active
            if self.device.type == "cuda":
                stream = torch.cuda.current_stream(self.device)
                if self._reset_done is not None:
                    stream.wait_event(self._reset_done)  # the half we switch to was cleared
                self.control[ACTIVE].fill_(1 - done)
                self.active = 1 - done
                flipped = torch.cuda.Event()
                flipped.record(stream)
                if self._side is None:
                    self._side = torch.cuda.Stream(self.device)
                self._side.wait_event(flipped)
                copy = copy_to_host(self._half(done), stream=self._side, out=self._host_buffers())
                with torch.cuda.stream(self._side):  # after the copy, in stream order
                    self._clear(done)
                    self._reset_done = torch.cuda.Event()
                    self._reset_done.record(self._side)
                return done, (copy, list(self.keys))
            self.control[ACTIVE].fill_(1 - done)
            self.active = 1 - done
            copy = copy_to_host(self._half(done))
            self._clear(done)
            return done, (copy, list(self.keys))

    def _half(self, half: int) -> tuple[torch.Tensor, ...]:
        return (self.counts[half], self.moments[half], self.nfcalls[half], self.control)

    def _new_host_buffers(self) -> tuple[torch.Tensor, ...]:
        pin = self.device.type == "cuda"
        return tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=pin) for t in self._half(0))

    def _host_buffers(self) -> tuple[torch.Tensor, ...]:
        try:
            return self._free_host.pop()  # atomic under the GIL; the worker appends
        except IndexError:  # the worker is behind: one more buffer set
            return self._new_host_buffers()

    def read(self, handle: object) -> WindowRead:
        """Wait for a :meth:`flip`'s copy (off the serving thread) and decode it."""
        copy, keys = handle  # type: ignore[misc]
        host = copy.wait()
        try:
            return decode(*host, keys, self.k)
        finally:
            if self.device.type == "cuda":
                self._free_host.append(host)

    def read_active(self) -> WindowRead:
        """The half being written now (waits for the device; for snapshots)."""
        with torch.no_grad():
            half = self.active
            counts, moments, nfcalls, control = (t.cpu() for t in self._half(half))
        return decode(counts, moments, nfcalls, control, list(self.keys), self.k)

    def reset(self) -> None:
        """Clear both halves (waits for the device)."""
        with torch.no_grad(), torch.inference_mode(False):
            if self._side is not None:
                self._side.synchronize()
            self._clear(slice(None))


def mark_static(*tensors: torch.Tensor) -> None:
    """Tell torch.compile these tensors never move: CUDA graphs (``mode="reduce-overhead"``)
    may then update them in place instead of refusing the graph."""
    mark = getattr(torch._dynamo, "mark_static_address", None)
    if mark is not None:
        for t in tensors:
            mark(t)


def decode(
    counts: torch.Tensor, moments: torch.Tensor, nfcalls: torch.Tensor, control: torch.Tensor, keys: list, k: int
) -> WindowRead:
    c = counts.tolist()
    m = moments.tolist()
    nf = nfcalls.tolist()
    stats, nonfinite = {}, {}
    for slot, key in enumerate(keys):
        row = c[slot]
        if row[C_CALLS] == 0:
            continue
        mean, m2, lo, hi = m[slot]
        raw = (
            *row[C_FINITE : C_SUBNORMAL + 1],
            mean,
            m2,
            lo,
            hi,
            tuple(row[N_FIXED : N_FIXED + k]),
            tuple(row[N_FIXED + k :]),
        )
        stats[key] = (row[C_CALLS], raw)
        if nf[slot][1] >= 0:
            nonfinite[key] = (nf[slot][0], nf[slot][1])
    return WindowRead(stats=stats, nonfinite=nonfinite, root_calls=int(control[CALLS]))
