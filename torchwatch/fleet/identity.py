"""Who produced a record: the replica, its process and rank, its device and the software that
decides its numerics.

Every record carries it (``record.identity``), alerts written to logs carry the replica name, and
Prometheus shows it as the labels of one info series (``torchwatch_replica_info``), so a finding
from a fleet of replicas says which one it came from.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .._environment import cpu_name, device_name
from .._schema import Fields

__all__ = ["Identity", "identity", "replica_name"]

# where the replica's name comes from when attach(replica=...) does not give one, in this order
REPLICA_VARIABLES = ("TORCHWATCH_REPLICA", "POD_NAME", "HOSTNAME")


@dataclass(frozen=True)
class Identity:
    """One replica of a model: where it runs and what decides its numbers.

    Attributes:
        replica: the name it is known by (``attach(replica=...)``, else ``$TORCHWATCH_REPLICA``,
            ``$POD_NAME``, ``$HOSTNAME`` or the host name; ``:rank<r>`` appended in a
            ``torch.distributed`` job of several ranks).
        host, pid: the machine and the process.
        rank, local_rank, world_size: ``torch.distributed`` coordinates, None when it is not initialised.
        device: the device type (``"cpu"``, ``"cuda"``); device_name: the accelerator's or CPU's model;
            device_uuid: the GPU's UUID ("" on CPU).
        cpu: the CPU model; torch, cuda, cudnn: the versions ("" where absent).

    Example:
        >>> import torch, torchwatch as tw
        >>> me = tw.Identity.of(torch.device("cpu"), replica="pod-7")
        >>> me.replica, me.device, me.rank
        ('pod-7', 'cpu', None)
    """

    replica: str
    host: str
    pid: int
    rank: int | None
    local_rank: int | None
    world_size: int | None
    device: str
    device_name: str
    device_uuid: str
    cpu: str
    torch: str
    cuda: str
    cudnn: str

    @classmethod
    def of(cls, device: torch.device, *, replica: str | None = None) -> Identity:
        """The identity of this process serving on ``device`` (read now: a rank joined later shows)."""
        return identity(device, replica)

    def labels(self) -> tuple[tuple[str, str], ...]:
        """The info series' labels: every field as a string (absent ones empty)."""
        return tuple((k, "" if v is None else str(v)) for k, v in asdict(self).items())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: object, where: str = "identity") -> Identity:
        """Inverse of :meth:`to_dict`; FormatError naming a bad field."""
        f = Fields(doc, where)
        return cls(
            replica=f.str("replica"), host=f.str("host", ""), pid=f.int("pid", 0), rank=f.int("rank", None),
            local_rank=f.int("local_rank", None), world_size=f.int("world_size", None), device=f.str("device", ""),
            device_name=f.str("device_name", ""), device_uuid=f.str("device_uuid", ""), cpu=f.str("cpu", ""),
            torch=f.str("torch", ""), cuda=f.str("cuda", ""), cudnn=f.str("cudnn", ""),
        )  # fmt: skip

    def __str__(self) -> str:
        rank = f" rank {self.rank}/{self.world_size}" if self.rank is not None else ""
        return f"{self.replica} ({self.host} pid {self.pid}{rank}, {self.device_name}, torch {self.torch})"


def _distributed() -> tuple[int | None, int | None, int | None]:
    """(rank, local rank, world size) when torch.distributed is initialised, else Nones."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return None, None, None
    local = os.environ.get("LOCAL_RANK")
    return dist.get_rank(), int(local) if local and local.isdigit() else None, dist.get_world_size()


def replica_name(replica: str | None = None) -> str:
    """``replica``, or the name this process is known by (see :class:`Identity`)."""
    if replica:
        return replica
    base = next((v for k in REPLICA_VARIABLES if (v := os.environ.get(k))), None) or platform.node() or "replica"
    rank, _, world = _distributed()
    return f"{base}:rank{rank}" if rank is not None and world is not None and world > 1 else base


def identity(device: torch.device, replica: str | None = None) -> Identity:
    """This process's :class:`Identity` on ``device`` (``replica``: its name, default from the environment)."""
    rank, local, world = _distributed()
    fixed = _fixed(device)
    return Identity(replica=replica_name(replica), pid=os.getpid(), rank=rank, local_rank=local, world_size=world,
                    **fixed)  # fmt: skip


@functools.cache
def _fixed(device: torch.device) -> dict[str, str]:
    uuid = ""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        uuid = str(getattr(props, "uuid", "") or "")
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "host": platform.node(), "device": device.type, "device_name": device_name(device), "device_uuid": uuid,
        "cpu": cpu_name(), "torch": torch.__version__, "cuda": torch.version.cuda or "",
        "cudnn": str(cudnn) if cudnn else "",
    }  # fmt: skip
