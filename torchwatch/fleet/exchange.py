"""Every rank's message to every other, through the store of the job's ``torch.distributed``
process group, with a deadline: a rank that died or hangs is reported missing, never waited for.

A collective (``all_gather_object``) would block every rank until the slowest arrives and, with
gloo or NCCL, fail the whole group when one dies. Each rank here writes its message under a key
of its own and reads the others' as they appear, until all are there or the deadline passes.
Keys are namespaced by the group's ranks and a round number (every rank of the group calls the
same comparisons in the same order, as with any collective); a rank removes its key of the
previous round once all peers have written this one (they have read it by then).
"""

from __future__ import annotations

import threading
import time
import zlib
from typing import Any, ClassVar

import torch

from ..errors import ConfigError

__all__ = ["Exchange", "gather"]

PREFIX = "torchwatch/fleet"


class Exchange:
    """The rounds of one group: the store, the group's ranks and this rank."""

    _rounds: ClassVar[dict[tuple[int, ...], int]] = {}  # rounds so far per group, in this process
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, group: Any = None, store: Any = None) -> None:
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            raise ConfigError(
                "comparing replicas over torch.distributed needs an initialised process group: call "
                "torch.distributed.init_process_group(...) first (torchrun sets up the environment for it)"
            )
        self.rank = dist.get_rank()
        self.ranks: list[int] = (list(dist.get_process_group_ranks(group)) if group is not None
                                  else list(range(dist.get_world_size())))  # fmt: skip
        if self.rank not in self.ranks:
            raise ConfigError(f"rank {self.rank} is not in the group it was asked to compare within ({self.ranks})")
        self.store = store if store is not None else _default_store()
        self.key = tuple(self.ranks)
        self.store_error: str | None = None  # why the store stopped answering, if it did

    def next_round(self) -> int:
        with self._lock:
            n = self._rounds.get(self.key, 0)
            self._rounds[self.key] = n + 1
            return n

    def gather(self, message: bytes, *, timeout: float) -> dict[int, bytes | None]:
        """Every rank's ``message`` (None for a rank that did not write one within ``timeout`` s)."""
        n = self.next_round()
        space = f"{PREFIX}/{zlib.crc32(repr(self.key).encode()):08x}"
        got: dict[int, bytes | None] = {self.rank: message}
        waiting = [r for r in self.ranks if r != self.rank]
        deadline = time.monotonic() + timeout
        pause = 0.002
        try:
            self.store.set(f"{space}/{n}/{self.rank}", message)
            while waiting:
                for r in list(waiting):
                    key = f"{space}/{n}/{r}"
                    if self.store.check([key]):
                        got[r] = self.store.get(key)
                        waiting.remove(r)
                if not waiting or time.monotonic() >= deadline:
                    break
                time.sleep(pause)
                pause = min(pause * 2, 0.05)
        except RuntimeError as exc:  # the store is gone (its host process died): the rest are unknown
            self.store_error = f"{type(exc).__name__}: {exc}"
        for r in waiting:
            got[r] = None
        if not waiting and n:  # every peer is in this round: none reads the previous one any more
            try:
                self.store.delete_key(f"{space}/{n - 1}/{self.rank}")
            except (RuntimeError, NotImplementedError):  # a store without deletion keeps a few bytes
                pass
        return got


def gather(
    message: bytes, *, timeout: float, group: Any = None, store: Any = None
) -> tuple[int, list[int], dict[int, bytes | None]]:
    """This rank, the group's ranks, and every rank's message (see :class:`Exchange`)."""
    ex = Exchange(group, store)
    return ex.rank, ex.ranks, ex.gather(message, timeout=timeout)


def _default_store() -> Any:
    """The key-value store the default process group was set up with."""
    get = getattr(torch.distributed.distributed_c10d, "_get_default_store", None)
    if get is None:  # pragma: no cover - every torch this library supports has it
        raise ConfigError("this torch does not expose the process group's store; pass store= a torch.distributed.Store")
    return get()
