"""The activation statistics of a window, and where NaN/Inf first appeared since the reset.

Host measurements accumulate here per ``(cohort, position)``; device measurements live in the
:class:`~torchwatch._table.DeviceTable` halves and arrive as window reads. :meth:`StatsWindow.take`
cuts a window (or copies it, for a snapshot) and :meth:`StatsWindow.collect` turns it into
:class:`~torchwatch.ModuleStats` handed to the engine (``ctx.positions``), which keeps the totals:
the one conversion used by flushes and snapshots alike.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Hashable, Iterable
from typing import Any

from ..._accumulators import stats_from_raw, to_module_stats
from ..._table import DeviceTable, WindowRead
from ...alerts import FirstNonFinite, nonfinite_alert
from ...kernels.cpu import new_host_accumulator, tensor_stats
from ...stats import ModuleStats
from ..base import Call, Collect
from .provenance import device_origins

MAX_TRACE_IDS = 4096  # recent call index -> trace id, to label device-side provenance

Key = tuple[str | None, str]  # (cohort, position)


@dataclasses.dataclass
class StatsCut:
    """A window cut (or copied) on the serving thread: host accumulators, device reads being
    copied (table, handle) or already read (table, WindowRead), the window's first NaN/Inf records."""

    window: dict[Key, Any]  # host accumulators (a flush) or their ModuleStats (a snapshot)
    reads: list[tuple[DeviceTable, Any]]
    nonfinite: dict[str, FirstNonFinite]
    copied: bool  # reads are WindowReads (a snapshot) rather than handles of a flip


@dataclasses.dataclass
class DeviceWindow:
    """Device window reads folded: statistics per (cohort, position), root calls replayed from
    graphs since the previous read, and the positions' first NaN/Inf records."""

    stats: list[tuple[Key, ModuleStats]] = dataclasses.field(default_factory=list)
    calls: int = 0
    sampled: int = 0
    nonfinite: dict[str, FirstNonFinite] = dataclasses.field(default_factory=dict)


