"""sha256 of tensor bytes on a thread pool, from files (mmap, no copy) or from memory.

hashlib releases the GIL for buffers over 2 KiB, so threads hash in parallel. A single
tensor's sha256 is sequential by definition, so work is scheduled largest tensor first; a
checkpoint whose biggest tensor outweighs ``total / threads`` is bounded by that tensor.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from .._files import open_regular, shown
from .._safetensors import Entry
from ..errors import FormatError
from ._progress import Progress

PIECE = 16 << 20  # bytes per hashlib.update: bounds staging memory and progress granularity


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def hash_entries(
    items: Sequence[tuple[str, str, Entry]], *, threads: int | None = None, label: str = "hashing"
) -> dict[str, str]:
    """``{name: sha256 hex}`` of each ``(name, file, entry)``, read through one mmap per file."""
    maps: dict[str, tuple[mmap.mmap, memoryview]] = {}
    try:
        for _, path, _ in items:
            if path not in maps:
                maps[path] = _map(path)
        progress = Progress(label, sum(e.nbytes for _, _, e in items))

        def one(item: tuple[str, str, Entry]) -> tuple[str, str]:
            name, path, e = item
            view = maps[path][1]
            if e.start + e.nbytes > len(view):
                raise FormatError(f"{shown(path)} shrank while it was being hashed (tensor {name!r})")
            h = hashlib.sha256()
            for off in range(e.start, e.start + e.nbytes, PIECE):
                end = min(off + PIECE, e.start + e.nbytes)
                h.update(view[off:end])
                progress.update(end - off)
            return name, h.hexdigest()

        order = sorted(items, key=lambda it: -it[2].nbytes)
        with ThreadPoolExecutor(max_workers=threads or default_threads(), thread_name_prefix="torchwatch-hash") as pool:
            out = dict(pool.map(one, order))
        progress.close()
        return out
    finally:
        for m, view in maps.values():
            view.release()
            m.close()


def _map(path: str) -> tuple[mmap.mmap, memoryview]:
    try:
        with open_regular(path, "checkpoint") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise FormatError(f"{shown(path)} is empty")
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise FormatError(f"cannot read {shown(path)}: {exc.strerror or exc}") from None
    if hasattr(m, "madvise") and hasattr(mmap, "MADV_SEQUENTIAL"):
        m.madvise(mmap.MADV_SEQUENTIAL)
    return m, memoryview(m)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor in row-major order (a view when it is contiguous)."""
    flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy())


def hash_tensors(
    items: Sequence[tuple[str, torch.Tensor]],
    *,
    threads: int | None = None,
    label: str = "hashing",
    staged: bool = False,
) -> dict[str, str]:
    """``{name: sha256 hex}`` of each tensor's bytes.

    CPU tensors are hashed in place. Accelerator tensors are copied to the host one piece at a
    time through a small pinned buffer per thread, so the model never exists twice in host memory;
    the copies run on a side stream that first waits for the work already queued on the device.
    ``staged=True`` sends CPU tensors through the same staging path (how tests cover it on CPU).
    """
    progress = Progress(label, sum(t.numel() * t.element_size() for _, t in items))
    local = threading.local()
    ready: set[torch.device] = set()
    ready_lock = threading.Lock()

    def stage(t: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Stream | None]:
        buf = getattr(local, "buf", None)
        if buf is None:
            pin = t.device.type == "cuda"
            buf = local.buf = torch.empty(PIECE, dtype=torch.uint8, pin_memory=pin)
        stream = None
        if t.device.type == "cuda":
            streams = getattr(local, "streams", None) or {}
            local.streams = streams
            stream = streams.get(t.device)
            if stream is None:
                stream = streams[t.device] = torch.cuda.Stream(t.device)
            with ready_lock:
                if t.device not in ready:  # weights written by queued work (load_state_dict) must land first
                    stream.wait_stream(torch.cuda.current_stream(t.device))
                    ready.add(t.device)
        return buf, stream

    def one(item: tuple[str, torch.Tensor]) -> tuple[str, str]:
        name, t = item
        h = hashlib.sha256()
        if t.device.type == "cpu" and not staged:
            view = tensor_bytes(t)
            for off in range(0, len(view), PIECE):
                h.update(view[off : off + PIECE])
                progress.update(min(PIECE, len(view) - off))
            return name, h.hexdigest()
        buf, stream = stage(t)
        flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
        host = memoryview(buf.numpy())
        for off in range(0, flat.numel(), PIECE):
            n = min(PIECE, flat.numel() - off)
            if stream is not None:
                with torch.cuda.stream(stream):
                    buf[:n].copy_(flat[off : off + n], non_blocking=True)
                stream.synchronize()
            else:
                buf[:n].copy_(flat[off : off + n])
            h.update(host[:n])
            progress.update(n)
        return name, h.hexdigest()

    order = sorted(items, key=lambda it: -it[1].numel() * it[1].element_size())
    with ThreadPoolExecutor(max_workers=threads or default_threads(), thread_name_prefix="torchwatch-hash") as pool:
        out = dict(pool.map(one, order))
    progress.close()
    return out
