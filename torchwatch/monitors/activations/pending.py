"""Small accelerator outputs of one root call, measured by one grouped launch when it ends.

At batch 1 an activation is tens of kilobytes: reading it costs nothing, launching a kernel for
it is the cost (about 150 launches per BERT-base forward). So a hook only *records* an output a
grouped launch takes (``kernel.groupable``): the tensor, kept referenced, its slot and cast plan.
When the root call ends, one launch per (table, dtype) measures them all (``kernel.merge_group``),
on the stream that produced them.

**An output changed in place after its hook** (``out += identity`` in a residual block,
``nn.ReLU(inplace=True)`` on it) would be measured changed. So a position is *probed* first:
measured at once, and kept to be checked when the call ends (``grouping.py`` decides from the
checks which positions may wait). The check:

* a tensor with a version counter (``torch.no_grad()`` or grad mode): the version it had at its
  hook, compared at the call's end; a held output is checked the same way on every call, and one
  changed anyway (the model changed its control flow) is not measured for that call
  (``dropped``);
* an inference tensor (``torch.inference_mode()``) has no version counter: a copy made at its
  hook, compared bit for bit on the device at the call's end (``copies``), the answer read once
  the device has finished, never waited for.

Probes are checked at the call's end only (a check made earlier would not see the rest of the
call); they keep at most ``HELD_BYTES`` (outputs and copies) per call, and a position beyond
that is probed on a later call. Bounds on what is held, each of which launches it before going
on:

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
    outputs changed since their hook (``dropped`` of them); each version-probed or held position
    ``seen`` with whether its output stayed unchanged; the inference probes' ``copies``,
    ``(position, tensor, copy, stream)``, to compare on the device; the ``stream`` of the groups."""

    groups: list[tuple[Any, CastPlan, list[tuple[torch.Tensor, int]]]]
    seen: list[tuple[tuple[int, int], bool]]
    dropped: int
    copies: list[tuple[tuple[int, int], torch.Tensor, torch.Tensor, Any]]
    stream: Any


class Pending:
    """What one root call holds for its grouped launches and probes (one per call)."""

    __slots__ = ("copies", "groups", "held", "probed", "probes", "reprobe", "slots", "stream")

    def __init__(self, reprobe: bool = False) -> None:
        # (table, dtype) -> (table, plan, [(tensor, slot, version)])
        self.groups: dict[tuple[int, torch.dtype], tuple[Any, CastPlan, list[tuple[torch.Tensor, int, int]]]] = {}
        self.probes: list[tuple[tuple[int, int], torch.Tensor, int]] = []  # (position, tensor, version)
        self.copies: list[tuple[tuple[int, int], torch.Tensor, torch.Tensor, Any]] = []  # (position, x, copy, stream)
        self.slots: set[tuple[int, int]] = set()
        self.held = 0  # bytes held for the grouped launch
        self.probed = 0  # bytes kept by probes
        self.stream: Any = None
        self.reprobe = reprobe  # this call probes held inference positions again (grouping.py)

    @property
    def waiting(self) -> bool:
        """Whether anything waits for the call's end."""
        return bool(self.held or self.probed)

    def blocks(self, table: Any, slot: int, stream: Any) -> bool:
        """Whether what is held must be launched before this output joins it."""
        return self.held > 0 and ((id(table), slot) in self.slots or stream != self.stream)

    def add(self, table: Any, slot: int, x: torch.Tensor, plan: CastPlan, stream: Any) -> bool:
        """Hold ``x`` for ``slot``; True when the held bytes reached ``HELD_BYTES`` (launch now)."""
        key = (id(table), x.dtype)
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = (table, plan, [])
        group[2].append((x, slot, x._version if not x.is_inference() else 0))
        self.slots.add((key[0], slot))
        self.stream = stream
        self.held += x.nbytes
        return self.held >= HELD_BYTES

    def probe(self, table: Any, slot: int, x: torch.Tensor, stream: Any) -> bool:
        """Keep ``x`` (measured already) to check at the call's end whether it changed; False
        when the probes already keep ``HELD_BYTES`` (it is probed on a later call instead)."""
        cost = x.nbytes * (2 if x.is_inference() else 1)
        if self.probed + cost > HELD_BYTES:
            return False
        self.probed += cost
        if x.is_inference():
            self.copies.append(((id(table), slot), x, x.clone(), stream))
        else:
            self.probes.append(((id(table), slot), x, x._version))
        return True

    def take(self, *, final: bool) -> Taken:
        """What to launch, and at the call's end (``final``) what the probes learned. Nothing is
        held afterwards but, before the call's end, the probes."""
        seen = [(position, x._version == version) for position, x, version in self.probes] if final else []
        groups, dropped = [], 0
        for table, plan, items in self.groups.values():
            kept = []
            for x, slot, version in items:
                unchanged = x.is_inference() or x._version == version  # inference: reprobes check
                seen.append(((id(table), slot), unchanged))
                if unchanged:
                    kept.append((x, slot))
                else:
                    dropped += 1
            if kept:
                groups.append((table, plan, kept))
        taken = Taken(groups, seen, dropped, self.copies if final else [], self.stream)
        self.groups = {}
        self.slots = set()
        self.held = 0
        if final:
            self.probes = []
            self.copies = []
            self.probed = 0
        return taken
