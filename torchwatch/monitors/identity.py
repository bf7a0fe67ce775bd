"""Who produced each record (``record.identity``): a monitor with no hooks whose value is the
replica's :class:`~torchwatch.Identity`, read at every flush (a ``torch.distributed`` rank joined
after attaching shows from then on), and exported to Prometheus as one info series."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from .. import values
from ..fleet.identity import Identity, identity
from .base import Collect, Monitor

__all__ = ["IdentityMonitor"]

INFO = "torchwatch_replica_info"  # an info series: value 1, the labels carry the information


class IdentityMonitor(Monitor):
    """``record.identity``: the :class:`~torchwatch.Identity` of the process that made the record."""

    name = "identity"

    def __init__(self, device: torch.device, replica: str | None) -> None:
        self._device = device
        self._replica = replica

    def collect(self, taken: Any, ctx: Collect) -> Identity:
        return identity(self._device, self._replica)


def _export(value: Identity, record: Any) -> Iterator[values.Series]:
    help_ = (
        "Who this replica is: host, process, rank, device and the versions that decide its numerics "
        "(value 1; the labels are the information)."
    )
    yield values.Series(INFO, "gauge", help_, 1.0, value.labels())


values.register("identity", decode=Identity.from_dict, export=_export)
