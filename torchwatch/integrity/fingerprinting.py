"""A fast fingerprint of a model's weights in memory, computed where the weights are.

sha256 needs the bytes on the host; re-hashing a GPU model means copying all of it. The
fingerprint instead runs on the device (one Triton launch per device; torch ops on CPU or where
Triton is missing) and returns a few numbers per MiB of weights, so it can run periodically in
production and, when it changes, say which tensor and which byte range changed. It is a check
against corruption (bit flips, stray writes, a reload gone wrong), not a cryptographic hash: use
a :class:`torchwatch.Manifest` against tampering.

Covered: ``named_parameters()`` and ``named_buffers()`` — non-persistent buffers included —
each tensor once (tied weights under their first name).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .. import _tensors
from .._schema import Fields
from ..errors import ConfigError, FormatError
from ..kernels import fingerprint_ops
from ..kernels.fingerprint_ops import SALT_BITS, TorchMixer, as_words, position

__all__ = ["Fingerprint", "FingerprintChange", "fingerprint"]

DEFAULT_CHUNK_BYTES = 1 << 20
MIN_CHUNK_BYTES = 1 << 14


@dataclass(frozen=True)
class TensorPrint:
    """The fingerprint of one tensor: its dtype, shape, device and one uint64 per chunk."""

    dtype: str
    shape: tuple[int, ...]
    device: str
    chunks: tuple[int, ...]


@dataclass(frozen=True)
class FingerprintChange:
    """One difference between two fingerprints.

    Attributes:
        tensor: the parameter or buffer name.
        kind: ``"bytes"`` (a chunk's contents changed), ``"shape"``, ``"dtype"``, ``"missing"``
            (in the baseline only) or ``"added"`` (in the new one only).
        chunk: index of the changed chunk (``"bytes"`` only), else -1.
        start, end: the changed chunk's byte range in the tensor (``"bytes"`` only), else 0, 0.
    """

    tensor: str
    kind: str
    chunk: int = -1
    start: int = 0
    end: int = 0

    def __str__(self) -> str:
        if self.kind == "bytes":
            return f"{self.tensor!r} bytes {self.start:,}-{self.end:,} (chunk {self.chunk})"
        return f"{self.tensor!r} {self.kind}"


@dataclass(frozen=True)
class Fingerprint:
    """Per-chunk sums of position-mixed words for every parameter and buffer of a model.

    Attributes:
        tensors: ``{name: TensorPrint}`` in the model's order.
        chunk_bytes: bytes per chunk (the resolution at which a change is located).

    Two fingerprints are equal when their :attr:`digest` is; :meth:`diff` lists what changed.

    Example:
        >>> import torch, torchwatch as tw
        >>> model = torch.nn.Linear(4, 2)
        >>> before = tw.fingerprint(model)
        >>> with torch.no_grad():
        ...     model.weight.view(-1).view(torch.int32)[5] ^= 1  # flip one bit
        >>> [str(c) for c in before.diff(tw.fingerprint(model))]
        ["'weight' bytes 0-32 (chunk 0)"]
    """

    tensors: dict[str, TensorPrint]
    chunk_bytes: int

    @property
    def digest(self) -> str:
        """sha256 over names, dtypes, shapes and chunk sums: one string to compare or log."""
        h = hashlib.sha256(f"chunk={self.chunk_bytes}\n".encode())
        for name, p in self.tensors.items():
            h.update(f"{name}\t{p.dtype}\t{','.join(map(str, p.shape))}\n".encode())
            h.update(struct.pack(f"<{len(p.chunks)}Q", *p.chunks))
        return h.hexdigest()

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(p) for p in self.tensors.values())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Fingerprint) and self.digest == other.digest

    def __hash__(self) -> int:
        return hash(self.digest)

    def diff(self, other: Fingerprint) -> list[FingerprintChange]:
        """What differs in ``other`` relative to this fingerprint (the baseline), tensor by tensor."""
        if other.chunk_bytes != self.chunk_bytes:
            raise ConfigError(
                f"fingerprints with different chunk sizes ({self.chunk_bytes} vs {other.chunk_bytes}) "
                "cannot be compared"
            )
        return list(self._changes(other))

    def _changes(self, other: Fingerprint) -> Iterator[FingerprintChange]:
        for name, a in self.tensors.items():
            b = other.tensors.get(name)
            if b is None:
                yield FingerprintChange(name, "missing")
            elif a.dtype != b.dtype:
                yield FingerprintChange(name, "dtype")
            elif a.shape != b.shape:
                yield FingerprintChange(name, "shape")
            else:
                size = _nbytes(a)
                for i, (x, y) in enumerate(zip(a.chunks, b.chunks, strict=True)):
                    if x != y:
                        start = i * self.chunk_bytes
                        yield FingerprintChange(name, "bytes", i, start, min(start + self.chunk_bytes, size))
        for name in other.tensors.keys() - self.tensors.keys():
            yield FingerprintChange(name, "added")

    def to_dict(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "chunk_bytes": self.chunk_bytes,
            "tensors": {
                n: {
                    "dtype": p.dtype,
                    "shape": list(p.shape),
                    "device": p.device,
                    "chunks": [f"{c:016x}" for c in p.chunks],
                }
                for n, p in self.tensors.items()
            },
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "fingerprint") -> Fingerprint:
        """Inverse of :meth:`to_dict` (a fingerprint kept in a file: an incident bundle's).

        Raises:
            FormatError: a field of the wrong type, an unknown dtype, or a chunk count that does
                not fit the tensor's size (naming ``where`` and the tensor).
        """
        f = Fields(data, where)
        chunk_bytes = f.int("chunk_bytes")
        if not MIN_CHUNK_BYTES <= chunk_bytes <= 1 << 40 or chunk_bytes & (chunk_bytes - 1):
            raise FormatError(f"{where}: chunk_bytes must be a power of two >= {MIN_CHUNK_BYTES}, got {chunk_bytes}")
        prints = {}
        for name, t in f.items("tensors"):
            dtype, shape, chunks = t.str("dtype"), t.list("shape"), t.list("chunks")
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise FormatError(f"{where}: tensor {name!r} has dtype {dtype!r}, not a torch dtype")
            if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                raise FormatError(f"{where}: tensor {name!r} has shape {shape!r}, not a list of sizes")
            try:
                sums = tuple(int(c, 16) for c in chunks if isinstance(c, str) and len(c) <= 16)
            except ValueError:
                sums = ()
            p = TensorPrint(dtype, tuple(shape), t.str("device", ""), sums)
            if len(sums) != len(chunks) or len(sums) != -(-_nbytes(p) // chunk_bytes):
                raise FormatError(f"{where}: tensor {name!r} needs {-(-_nbytes(p) // chunk_bytes)} hex chunk sums")
            prints[name] = p
        return cls(prints, chunk_bytes)

    def __repr__(self) -> str:
        return f"Fingerprint({len(self.tensors)} tensors, {self.nbytes / 1e6:.1f} MB, digest {self.digest[:12]}…)"


def _nbytes(p: TensorPrint) -> int:
    n = 1
    for d in p.shape:
        n *= d
    return n * getattr(torch, p.dtype).itemsize


def _salt(name: str) -> int:
    return zlib.crc32(name.encode()) & ((1 << SALT_BITS) - 1)


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters then buffers, each object once, in module order (see :func:`torchwatch._tensors.model_tensors`)."""
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"fingerprint() needs a torch.nn.Module, got {type(model).__name__}")
    return _tensors.model_tensors(model, "fingerprint")


def fingerprint(
    model: torch.nn.Module,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    backend: str = "auto",
    stream: torch.cuda.Stream | None = None,
) -> Fingerprint:
    """Fingerprint every parameter and buffer of ``model`` on the device it lives on.

    Args:
        model: the model.
        chunk_bytes: bytes per chunk, a power of two >= 16 KiB: the resolution of :meth:`Fingerprint.diff`.
        backend: ``"auto"`` (Triton on CUDA when available, else torch ops), ``"triton"`` (CUDA
            only; CPU tensors too under ``TRITON_INTERPRET=1``, which is how CI tests the kernel) or
            ``"torch"``.
        stream: CUDA stream to run on (default: a side stream that first waits for the work already
            queued on the device, so serving kernels launched later are not held up by it).

    Returns:
        A :class:`Fingerprint`. On CUDA it waits for its own work (one small read per device).

    Raises:
        ConfigError: bad ``chunk_bytes``/``backend``, or tensors on the meta device.

    Example:
        >>> import torch, torchwatch as tw
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
        >>> tw.fingerprint(model) == tw.fingerprint(model)
        True
    """
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes > 1 << 40:
        raise ConfigError(f"chunk_bytes must be a power of two >= {MIN_CHUNK_BYTES}, got {chunk_bytes!r}")
    if chunk_bytes < MIN_CHUNK_BYTES or chunk_bytes & (chunk_bytes - 1):
        raise ConfigError(f"chunk_bytes must be a power of two >= {MIN_CHUNK_BYTES}, got {chunk_bytes}")
    if backend not in ("auto", "triton", "torch"):
        raise ConfigError(f"backend={backend!r} is not valid: use 'auto', 'triton' or 'torch'")
    tensors = model_tensors(model)
    chunk_words = chunk_bytes // 8
    by_device: dict[torch.device, list[str]] = {}
    for name, t in tensors.items():
        by_device.setdefault(t.device, []).append(name)
    sums: dict[str, tuple[int, ...]] = {}
    for device, names in by_device.items():
        if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError(f"backend='triton' needs CUDA tensors, and {names[0]!r} is on {device}; use 'auto'")
        use_triton = backend == "triton" or (backend == "auto" and device.type == "cuda" and _triton_ok())
        if use_triton:
            sums.update(_device_sums_triton(device, {n: tensors[n] for n in names}, chunk_words, stream))
        else:
            mixer = TorchMixer(device)
            for n in names:
                sums[n] = tuple(mixer.chunk_sums(as_words(tensors[n]), _salt(n), chunk_words))
    prints = {
        n: TensorPrint(str(t.dtype).removeprefix("torch."), tuple(t.shape), str(t.device), sums[n])
        for n, t in tensors.items()
    }
    return Fingerprint(prints, chunk_bytes)


def _triton_ok() -> bool:
    try:
        from ..kernels import triton_fingerprint  # noqa: F401
    except ImportError:
        return False
    return True


# Chunk tables on the device, by (device, chunk words, (name, address, words) of every tensor): a
# periodic re-check of an unchanged model reuses its table instead of rebuilding thousands of rows.
_TABLES: collections.OrderedDict[tuple[Any, ...], torch.Tensor] = collections.OrderedDict()
_TABLES_MAX = 8
_tables_lock = threading.Lock()


def _chunk_table(device: torch.device, words: dict[str, torch.Tensor], chunk_words: int) -> torch.Tensor:
    key = (device, chunk_words, tuple((n, w.data_ptr(), w.numel()) for n, w in words.items()))
    with _tables_lock:
        table = _TABLES.get(key)
        if table is not None:
            _TABLES.move_to_end(key)
            return table
    parts = []
    for n, w in words.items():
        c0 = torch.arange(0, w.numel(), chunk_words, dtype=torch.int64)
        rows = torch.stack(
            [
                w.data_ptr() + 8 * c0,
                (w.numel() - c0).clamp(max=chunk_words),
                fingerprint_ops.signed(position(_salt(n), 0)) + c0,
            ]
        )
        parts.append(rows.t())
    table = torch.cat(parts).contiguous().to(device) if parts else torch.empty(0, 3, dtype=torch.int64, device=device)
    with _tables_lock:
        _TABLES[key] = table
        while len(_TABLES) > _TABLES_MAX:
            _TABLES.popitem(last=False)
    return table


def _device_sums_triton(
    device: torch.device, tensors: dict[str, torch.Tensor], chunk_words: int, stream: torch.cuda.Stream | None
) -> dict[str, tuple[int, ...]]:
    from ..kernels import triton_fingerprint

    side = None
    if device.type == "cuda":
        side = stream or torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
    ctx = torch.cuda.stream(side) if side is not None else contextlib.nullcontext()
    sums: dict[str, tuple[int, ...]] = {}
    with ctx:
        aligned = {}
        mixer = None
        for n, t in tensors.items():
            w = as_words(t)
            if w.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() or t.numel() == 0:
                aligned[n] = w
            else:  # odd size or misaligned view: a padded copy, too small to be worth the kernel
                mixer = mixer or TorchMixer(device, block=1 << 16)
                sums[n] = tuple(mixer.chunk_sums(w, _salt(n), chunk_words))
        aligned = {n: w for n, w in aligned.items() if w.numel()}
        table = _chunk_table(device, aligned, chunk_words)
        out = torch.empty(table.shape[0], dtype=torch.int64, device=device)
        triton_fingerprint.chunk_sums(table, out, chunk_words)
        values = [fingerprint_ops.unsigned(v) for v in out.tolist()]  # waits for this stream only
    i = 0
    for n, w in aligned.items():
        count = -(-w.numel() // chunk_words)
        sums[n] = tuple(values[i : i + count])
        i += count
    for n in tensors:
        sums.setdefault(n, ())
    return {n: sums[n] for n in tensors}
