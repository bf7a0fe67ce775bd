"""Walking a model's own tensors: where it lives, and its parameters and buffers as plain data."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .errors import ConfigError


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating-point parameter or buffer (None if it has none)."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return None


def model_tensors(model: nn.Module, verb: str = "read") -> dict[str, torch.Tensor]:
    """Parameters then buffers (non-persistent ones too), each object once, in module order.

    Raises:
        ConfigError: ``model`` is not a module, or a tensor holds no plain data (meta, sparse).
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"expected a torch.nn.Module, got {type(model).__name__}")
    found = {n: p.detach() for n, p in model.named_parameters()}
    found.update((n, b.detach()) for n, b in model.named_buffers() if b is not None)
    require_plain(found, f"cannot {verb} {{n}} tensors without plain data (meta or sparse)")
    return found


def require_plain(tensors: Mapping[str, object], problem: str, fix: str = "") -> None:
    """Raise :class:`ConfigError` naming the entries that are not tensors with plain strided data.

    ``problem`` is formatted with ``n``, the number of such entries; ``fix`` is appended.
    """
    bad = [
        name for name, t in tensors.items()
        if not isinstance(t, torch.Tensor) or t.is_meta or t.layout != torch.strided
    ]  # fmt: skip
    if bad:
        raise ConfigError(f"{problem.format(n=len(bad))}: {', '.join(repr(n) for n in bad[:5])}{fix}")
