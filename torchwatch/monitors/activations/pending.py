"""Small accelerator outputs of one root call, measured by one grouped launch when it ends.

At batch 1 an activation is tens of kilobytes: reading it costs nothing, launching a kernel for
it is the cost (about 150 launches per BERT-base forward). So a hook only *records* an output a
grouped launch takes (``kernel.groupable``): the tensor, kept referenced, its slot and its cast
plan. When the root call ends, one launch per (table, dtype) measures them all
(``kernel.merge_group``), on the stream that produced them.

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

from typing import Any

import torch

from ..._casts import CastPlan

HELD_BYTES = 32 << 20


class Pending:
    """What one root call holds for its grouped launches (one per call, in its thread)."""

    __slots__ = ("groups", "held", "slots", "stream")

    def __init__(self) -> None:
        self.groups: dict[tuple[int, torch.dtype], tuple[Any, CastPlan, list[tuple[torch.Tensor, int]]]] = {}
        self.slots: set[tuple[int, int]] = set()
        self.held = 0
        self.stream: Any = None

    def blocks(self, table: Any, slot: int, stream: Any) -> bool:
        """Whether what is held must be launched before this output joins it."""
        return bool(self.held) and ((id(table), slot) in self.slots or stream != self.stream)

    def add(self, table: Any, slot: int, x: torch.Tensor, plan: CastPlan, stream: Any) -> bool:
        """Hold ``x`` for ``slot``; True when the held bytes reached ``HELD_BYTES`` (launch now)."""
        key = (id(table), x.dtype)
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = (table, plan, [])
        group[2].append((x, slot))
        self.slots.add((key[0], slot))
        self.stream = stream
        self.held += x.nbytes
        return self.held >= HELD_BYTES

    def take(self) -> tuple[list[tuple[Any, CastPlan, list[tuple[torch.Tensor, int]]]], Any]:
        """Every group held and their stream; nothing is held afterwards."""
        groups, stream = list(self.groups.values()), self.stream
        self.groups = {}
        self.slots = set()
        self.held = 0
        return groups, stream
