"""Which small device outputs wait for their call's grouped launch, and the launches themselves.

A position (a device table's slot) starts unknown: its output is measured at once and probed
(``pending.py``): was it changed in place later in the call? The answer decides it for good:

* unchanged: from then on its output waits for the call's grouped launch (*held*);
* changed: it is measured at once from then on.

Probes are checked at the call's end only, whatever is launched before it (held bytes at their
bound, a new stream): a check made earlier would not see the rest of the call.

A probe of an inference tensor compares a copy on the device; its answer is read once the device
has finished (an event queried at later launches, never waited for), and until then the
position stays unknown (measured at once, not probed twice at a time). A held inference output
has no version counter to catch a later change of control flow, so every ``REPROBE_EVERY``-th
call probes held inference positions again: a change found is counted in
``watch.errors[MODIFIED_IN_PLACE]``, warned once, and the position is measured at once from then
on; calls between two reprobes of such a model may have measured the changed values.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable
from typing import Any

import torch

from ..._casts import CastPlan
from ..._table import DeviceTable
from ...kernels import torch_ops
from ..base import Call
from .pending import MODIFIED_IN_PLACE, Pending

GROUPED_LAUNCH_FAILED = "grouped launches failed"  # then measured one by one, and grouping turned off
REPROBE_EVERY = 256  # calls between two probes of the held inference positions
_NO_CONTEXT = contextlib.nullcontext()
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # compare as bits: NaN == NaN


class Grouping:
    """Holding, probing and grouped launches for one monitor's device tables."""

    def __init__(self, bus: Any, device_lock: Any) -> None:
        self._bus = bus
        self._device_lock = device_lock
        self._holdable: dict[tuple[int, int], bool] = {}  # position -> its output may wait for the call's end
        self._copying: dict[tuple[int, int], int] = {}  # position -> copy probes whose answer is not read yet
        self._answers: list[tuple[list[tuple[int, int]], torch.Tensor, Any, bool]] = []
        self._lock = threading.Lock()  # the two above: calls end in several threads
        self._calls = itertools.count(1)

    def measure(self, call: Call, table: DeviceTable, slot: int, x: torch.Tensor, plan: CastPlan) -> None:
        """Measure (or hold) ``x``, a detached device tensor of ``call``, into ``slot``."""
        pending = call.pending
        if pending is None:
            pending = call.pending = Pending(reprobe=next(self._calls) % REPROBE_EVERY == 0)
        position = (id(table), slot)
        inference = x.is_inference()
        state = False
        if table.grouped is not None and table.grouped.groupable(x, table.k):
            state = self._holdable.get(position)
            if state and pending.reprobe and inference:
                state = None
        stream = torch.cuda.current_stream(x.device) if x.is_cuda else None
        if state:
            if pending.blocks(table, slot, stream):
                self.launch(call, final=False)
            if pending.add(table, slot, x, plan, stream):
                self.launch(call, final=False)
            return
        with self._device_lock, torch.no_grad():
            merge_for(table, x)(table, slot, x, plan, call.index, use_flag=False)
        if state is None and not (inference and self._copying.get(position)):
            with self._lock:
                if pending.probe(table, slot, x, stream) and inference:
                    self._copying[position] = self._copying.get(position, 0) + 1

    def finish(self, call: Call) -> None:
        """At the end of a root call: launch what it holds and learn from its probes."""
        if call.pending is not None and call.pending.waiting:
            self.launch(call, final=True)
        elif self._answers:
            self._read_answers()

    def launch(self, call: Call, *, final: bool) -> None:
        """Measure everything the call holds (one grouped launch per table and dtype) and learn
        from its probes; ``final`` at the call's end."""
        taken = call.pending.take(final=final)
        stream = torch.cuda.stream(taken.stream) if taken.stream is not None else _NO_CONTEXT
        with self._device_lock, torch.no_grad(), stream:
            for table, plan, items in taken.groups:
                try:
                    table.grouped.merge_group(table, items, plan, call.index)
                except Exception as exc:  # noqa: BLE001 - measured one by one instead; grouping is off
                    self._grouping_failed(table, exc)
                    for x, slot in items:
                        merge_for(table, x)(table, slot, x, plan, call.index, use_flag=False)
            if taken.copies:
                self._compare(taken.copies, reprobe=call.pending.reprobe)
        for position, unchanged in taken.seen:
            if not unchanged:
                self._holdable[position] = False
            elif position not in self._holdable:
                self._holdable[position] = True
        if taken.dropped:
            self._changed(taken.dropped, f"their version counter moved; not measured on call {call.index}")
        if self._answers:
            self._read_answers()

    def _compare(self, copies: list, *, reprobe: bool) -> None:
        """Queue, on the device, whether each inference probe's output still equals its copy
        (bit for bit: a NaN equals itself), on the stream that wrote it, and the answers' copy to
        the host."""
        by_stream: dict[Any, list] = {}
        for position, x, copy, stream in copies:
            by_stream.setdefault(stream, []).append((position, x, copy))
        for stream, items in by_stream.items():
            with torch.cuda.stream(stream) if stream is not None else _NO_CONTEXT:
                changed = torch.stack([x.view(_BITS[x.element_size()]).ne(c.view(_BITS[x.element_size()])).any()
                                       for _, x, c in items])  # fmt: skip
                event = None
                if changed.is_cuda:
                    changed = changed.to("cpu", non_blocking=True)  # pinned: read after the event, no wait
                    event = torch.cuda.Event()
                    event.record()
            with self._lock:
                self._answers.append(([position for position, _, _ in items], changed, event, reprobe))

    def _read_answers(self) -> None:
        """Learn from the inference probes the device has finished comparing (never waits)."""
        changed_held = 0
        with self._lock:
            ready, waiting = [], []
            for answer in self._answers:
                (ready if answer[2] is None or answer[2].query() else waiting).append(answer)
            self._answers = waiting
            for positions, changed, _, reprobe in ready:
                # a host tensor (pinned, its copy finished: the event said so), so no wait here
                for position, moved in zip(positions, changed.tolist(), strict=True):
                    self._copying[position] -= 1
                    if moved:
                        changed_held += reprobe and self._holdable.get(position) is True
                        self._holdable[position] = False
                    elif position not in self._holdable:
                        self._holdable[position] = True
        if changed_held:
            self._changed(
                changed_held, "found by a periodic probe: calls since the last probe may have measured them changed"
            )

    def _changed(self, n: int, how: str) -> None:
        self._bus.count(MODIFIED_IN_PLACE, n)
        self._bus.warn_once(
            "modified-in-place",
            f"{n} output(s) held for their call's grouped launch were changed in place after their hook "
            f"({how}; counted in watch.errors[{MODIFIED_IN_PLACE!r}]); those positions are measured at once "
            "from now on.",
        )

    def _grouping_failed(self, table: DeviceTable, exc: Exception) -> None:
        """A grouped launch failed: its outputs are measured one launch each, and so is every
        later output on that device (counted, warned once)."""
        table.grouped = None
        self._bus.count(GROUPED_LAUNCH_FAILED)
        self._bus.warn_once(
            "grouped-launch",
            f"a grouped statistics launch on {table.device} failed ({type(exc).__name__}: {exc}); its outputs were "
            f"measured one launch each, as every output on that device will be from now on (counted in "
            f"watch.errors[{GROUPED_LAUNCH_FAILED!r}])",
        )


def merge_for(table: DeviceTable, x: torch.Tensor) -> Callable[..., None]:
    """The table's fused kernel where it takes this dtype, else the torch-ops twin."""
    kernel = table.kernel
    if kernel is not None and kernel.supports(x, table.k):
        return kernel.merge_into
    return torch_ops.merge_into