class StatsWindow:
    """Window, totals and provenance of the activation statistics of one watch."""

    def __init__(self, cast_dtypes: tuple[str, ...], capacity: int, every: int) -> None:
        self.cast_dtypes = cast_dtypes
        self.capacity = capacity  # output positions per device and cohort
        self.every = every
        self._lock = threading.Lock()
        self._window: dict[Key, Any] = {}
        self._order: dict[str, None] = {}  # positions in first-measured order
        self._host_keys: set[Key] = set()  # host positions admitted (bounded like the tables' slots)
        self._first: dict[str, FirstNonFinite] = {}
        self._window_first: dict[str, FirstNonFinite] = {}
        self._trace_ids: collections.OrderedDict[int, str] = collections.OrderedDict()
        self._device_root_calls: dict[Any, int] = {}  # device call counters at the last read

    # ---- serving thread ----------------------------------------------------------------------

    def add(self, key: Key, k: int, raw: tuple) -> bool:
        """Add a host measurement; False when the position is beyond the capacity."""
        with self._lock:
            acc = self._window.get(key)
            if acc is None and (key in self._host_keys or len(self._host_keys) < self.capacity):
                self._host_keys.add(key)
                acc = self._window[key] = new_host_accumulator(k)
                self._order.setdefault(key[1])
            if acc is None:
                return False
            acc.add(raw)
            return True

    def measure(
        self, key: Key, k: int, address: int, numel: int, kernel: tuple, detail: list | None = None
    ) -> tuple[int, int, int] | bool | None:
        """Measure a dense CPU tensor with the C kernel (``kernel``: its dtype code, plan and exact
        flag) straight into the window: None, or ``(nan, posinf, neginf)`` when it held any;
        False when the position is beyond the capacity. The hooks' path for CPU tensors.
        ``detail``: a call's list that ``(position, raw)`` of this measurement is appended to.

        Lock-free: the C accumulator merges with the GIL held; one whose window was cut in the
        meantime hands the measurement back, and it goes to the new window."""
        acc = self._window.get(key)
        if acc is not None:
            raw = acc.measure(address, numel, *kernel, detail, key[1])
        else:
            raw = tensor_stats(address, numel, *kernel)
            if detail is not None:
                detail.append((key[1], raw))
        if raw is None or len(raw) == 3:
            return raw
        if not self.add(key, k, raw):
            return False
        return raw[1:4] if raw[1] or raw[2] or raw[3] else None

    def position(self, name: str, *, locked: bool = True) -> None:
        """A device position was measured (its place in execution order). ``locked=False`` in
        graph mode: torch.compile cannot trace a lock (and traces one graph at a time)."""
        if name in self._order:
            return
        if not locked:
            self._order.setdefault(name)
            return
        with self._lock:
            self._order.setdefault(name)

    def remember_trace(self, index: int, trace_id: str) -> None:
        with self._lock:
            self._trace_ids[index] = trace_id
            if len(self._trace_ids) > MAX_TRACE_IDS:
                self._trace_ids.popitem(last=False)

    def first_nonfinite(self, call: Call, names: Iterable[str], origin: str) -> None:
        """Record, for positions not seen non-finite before, that ``call`` was their first."""
        with self._lock:
            for name in names:
                if name not in self._first:
                    record = FirstNonFinite(name, call.index, call.trace_id, call.cohort, origin)
                    self._first[name] = self._window_first[name] = record

    def order_of(self, names: Iterable[str]) -> list[str]:
        """``names`` in first-measured order."""
        with self._lock:
            return [name for name in self._order if name in names]

    # ---- flush and snapshot ------------------------------------------------------------------

    def take(self, tables: list[DeviceTable], *, keep: bool) -> StatsCut | None:
        """Cut the window (flip the device tables: their copies start) or, with ``keep``, copy it
        (reads the tables' active halves: waits for the device)."""
        if keep:
            with self._lock:
                window = {key: to_module_stats(acc, self.cast_dtypes) for key, acc in self._window.items()}
                first = dict(self._window_first)
            return StatsCut(window, [(t, t.read_active()) for t in tables if t.keys], first, copied=True)
        with self._lock:
            window, self._window = self._window, {}
            first, self._window_first = self._window_first, {}
            _close(window.values())
        reads = [(t, t.flip()[1]) for t in tables if t.keys]
        if not (window or reads or first):
            return None
        return StatsCut(window, reads, first, copied=False)

    def collect(self, taken: StatsCut | None, ctx: Collect) -> None:
        """The window's statistics, in execution order, and its first NaN/Inf records, to the
        engine (``ctx.positions``; graph replays: ``ctx.replayed``). A flush (``ctx.fold``) also
        raises the NaN/Inf alerts of device positions."""
        if taken is None:  # a flush with nothing measured (a snapshot's take never returns None)
            return
        if taken.copied:
            stats = list(taken.window.items())
            reads = taken.reads
        else:
            stats = [(key, to_module_stats(acc, self.cast_dtypes)) for key, acc in taken.window.items()]
            reads = [(table, table.read(handle)) for table, handle in taken.reads]
        device, counts = self._device_reads(reads, advance=ctx.fold)
        stats += device.stats
        with self._lock:
            order = {name: i for i, name in enumerate(self._order)}
            new = {name: r for name, r in device.nonfinite.items() if name not in self._first}
            if ctx.fold:
                self._first.update(new)
        if ctx.fold:
            self._device_alerts(new, counts, ctx)
        stats.sort(key=lambda item: order.get(item[0][1], len(order)))  # stable: cohorts keep their order
        ctx.replayed(device.calls, device.sampled)
        ctx.positions(stats, {**taken.nonfinite, **{n: r for n, r in new.items() if n not in taken.nonfinite}})

    def _device_reads(
        self, reads: list[tuple[DeviceTable, WindowRead]], *, advance: bool
    ) -> tuple[DeviceWindow, dict[str, tuple[int, int, int]]]:
        """Fold device window reads: their statistics, the root calls replayed from graphs since the
        previous read (``advance``: now accounted for), where NaN/Inf first appeared, and the
        NaN/+Inf/-Inf counts of the positions that held any."""
        part = DeviceWindow()
        counts: dict[str, tuple[int, int, int]] = {}
        for table, read in reads:
            with self._lock:
                graph_calls = read.root_calls - self._device_root_calls.get(table.device, 0)
                if advance:
                    self._device_root_calls[table.device] = read.root_calls
            part.calls += graph_calls
            part.sampled += graph_calls if self.every == 1 else len(range(0, graph_calls, self.every))
            part.stats += [(key, stats_from_raw(n, raw, self.cast_dtypes)) for key, (n, raw) in read.stats.items()]
            counts.update({key[1]: tuple(raw[1:4]) for key, (_, raw) in read.stats.items() if any(raw[1:4])})
            for name, record in self._device_firsts(read.nonfinite).items():
                part.nonfinite.setdefault(name, record)
        return part, counts

    def _device_firsts(self, ranges: dict[Hashable, tuple[int, int]]) -> dict[str, FirstNonFinite]:
        """FirstNonFinite records for positions not seen non-finite before, from a device window."""
        with self._lock:
            order = {name: i for i, name in enumerate(self._order)}
            known = set(self._first)
            traces = dict(self._trace_ids)
        keyed = {key: r for key, r in ranges.items() if key[1] not in known}
        if not keyed:
            return {}
        origins = device_origins(ranges, {key: order.get(key[1], len(order)) for key in ranges})
        return {
            key[1]: FirstNonFinite(key[1], call, traces.get(call), key[0], origin[1])
            for key, (call, origin) in origins.items()
            if key in keyed
        }

    def _device_alerts(
        self, firsts: dict[str, FirstNonFinite], counts: dict[str, tuple[int, int, int]], ctx: Collect
    ) -> None:
        """NaN/Inf on the device this window (first or not) trips the watch; one alert per origin
        among the positions that went non-finite for the first time."""
        if counts:
            origin = next(iter(counts))
            ctx.bus.trip(nonfinite_alert(origin, counts[origin], spread=len(counts) - 1, call=-1, cohort=None,
                                         trace_id=None))  # fmt: skip
        by_origin: dict[tuple[str, int], list[FirstNonFinite]] = {}
        for record in firsts.values():
            by_origin.setdefault((record.origin, record.call), []).append(record)
        for (origin, call), records in sorted(by_origin.items(), key=lambda item: item[0][1]):
            ctx.alert(
                nonfinite_alert(
                    origin,
                    counts.get(origin, (1, 0, 0)),
                    spread=len(records) - 1,
                    call=call,
                    cohort=records[0].cohort,
                    trace_id=records[0].trace_id,
                )
            )

    def reset(self, tables: list[DeviceTable]) -> None:
        """Forget statistics and first NaN/Inf records (waits for the device)."""
        for table in tables:
            with self._lock:
                self._device_root_calls[table.device] = table.root_calls()
            table.reset()
        with self._lock:
            _close(self._window.values())
            self._window = {}
            self._order = {}
            self._first = {}
            self._window_first = {}


def _close(accumulators: Iterable[Any]) -> None:
    """Mark the C accumulators of a cut window: a measurement in flight goes to the next window."""
    for acc in accumulators:
        close = getattr(acc, "close", None)
        if close is not None:
            close()
