"""Finding the tensors in whatever a module returns, and calling a model on a batch.

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
from torch import nn

MAX_DEPTH = 6
MAX_TENSORS = 64
MAX_OUTPUTS = 4096  # tensors named by flatten_outputs


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


def call_batch(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on one batch the way torchwatch always does: a mapping as ``model(**batch)``
    (a tokenizer's ``BatchEncoding`` too), a tuple or list as ``model(*batch)``, else ``model(batch)``."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def flatten_outputs(output: Any) -> dict[str, torch.Tensor]:
    """Every tensor in a model's output with a stable dotted name (``"output"`` for a bare tensor).

    Walks containers the way the watch does (:func:`_children`: dataclasses and
    HF ``ModelOutput`` by field, namedtuples, sequences, mappings); ``None`` fields are skipped.
    """
    found: dict[str, torch.Tensor] = {}

    def walk(obj: Any, name: str, depth: int) -> None:
        if len(found) >= MAX_OUTPUTS or depth > 16:
            return
        if isinstance(obj, torch.Tensor):
            found[name or "output"] = obj
            return
        children = _children(obj)
        for key, value in children or ():
            key = key[1:] if key.startswith(".") else key[1:-1]  # ".field" / "[i]" -> "field" / "i"
            walk(value, f"{name}.{key}" if name else key, depth + 1)

    walk(output, "", 0)
    return found


def is_logits(name: str, t: torch.Tensor, n_outputs: int) -> bool:
    """Whether an output looks like classification logits (named so, or the only output)."""
    if t.dim() < 2 or t.shape[-1] < 2:
        return False
    return "logit" in name.lower() or n_outputs == 1
