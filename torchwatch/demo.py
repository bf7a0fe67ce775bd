"""``torchwatch demo``: serve a small model, break it silently, show what torchwatch caught.

The model is built and trained here in about a second (no download): a feature-standardising
input layer followed by an MLP classifier. Traffic runs in two phases; in the second a config
reload sets one feature's scale to zero, so that feature becomes Inf, the network turns it into
NaN, and ``argmax`` quietly answers class 0. Nothing raises. torchwatch names the module
where it started, the request that first hit it, and how far it spread.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import TextIO

import torch
from torch import nn

from .alerts import Alert
from .sinks import JsonlSink, TensorBoardSink
from .watch import attach

FEATURES, CLASSES = 16, 4


class Standardize(nn.Module):
    """``(x - mean) / scale`` with statistics loaded from the training set."""

    def __init__(self, mean: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale


def build_model(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A trained classifier and the class centres its data comes from."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES, FEATURES, generator=g) * 3 + 10
    x, y = sample(centres, 2048, g)
    model = nn.Sequential(
        Standardize(x.mean(0), x.std(0)),
        nn.Linear(FEATURES, 64),
        nn.LayerNorm(64),
        nn.GELU(),
        nn.Linear(64, 64),
        nn.GELU(),
        nn.Linear(64, CLASSES),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), centres


def sample(centres: torch.Tensor, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return centres[y] + torch.randn(n, FEATURES, generator=g), y


@dataclass
class Outcome:
    """What the demo observed; ``caught`` is what the exit code reports."""

    requests: int
    accuracy: dict[str, float]
    alerts: list[Alert] = field(default_factory=list)
    origin: str | None = None
    first_call: int | None = None
    first_trace: str | None = None
    spread: list[str] = field(default_factory=list)
    logdir: str = ""

    @property
    def caught(self) -> bool:
        return self.origin == "0"


def run(
    *, requests: int = 400, batch: int = 8, logdir: str | None = None, seed: int = 0, out: TextIO = sys.stdout
) -> Outcome:
    """Serve ``requests`` batches, break the model halfway, and report. Returns the outcome."""
    torch.manual_seed(seed)
    logdir = logdir or tempfile.mkdtemp(prefix="torchwatch-demo-")
    say = out.write
    say("torchwatch demo: a classifier serving traffic; halfway, a config reload sets one\n")
    say("feature's scale to 0. Nothing raises. What does torchwatch see?\n\n")
    started = time.perf_counter()
    model, centres = build_model(seed)
    say(f"  model     trained in {time.perf_counter() - started:.1f}s: {_describe(model)}\n")

    alerts: list[Alert] = []
    sinks = [TensorBoardSink(os.path.join(logdir, "tensorboard")), JsonlSink(os.path.join(logdir, "stats.jsonl"))]
    watch = attach(model, sinks=sinks, flush_every=25, on_nonfinite=alerts.append)
    g = torch.Generator().manual_seed(seed + 1)
    correct = {"before": [0, 0], "after": [0, 0]}
    broken_at = requests // 2
    with watch, torch.inference_mode():
        for i in range(requests):
            if i == broken_at:
                model[0].scale[3] = 0.0  # the silent failure: a bad config reload
            x, y = sample(centres, batch, g)
            with watch.context(trace_id=f"req-{i:05d}"):
                pred = model(x).argmax(-1)
            phase = "before" if i < broken_at else "after"
            correct[phase][0] += int((pred == y).sum())
            correct[phase][1] += batch
            _progress(i + 1, requests, out)
        snap = watch.snapshot()
    accuracy = {k: c / max(n, 1) for k, (c, n) in correct.items()}
    first = snap.nonfinite
    origin = next(iter(first.values())).origin if first else None
    outcome = Outcome(
        requests=requests, accuracy=accuracy, alerts=alerts, origin=origin,
        first_call=first[origin].call if origin in first else None,
        first_trace=first[origin].trace_id if origin in first else None,
        spread=[name for name in first if name != origin], logdir=logdir,
    )  # fmt: skip
    _report(outcome, snap, model, out)
    return outcome


def _describe(model: nn.Module) -> str:
    params = sum(p.numel() for p in model.parameters())
    return f"{len(model)} layers, {params:,} parameters"


def _progress(done: int, total: int, out: TextIO) -> None:
    if not out.isatty():
        return
    width = 30
    filled = width * done // total
    out.write(f"\r  serving   [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    if done == total:
        out.write("\n")
    out.flush()


def _report(o: Outcome, snap, model: nn.Module, out: TextIO) -> None:
    say = out.write
    say(f"  served    {o.requests} requests; no exception was raised\n")
    say(f"  accuracy  {o.accuracy['before']:.1%} before the reload, {o.accuracy['after']:.1%} after\n\n")
    if o.origin is None:
        say("torchwatch saw no non-finite values: the failure was NOT caught.\n")
        return
    names = {n: type(m).__name__ for n, m in model.named_modules()}
    say("What torchwatch caught:\n")
    say(f"  origin    module {o.origin!r} ({names.get(o.origin, '?')}) produced the first Inf/NaN\n")
    say(f"  when      root call {o.first_call}, request {o.first_trace!r}\n")
    say(f"  spread    to {len(o.spread)} later outputs: {', '.join(repr(n) for n in o.spread)}\n")
    say(f"  alerts    {len(o.alerts)} (one per affected call); first: {o.alerts[0].message}\n\n")
    say("  module  kind         calls       NaN      +Inf      -Inf  finite abs-max\n")
    for name, s in snap.items():
        absmax = "-" if math.isnan(s.absmax) else f"{s.absmax:.3g}"
        say(
            f"  {name:<7} {names.get(name, '?'):<12} {s.calls:>5} {s.nan:>9,} {s.posinf:>9,} {s.neginf:>9,}  {absmax}\n"
        )
    say(f"\nLogs: {o.logdir}\n  tensorboard --logdir {os.path.join(o.logdir, 'tensorboard')}\n")
    say("  (the Custom Scalars tab opens on NaN/Inf per module; stats.jsonl has every flush)\n")
