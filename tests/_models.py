"""Small models for tests."""

from __future__ import annotations

import math
from collections import namedtuple
from dataclasses import dataclass

import torch
from torch import nn


class Inject(nn.Module):
    """Writes ``value`` into the first feature on the listed call numbers (0-based)."""

    def __init__(self, value: float = math.nan, at: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.value = value
        self.at = set(at)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        call = self.calls
        self.calls += 1
        if call in self.at:
            x = x.clone()
            x[..., 0] = self.value
        return x


def mlp(width: int = 16, *, inject: Inject | None = None) -> nn.Sequential:
    """0: Linear, 1: Inject/Identity-free ReLU chain; names are '0', '1', ..."""
    layers: list[nn.Module] = [nn.Linear(width, width)]
    if inject is not None:
        layers.append(inject)
    layers += [nn.ReLU(), nn.Dropout(0.1), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 4)]
    return nn.Sequential(*layers).eval()


Pair = namedtuple("Pair", ["main", "aux"])


@dataclass
class Out:
    logits: torch.Tensor | None
    hidden: torch.Tensor
    extra: object = None


class Structured(nn.Module):
    """Returns whatever ``make(x)`` builds: for output-structure tests."""

    def __init__(self, make) -> None:
        super().__init__()
        self.make = make

    def forward(self, x: torch.Tensor):
        return self.make(x)


class Wrapper(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor):
        self.inner(x)
        return x.sum()


def classifier(seed: int = 0) -> nn.Sequential:
    """A small deterministic classifier (factory for CLI tests: ``_models:classifier``)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 10)).eval()


def classifier_inputs() -> torch.Tensor:
    return torch.randn(64, 12, generator=torch.Generator().manual_seed(5))


class Tagger(nn.Module):
    """Token ids (and an optional float feature tensor) in, per-token logits out."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(3000, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, input_ids, attention_mask=None, features=None):
        h = self.emb(input_ids)
        if features is not None:
            h = h + features.mean()
        return {"logits": self.head(h)}
