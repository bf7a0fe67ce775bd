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


# ---- real architectures built from configs (factories for `torchwatch replay --model _models:...`) ----


def tiny_bert() -> nn.Module:
    """A 2-layer BERT from transformers, built from its config (no download), eager attention."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                  vocab_size=500, max_position_embeddings=256, attn_implementation="eager")  # fmt: skip
    return transformers.BertModel(cfg).eval()


def tiny_gpt2() -> nn.Module:
    """A 2-layer GPT-2 language model from transformers, built from its config."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=500, n_positions=128,
                                  attn_implementation="eager")  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg).eval()


def small_cnn() -> nn.Module:
    """A torchvision-style convnet (conv-BN-ReLU blocks, pooling, a linear head), built from code."""
    torch.manual_seed(0)

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    return nn.Sequential(block(3, 8), nn.MaxPool2d(2), block(8, 16), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 10)).eval()  # fmt: skip
