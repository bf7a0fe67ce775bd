"""Reading safetensors files without trusting them and without loading any pickle.

The header is checked before a byte of tensor data is touched: its claimed length against the
file size and a hard cap, its JSON, every entry's dtype, shape and byte range (the range must
hold exactly ``numel * itemsize`` bytes, ranges may not overlap, and together they must fill
the data section: a file with missing or trailing bytes is truncated or corrupt).
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ._files import open_regular, parse_json, read_regular, shown
from .errors import ConfigError, FormatError

# The reference implementation refuses headers above 100 MB; so do we, before reading them.
MAX_HEADER_BYTES = 100_000_000

# safetensors dtype code -> (torch dtype name, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("bool", 1),
    "U8": ("uint8", 1),
    "I8": ("int8", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "I16": ("int16", 2),
    "U16": ("uint16", 2),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I32": ("int32", 4),
    "U32": ("uint32", 4),
    "F32": ("float32", 4),
    "C64": ("complex64", 8),
    "I64": ("int64", 8),
    "U64": ("uint64", 8),
    "F64": ("float64", 8),
}


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file: where its bytes are and what they mean."""

    name: str
    dtype: str  # torch name, e.g. "bfloat16"
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


@dataclass(frozen=True)
class Header:
    """A checked safetensors header."""

    path: str
    entries: dict[str, Entry]
    metadata: dict[str, str]
    file_size: int


def read_header(path: str | os.PathLike[str], what: str = "checkpoint") -> Header:
    """Parse and check the header of one safetensors file.

    Raises:
        FormatError: the file is missing, unreadable, truncated, or its header is malformed; the
            message names the file and what is wrong.
    """
    path = os.fspath(path)
    with open_regular(path, what) as f:
        try:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(
                    f"{shown(path)} is not a safetensors file: {size} bytes, shorter than its 8-byte header length"
                )
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or n > size - 8:
                kind = _other_format(head)
                if kind is not None:
                    raise FormatError(
                        f"{shown(path)} is {kind}, not a safetensors file: torchwatch reads weights from safetensors "
                        "only (no pickle is ever loaded). Load it in your own code and save it once with "
                        "safetensors.torch.save_file(state_dict, 'model.safetensors'), or make the manifest from "
                        "the loaded model: tw.Manifest.from_model(model) (command line: --model module:factory)"
                    )
                raise FormatError(
                    f"{shown(path)} is not a valid safetensors file: its header claims {n:,} bytes but the file has "
                    f"{size:,} bytes in all (limit {MAX_HEADER_BYTES:,}); the file is truncated or corrupt"
                )
            raw = f.read(n)
        except OSError as exc:
            raise FormatError(f"cannot read {shown(path)}: {exc.strerror or exc}") from None
    doc = parse_json(raw, f"the safetensors header of {shown(path)}")
    if not isinstance(doc, dict):
        raise FormatError(
            f"{shown(path)} has a corrupt safetensors header (a JSON {type(doc).__name__}, not an object)"
        )
    metadata = doc.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError(f"{shown(path)}: __metadata__ must map strings to strings")
    data_start = 8 + n
    entries = {name: _entry(path, name, info, data_start) for name, info in doc.items()}
    _check_layout(path, entries, data_start, size)
    return Header(path, entries, metadata, size)


def _other_format(head: bytes) -> str | None:
    """What a file that is not safetensors is, from its first 8 bytes, where that is known."""
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (torch.save's format: a PyTorch .pt/.pth/.bin checkpoint, or an .npz)"
    if head[:1] == b"\x80" and 2 <= head[1] <= 5:
        return "a Python pickle (a legacy torch.save checkpoint)"
    if head.startswith(b"\x93NUMPY"):
        return "a NumPy .npy array"
    if head.startswith(b"GGUF"):
        return "a GGUF model file"
    return None


def _entry(path: str, name: str, info: object, data_start: int) -> Entry:
    where = f"{shown(path)}, tensor {name!r}"
    if not isinstance(info, dict):
        raise FormatError(f"{where}: header entry is not an object")
    code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if code not in DTYPES:
        raise FormatError(f"{where}: unknown dtype {code!r} (known: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise FormatError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and o >= 0 for o in offsets)
        or offsets[1] < offsets[0]
    ):
        raise FormatError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r}")
    dtype, itemsize = DTYPES[code]
    nbytes = math.prod(shape) * itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise FormatError(
            f"{where}: {code} {tuple(shape)} needs {nbytes:,} bytes but its data_offsets span "
            f"{offsets[1] - offsets[0]:,}; the header is corrupt"
        )
    return Entry(name, dtype, tuple(shape), data_start + offsets[0], nbytes)


