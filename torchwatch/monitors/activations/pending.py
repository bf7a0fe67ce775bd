"""Small accelerator outputs of one root call, measured by one grouped launch when it ends.

At batch 1 an activation is tens of kilobytes: reading it costs nothing, launching a kernel for
it is the cost (about 150 launches per BERT-base forward). So a hook only *records* an output a
grouped launch takes (``kernel.groupable``): the tensor, kept referenced, its slot, cast plan and
version counter. When the root call ends, one launch per (table, dtype) measures them all
(``kernel.merge_group``), on the stream that produced them.

**An output changed in place after its hook** (``out += identity`` in a residual block,
``nn.ReLU(inplace=True)`` on it) would be measured changed. Its version counter says so, so:

* a position is *probed* the first time it is seen: measured at once, and held only to compare
  its version when the call ends; unchanged, it is held from then on; changed, it is measured at
  once from then on;
* a held output whose version changed anyway (the model changed its control flow) is not
  measured for that call: counted in ``watch.errors[MODIFIED_IN_PLACE]``, measured at once from
  then on;
* an inference tensor (``torch.inference_mode()``) has no version counter: it is measured at once,
  never held. ``torch.no_grad()`` serving gets the grouped launch.

Bounds, each of which launches what is held before going on:

* at most ``HELD_BYTES`` held at once: the memory a forward would otherwise already have freed;
* a position already held in this call (a module run twice in one forward): two rows of one
  launch may not share a slot;
* a change of stream: the launch must follow, in stream order, the work that wrote the tensors,
  and the caching allocator reuses a freed tensor's memory only after work queued on its
  stream, which is where the launch goes.

Outputs above ``GROUPED_BYTES`` (``kernels/descriptors.py``) keep a launch of their own.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from ..._casts import CastPlan

HELD_BYTES = 32 << 20
MODIFIED_IN_PLACE = "outputs changed in place before their grouped launch"


class Taken(NamedTuple):
    """What a call held: ``groups`` to launch, ``(table, plan, [(tensor, slot)])``, without the
    outputs changed since their hook (``dropped`` of them); every position ``seen`` with whether
    its output stayed unchanged; the ``stream`` they were written on."""

    groups: list[tuple[Any, CastPlan, list[tuple[torch.Tensor, int]]]]
    seen: list[tuple[tuple[int, int], bool]]
    dropped: int
    stream: Any


class Pending:
    """What one root call holds for its grouped launches and version probes (one per call)."""

    __slots__ = ("groups", "held", "probes", "slots", "stream")

    def __init__(self) -> None:
        # (table, dtype) -> (table, plan, [(tensor, slot, version)])
        self.groups: dict[tuple[int, torch.dtype], tuple[Any, CastPlan, list[tuple[torch.Tensor, int, int]]]] = {}
        self.probes: list[tuple[tuple[int, int], torch.Tensor, int]] = []  # (position, tensor, version)
        self.slots: set[tuple[int, int]] = set()
        self.held = 0
        self.stream: Any = None

    def blocks(self, table: Any, slot: int, stream: Any) -> bool:
        """Whether what is held must be launched before this output joins it."""
        return bool(self.slots) and ((id(table), slot) in self.slots or stream != self.stream)

    def add(self, table: Any, slot: int, x: torch.Tensor, plan: CastPlan, stream: Any) -> bool:
        """Hold ``x`` for ``slot``; True when the held bytes reached ``HELD_BYTES`` (launch now)."""
        key = (id(table), x.dtype)
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = (table, plan, [])
        group[2].append((x, slot, x._version))
        self.slots.add((key[0], slot))
        self.stream = stream
        self.held += x.nbytes
        return self.held >= HELD_BYTES

    def probe(self, table: Any, slot: int, x: torch.Tensor) -> bool:
        """Keep ``x`` (measured already) to compare its version at the end; True: launch now."""
        self.probes.append(((id(table), slot), x, x._version))
        self.held += x.nbytes
        return self.held >= HELD_BYTES

    def take(self) -> Taken:
        """What to launch and what was learned; nothing is held afterwards."""
        seen = [(position, x._version == version) for position, x, version in self.probes]
        groups, dropped = [], 0
        for table, plan, items in self.groups.values():
            kept = []
            for x, slot, version in items:
                unchanged = x._version == version
                seen.append(((id(table), slot), unchanged))
                if unchanged:
                    kept.append((x, slot))
                else:
                    dropped += 1
            if kept:
                groups.append((table, plan, kept))
        taken = Taken(groups, seen, dropped, self.stream)
        self.groups = {}
        self.probes = []
        self.slots = set()
        self.held = 0
        return taken
