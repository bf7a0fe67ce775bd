"""The one way device state reaches the host: copy to pinned memory, then poll a CUDA event.

The serving thread starts the copies (:func:`copy_to_host`) and goes on; the worker thread waits
for them (:meth:`HostCopy.wait`), polling the event rather than synchronising, so no thread ever
blocks inside CUDA. Stream order puts the copies before anything queued after them on the same
stream (zeroing the state that was copied). On CPU the copies are plain clones, done at once.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

POLL_SECONDS = 0.0002


def state_mode() -> Any:
    """Accumulators are ordinary tensors even when first made inside ``torch.inference_mode``
    (an inference tensor cannot be updated in place by a later call outside it)."""
    return torch.inference_mode(False)


class HostCopy:
    """Tensors being copied to the host, and the event that marks the copies done (None on CPU)."""

    __slots__ = ("event", "tensors")

    def __init__(self, tensors: tuple[torch.Tensor, ...], event: Any) -> None:
        self.tensors = tensors
        self.event = event

    def wait(self) -> tuple[torch.Tensor, ...]:
        """The host tensors, once copied (polls; for the worker thread, never the serving one)."""
        wait_event(self.event)
        return self.tensors


def copy_to_host(
    tensors: Sequence[torch.Tensor], *, stream: Any = None, out: Sequence[torch.Tensor] | None = None
) -> HostCopy:
    """Start copying ``tensors`` to the host without waiting.

    On CUDA the copies go into ``out`` (pinned buffers the caller reuses) or new pinned buffers,
    on ``stream`` (default: the current one), followed by an event. On CPU they are clones (or
    copies into ``out``).
    """
    with torch.no_grad(), state_mode():
        if not tensors or tensors[0].device.type != "cuda":
            if out is None:
                return HostCopy(tuple(t.clone() for t in tensors), None)
            for host, t in zip(out, tensors, strict=True):
                host.copy_(t)
            return HostCopy(tuple(out), None)
        stream = stream if stream is not None else torch.cuda.current_stream(tensors[0].device)
        with torch.cuda.stream(stream):
            if out is None:
                out = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for host, t in zip(out, tensors, strict=True):
                host.copy_(t, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        return HostCopy(tuple(out), done)


def wait_event(event: Any) -> None:
    """Wait for a CUDA event by polling it (None: nothing to wait for)."""
    if event is not None:
        while not event.query():
            time.sleep(POLL_SECONDS)
