"""The tensors in a call's arguments or outputs: found, sized, copied or moved, whatever the tree."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

MAX_DEPTH = 32  # deeper parts of a tree are left as they are


def tensors_of(tree: Any, depth: int = 0) -> list[torch.Tensor]:
    """Every tensor in ``tree`` (tuples, lists, mappings, dataclasses), uncapped: what sizes a bundle."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if depth > MAX_DEPTH:
        return []
    if isinstance(tree, dict) or _mapping(tree):
        return [t for v in tree.values() for t in tensors_of(v, depth + 1)]
    if isinstance(tree, (tuple, list)):
        return [t for v in tree for t in tensors_of(v, depth + 1)]
    if hasattr(tree, "__dataclass_fields__"):
        return [t for k in tree.__dataclass_fields__ for t in tensors_of(getattr(tree, k, None), depth + 1)]
    return []


def nbytes(tree: Any) -> int:
    """Bytes of the dense tensors in ``tree``."""
    return sum(t.numel() * t.element_size() for t in tensors_of(tree) if t.layout is torch.strided)


def map_tensors(tree: Any, fn: Callable[[torch.Tensor], torch.Tensor], depth: int = 0) -> Any:
    """``tree`` with ``fn`` applied to its dense tensors; mappings become dicts (a Hugging Face
    ``ModelOutput`` too), plain tuples and lists keep their type, other leaves stay as they are."""
    if isinstance(tree, torch.Tensor):
        return fn(tree) if tree.layout is torch.strided and not tree.is_meta else tree
    if depth > MAX_DEPTH:
        return tree
    if isinstance(tree, dict) or _mapping(tree):
        return {k: map_tensors(v, fn, depth + 1) for k, v in tree.items()}
    if type(tree) in (tuple, list):
        return type(tree)(map_tensors(v, fn, depth + 1) for v in tree)
    return tree


def copied(tree: Any) -> Any:
    """``tree`` with its tensors copied on their device (asynchronous on accelerators)."""
    with torch.no_grad():
        return map_tensors(tree, lambda t: t.detach().clone())


def _mapping(tree: Any) -> bool:
    return hasattr(tree, "keys") and hasattr(tree, "items") and not isinstance(tree, type)
