"""Finding the tensors in whatever a module returns.

Each tensor gets a stable label from its position: the first position (index 0 / first key /
first field, at every level) is labelled ``""`` so that a plain tensor output and the main
element of a tuple read as the module's own name; others read ``[1]``, ``[1][0]``, ``.key``,
``.field``. Dataclasses (HF ``ModelOutput`` included) are walked by declared field, so a field
that is ``None`` on one call does not shift the labels of the others.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import torch

MAX_DEPTH = 6
MAX_TENSORS = 64


def tensors_in(output: Any) -> list[tuple[str, torch.Tensor]]:
    """``(label, tensor)`` for up to MAX_TENSORS tensors, depth-first, at most MAX_DEPTH deep."""
    found: list[tuple[str, torch.Tensor]] = []
    _walk(output, "", True, 0, found)
    return found


def _children(obj: Any) -> Iterator[tuple[str, Any]] | None:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return ((f".{f.name}", getattr(obj, f.name, None)) for f in dataclasses.fields(obj))
    if isinstance(obj, tuple) and hasattr(type(obj), "_fields"):  # namedtuple
        return ((f".{name}", value) for name, value in zip(obj._fields, obj, strict=True))
    if isinstance(obj, (tuple, list)):
        return ((f"[{i}]", value) for i, value in enumerate(obj))
    if isinstance(obj, Mapping):
        return ((f".{key}", value) for key, value in obj.items())
    return None


def _walk(obj: Any, label: str, first: bool, depth: int, found: list[tuple[str, torch.Tensor]]) -> None:
    if isinstance(obj, torch.Tensor):
        found.append(("" if first else label, obj))
        return
    if depth >= MAX_DEPTH:
        return
    children = _children(obj)
    if children is None:
        return
    for i, (key, value) in enumerate(children):
        if len(found) >= MAX_TENSORS:
            return
        _walk(value, label + key, first and i == 0, depth + 1, found)
