"""Small int64 tables sent to the device for one launch each, without ever waiting for it.

A grouped launch reads its work list (one row per tensor) from device memory. The rows are
written into a pinned host buffer, copied to the buffer's device twin on the launching stream
(``non_blocking``), and the launch is queued after the copy. A buffer is written again only once
the event recorded after its launch has completed: :meth:`DescriptorRing.launch` *queries* that
event and never waits on it. When every buffer is still in flight (the device is that far
behind), a new one is made, up to ``limit``; past that the launch is refused and the caller
measures the tensors another way (one launch each), so nothing is lost and nothing blocks.

On a CPU device (the interpreter tests) the host buffer is the device buffer and nothing is in
flight.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

# An output of at most this many bytes is measured by its root call's grouped launch (held until
# then) rather than by a launch of its own.
GROUPED_BYTES = 1 << 20


class DescriptorRing:
    """Reusable ``rows x cols`` int64 tables on ``device`` (see the module docstring)."""

    def __init__(self, device: torch.device, rows: int, cols: int, *, limit: int = 8) -> None:
        self.device = device
        self.rows = rows
        self.cols = cols
        self.limit = limit
        self._buffers: list[list[Any]] = []  # [host, device, event or None]
        self.refused = 0  # launches refused because every buffer was in flight

    def launch(self, values: list[int], run: Callable[[torch.Tensor], None]) -> bool:
        """Copy ``values`` (``n * cols`` ints, n <= rows) to the device and call ``run`` with the
        ``[n, cols]`` device table, in stream order. False (``run`` not called) when refused."""
        n = len(values) // self.cols
        if n == 0 or n > self.rows or n * self.cols != len(values):
            raise ValueError(f"{len(values)} values do not make 1..{self.rows} rows of {self.cols}")
        buffer = self._free()
        if buffer is None:
            self.refused += 1
            return False
        host, dev, _ = buffer
        host.numpy()[: n * self.cols] = values
        table = dev[: n * self.cols]
        if dev is not host:
            table.copy_(host[: n * self.cols], non_blocking=True)
        run(table.view(n, self.cols))
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            buffer[2] = event
        return True

    def _free(self) -> list[Any] | None:
        for buffer in self._buffers:
            event = buffer[2]
            if event is None or event.query():
                buffer[2] = None
                return buffer
        if len(self._buffers) >= self.limit:
            return None
        with torch.inference_mode(False), torch.no_grad():
            if self.device.type == "cuda":
                host = torch.empty(self.rows * self.cols, dtype=torch.int64, pin_memory=True)
                dev = torch.empty(self.rows * self.cols, dtype=torch.int64, device=self.device)
            else:
                host = dev = torch.empty(self.rows * self.cols, dtype=torch.int64, device=self.device)
        buffer = [host, dev, None]
        self._buffers.append(buffer)
        return buffer
