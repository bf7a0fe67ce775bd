"""The incident bundle: one safetensors file per captured call, with its story in the metadata.

A bundle holds the tensors of the call's inputs (``input/<i>``) and outputs (``output/<i>``) and,
in the safetensors ``__metadata__``, ``{"format": "torchwatch.bundle/1", "meta": <JSON>}``: the
trigger alert, the call's labels and time, the structure of its arguments (a JSON tree whose
tensor leaves point at the file's tensors, other leaves kept as JSON values where they can be
and named by type where they cannot), the per-module statistics of the call, the weights'
fingerprint and the settings that decide numerics. No pickle is written or read, and reading
checks everything (:func:`read`) before a replay trusts it.

The directory also holds ``captures.jsonl``, one line per bundle (``torchwatch.capture/1``), which
``torchwatch report`` reads, and, after ``torchwatch replay``, ``<bundle>.replay.json``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .. import _safetensors, formats
from .._files import atomic_write, atomic_write_text, parse_json, shown
from .._schema import Fields
from ..alerts import Alert
from ..errors import FormatError
from ..stats import ModuleStats

FORMAT = formats.BUNDLE
INDEX = "captures.jsonl"
MAX_META_BYTES = 16 << 20  # a bundle's JSON story; a larger one is refused before it is parsed
MAX_DEPTH = 32  # nesting of an argument tree
MAX_NODES = 100_000  # nodes of an argument tree
_STORABLE = {getattr(torch, name) for name, _ in _safetensors.DTYPES.values() if hasattr(torch, name)}
_JSON_SCALARS = (bool, int, str, type(None))


# ---- argument trees --------------------------------------------------------------------------


def encode(tree: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """The JSON spec of ``tree``; its tensors go into ``tensors`` as ``<prefix>/<i>`` (CPU copies).

    Tensors, tuples, lists, dicts (string keys; a Hugging Face ``ModelOutput`` too), JSON scalars
    and floats are kept; anything else is named (``{"opaque": "TypeName"}``) and
    cannot be replayed. Tensors safetensors cannot hold (sparse, quantized, meta, nested) are
    named the same way.
    """
    seen: dict[int, int] = {}  # the same tensor object twice is stored once

    def walk(obj: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            return {"opaque": type(obj).__name__, "why": "nested too deeply"}
        if isinstance(obj, torch.Tensor):
            if obj.layout is not torch.strided or obj.is_quantized or obj.is_meta or obj.dtype not in _STORABLE:
                return {"opaque": f"Tensor({obj.dtype}, {obj.layout})", "shape": list(obj.shape)}
            index = seen.get(id(obj))
            if index is None:
                index = seen[id(obj)] = len(seen)
                tensors[f"{prefix}/{index}"] = obj.detach().to("cpu").contiguous().clone()
            return {"tensor": index, "device": str(obj.device)}
        if isinstance(obj, _JSON_SCALARS):
            return {"value": obj}
        if isinstance(obj, float):
            return {"value": obj} if math.isfinite(obj) else {"float": repr(obj)}
        if isinstance(obj, Mapping) and all(isinstance(k, str) for k in obj):
            return {"dict": [[k, walk(v, depth + 1)] for k, v in obj.items()], "type": type(obj).__name__}
        if isinstance(obj, (tuple, list)) and not hasattr(type(obj), "_fields"):
            return {type(obj).__name__ if type(obj) in (tuple, list) else "tuple": [walk(v, depth + 1) for v in obj]}
        return {"opaque": type(obj).__name__}

    return walk(tree, 0)


def decode(spec: Any, tensors: Mapping[str, torch.Tensor], prefix: str, where: str) -> Any:
    """The tree a spec describes, its tensor leaves taken from ``tensors``.

    Raises:
        FormatError: the spec is malformed, too deep or too large, or names a tensor the file lacks.
    """
    nodes = 0

    def walk(node: Any, depth: int, at: str) -> Any:
        nonlocal nodes
        nodes += 1
        if depth > MAX_DEPTH + 1 or nodes > MAX_NODES:
            raise FormatError(f"{where}: the argument tree at {at} is too deep or too large")
        if not isinstance(node, dict) or len(node) < 1:
            raise FormatError(f"{where}: the argument tree at {at} is not a node object")
        if "tensor" in node:
            name = f"{prefix}/{node['tensor']}"
            if isinstance(node["tensor"], bool) or not isinstance(node["tensor"], int) or name not in tensors:
                raise FormatError(f"{where}: {at} names tensor {name!r}, which the file does not hold")
            return tensors[name]
        if "value" in node:
            if not isinstance(node["value"], (*_JSON_SCALARS, float)):
                raise FormatError(f"{where}: {at} holds a value of JSON type {type(node['value']).__name__}")
            return node["value"]
        if "float" in node:
            if node["float"] not in ("nan", "inf", "-inf"):
                raise FormatError(f"{where}: {at} holds float {node['float']!r}; expected nan, inf or -inf")
            return float(node["float"])
        for kind in ("tuple", "list"):
            if kind in node:
                if not isinstance(node[kind], list):
                    raise FormatError(f"{where}: {at} is a {kind} node without a list")
                items = [walk(v, depth + 1, f"{at}[{i}]") for i, v in enumerate(node[kind])]
                return tuple(items) if kind == "tuple" else items
        if "dict" in node:
            pairs = node["dict"]
            if not isinstance(pairs, list) or not all(
                isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) for p in pairs
            ):
                raise FormatError(f"{where}: {at} is a dict node whose items are not [key, node] pairs")
            return {k: walk(v, depth + 1, f"{at}.{k}") for k, v in pairs}
        if "opaque" in node:
            return Opaque(str(node["opaque"]), at)
        raise FormatError(f"{where}: the argument tree at {at} has no known node kind (keys {sorted(node)[:5]})")

    return walk(spec, 0, "")


@dataclass(frozen=True)
class Opaque:
    """An argument the capture could not store (its type is named); a replay needs it given."""

    type: str
    at: str


def opaque_leaves(tree: Any) -> list[Opaque]:
    """The :class:`Opaque` leaves of a decoded tree."""
    if isinstance(tree, Opaque):
        return [tree]
    if isinstance(tree, dict):
        return [o for v in tree.values() for o in opaque_leaves(v)]
    if isinstance(tree, (tuple, list)):
        return [o for v in tree for o in opaque_leaves(v)]
    return []


# ---- files -----------------------------------------------------------------------------------


def write(path: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> int:
    """Write one bundle atomically, readable by its owner only (mode 0600); returns its size."""
    from safetensors.torch import save_file

    text = json.dumps(formats.json_safe(meta), allow_nan=False, separators=(",", ":"))

    def save(tmp: str) -> None:  # owner-only before it is renamed into place
        save_file(tensors, tmp, metadata={"format": FORMAT, "meta": text})
        os.chmod(tmp, 0o600)

    atomic_write(path, save)
    return os.stat(path).st_size


@dataclass(frozen=True)
class Bundle:
    """A checked incident bundle (:func:`read`).

    Attributes:
        path: the file.
        meta: the JSON story (see the module docstring); ``meta["trigger"]`` is the alert.
        args, kwargs: the call's arguments, or None when inputs were not kept.
        outputs: the call's output, or None.
        stats: per output position, the call's statistics (``meta["stats_scope"]`` says whether
            they are the call's own, ``"call"``, or its flush interval's, ``"interval"``), or None.
    """

    path: str
    meta: dict[str, Any]
    args: tuple[Any, ...] | None
    kwargs: dict[str, Any] | None
    outputs: Any
    stats: dict[str, ModuleStats] | None


def read(path: str | os.PathLike[str]) -> Bundle:
    """Read and check a bundle; nothing in it is trusted before it is checked.

    Raises:
        FormatError: the file is missing, not a safetensors file, not a bundle, or its story is
            malformed, too large or inconsistent with its tensors (truncated, edited); the message
            names the file and what is wrong.
    """
    path = os.fspath(path)
    where = shown(path)
    tensors, metadata = _safetensors.load(path, "incident bundle")
    if metadata.get("format") != FORMAT:
        raise FormatError(f"{where} is not an incident bundle (format {metadata.get('format')!r}, want {FORMAT!r})")
    text = metadata.get("meta", "")
    if len(text) > MAX_META_BYTES:
        raise FormatError(f"{where}: its metadata is {len(text):,} bytes, more than {MAX_META_BYTES:,}")
    meta = parse_json(text, f"{where} metadata")
    f = Fields(meta, f"{where} metadata")
    f.str("format")
    f.int("call")
    f.number("time")
    if not isinstance(meta.get("trigger"), dict):
        raise FormatError(f"{where} metadata: field 'trigger' must be the alert's object")
    Alert.from_dict(meta["trigger"], f"{where} metadata, trigger")
    args = kwargs = outputs = None
    inputs = f.get("inputs")
    if inputs is not None:
        tree = decode(inputs, tensors, "input", where)
        if not (isinstance(tree, dict) and set(tree) == {"args", "kwargs"} and isinstance(tree["args"], tuple)
                and isinstance(tree["kwargs"], dict)):  # fmt: skip
            raise FormatError(f"{where}: the inputs are not an {{'args': tuple, 'kwargs': dict}} tree")
        args, kwargs = tree["args"], tree["kwargs"]
    if f.get("outputs") is not None:
        outputs = decode(meta["outputs"], tensors, "output", where)
    referenced = _tensor_names(inputs, "input") | _tensor_names(meta.get("outputs"), "output")
    if set(tensors) != referenced:
        extra = sorted(set(tensors) - referenced)[:3]
        raise FormatError(f"{where}: tensors {extra} are in the file but not in its story (an edited bundle?)")
    stats = None
    if f.get("stats") is not None:
        stats = {name: ModuleStats.from_dict(s.doc, f"{where} stats {name!r}") for name, s in f.items("stats")}
    return Bundle(path, meta, args, kwargs, outputs, stats)


def _tensor_names(spec: Any, prefix: str) -> set[str]:
    out: set[str] = set()
    stack = [spec]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "tensor" in node:
                out.add(f"{prefix}/{node['tensor']}")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return out


def indexed(index: str) -> list[tuple[str, dict[str, Any]]]:
    """``(bundle path, index line)`` for each line of a ``captures.jsonl`` that names a bundle in its
    own directory (a name with a path separator, or of another kind, is skipped).

    Raises:
        FormatError: the index is missing or not a capture index.
    """
    directory = os.path.dirname(index)
    out = []
    for _, line in formats.read_jsonl(index, "capture index", "capture", formats.CAPTURE):
        name = line.get("file")
        if isinstance(name, str) and os.sep not in name and name.endswith(".safetensors"):
            out.append((os.path.join(directory, name), line))
    return out


def save_verdict(bundle_path: str, verdict: dict[str, Any]) -> str:
    """Write a replay's verdict beside its bundle (``<bundle>.replay.json``); returns the path."""
    out = f"{bundle_path}.replay.json"
    atomic_write_text(out, json.dumps(formats.json_safe(verdict), indent=1, allow_nan=False) + "\n")
    return out