def _check_layout(path: str, entries: dict[str, Entry], data_start: int, size: int) -> None:
    end = data_start
    for e in sorted(entries.values(), key=lambda e: (e.start, e.nbytes)):
        if e.start < end:
            raise FormatError(f"{shown(path)}: tensor {e.name!r} overlaps the tensor before it; the header is corrupt")
        if e.start > end:
            raise FormatError(f"{shown(path)}: {e.start - end:,} bytes before tensor {e.name!r} belong to no tensor")
        end = e.start + e.nbytes
    if end > size:
        raise FormatError(
            f"{shown(path)} is truncated: its tensors need {end:,} bytes, the file has {size:,}; "
            "download or copy it again"
        )
    if end < size:
        raise FormatError(f"{shown(path)} has {size - end:,} bytes after its last tensor; the file is corrupt")


def checkpoint_files(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """The safetensors files of a checkpoint given as a file, a directory, an index or a list.

    A directory means every ``*.safetensors`` file in it (sorted); a ``*.index.json`` means the
    shards it names. Raises FormatError when nothing is found or a listed file is missing.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            try:
                names = os.listdir(path)
            except OSError as exc:
                raise FormatError(f"cannot list directory {shown(path)}: {exc.strerror or exc}") from None
            files = sorted(os.path.join(path, f) for f in names if f.endswith(".safetensors"))
            if not files:
                raise FormatError(f"directory {shown(path)} holds no *.safetensors file")
            return files
        if path.endswith(".json"):
            return _index_files(path)
        return [path]
    if not isinstance(source, (list, tuple)) or not all(isinstance(p, (str, os.PathLike)) for p in source):
        raise ConfigError(
            f"a checkpoint is a path (a .safetensors file, a directory or a *.index.json) or a list of file paths, "
            f"got {type(source).__name__}"
        )
    files = [os.fspath(p) for p in source]
    if not files:
        raise FormatError("no safetensors file given")
    return files


def _index_files(path: str) -> list[str]:
    """The shards a ``*.index.json`` names, each checked to lie inside the index's directory."""
    where = f"safetensors index {shown(path)}"
    doc = parse_json(read_regular(path, "safetensors index", limit=MAX_HEADER_BYTES), where)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict):
        raise FormatError(f"{where} is not a safetensors index (a JSON object with a 'weight_map' object)")
    if not weight_map:
        raise FormatError(f"{where} has an empty 'weight_map': it names no tensor and no shard")
    bad = [name for name, shard in weight_map.items() if not isinstance(shard, str)]
    if bad:
        raise FormatError(f"{where}: 'weight_map' must map tensor names to shard file names; {bad[0]!r} does not")
    base = os.path.dirname(path)
    for shard in sorted(set(weight_map.values())):
        parts = shard.replace("\\", "/").split("/")
        if not shard or os.path.isabs(shard) or ".." in parts or "" in parts or "\0" in shard:
            raise FormatError(
                f"{where} names shard {shard!r}, which is not a file name inside the index's directory; "
                "an index may only name shards next to it (or below it)"
            )
    files = {shard: os.path.join(base, shard) for shard in sorted(set(weight_map.values()))}
    held = {shard: read_header(file).entries for shard, file in files.items()}
    absent = [(name, shard) for name, shard in weight_map.items() if name not in held[shard]]
    if absent:
        name, shard = absent[0]
        raise FormatError(
            f"{where} puts tensor {name!r} in {shard!r}, which does not hold it"
            + (f" ({len(absent) - 1} more like it)" if len(absent) > 1 else "")
            + "; the index and its shards do not belong together"
        )
    return list(files.values())


def entry_files(files: Sequence[str]) -> dict[str, tuple[str, Entry]]:
    """Like :func:`read_headers`, keeping the file each tensor is in."""
    out: dict[str, tuple[str, Entry]] = {}
    for path in files:
        for name, e in read_header(path).entries.items():
            if name in out:
                raise FormatError(f"tensor {name!r} is in both {shown(out[name][0])} and {shown(path)}")
            out[name] = (path, e)
    return out


def load(path: str | os.PathLike[str], what: str = "file") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of one checked file, on the CPU, plus its metadata (``what`` names it in errors)."""
    header = read_header(path, what)
    tensors: dict[str, torch.Tensor] = {}
    with open_regular(header.path, what) as f:
        for name, e in header.entries.items():
            f.seek(e.start)
            data = bytearray(f.read(e.nbytes))
            if len(data) != e.nbytes:  # the file shrank since its header was read
                raise FormatError(f"{shown(header.path)} is truncated at tensor {name!r}")
            dtype = getattr(torch, e.dtype)
            flat = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
            tensors[name] = flat.view(dtype).reshape(e.shape).clone()
    return tensors, header.metadata
