"""What the magnitude-histogram monitor costs on CPU, beside the default watch and the one-read floor.

A ResNet-style stack of 3x3 convolutions (batch 8, 64 channels, 56x56, fp32), every leaf watched.
Four variants run interleaved in one process, one forward each per round: plain, the one-read floor
(a hook doing only ``out.sum()`` on every leaf), the default watch, and the default watch plus
``tw.monitors.Histograms()``. Reported: the median over rounds of each variant's time over the
plain forward's in the same round, minus 1.

    .venv/bin/python benchmarks/histograms_cost.py --rounds 30
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import torchwatch as tw


def _model() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU()]
    return nn.Sequential(*layers).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=30)
    args = p.parse_args()
    x = torch.randn(8, 64, 56, 56)
    models = {name: _model() for name in ("plain", "floor", "watch", "watch+histograms")}
    leaves = lambda m: [c for c in m.modules() if not list(c.children())]  # noqa: E731

    def read_once(module: nn.Module, args: object, out: torch.Tensor) -> None:
        out.sum()  # one read of the output by torch's own reduction; returns None: the output is kept

    for leaf in leaves(models["floor"]):
        leaf.register_forward_hook(read_once)
    watches = [tw.attach(models["watch"], rules=[]),
               tw.attach(models["watch+histograms"], rules=[], monitors=[tw.monitors.Histograms()])]  # fmt: skip
    ratios: dict[str, list[float]] = {name: [] for name in models if name != "plain"}
    with torch.inference_mode():
        for m in models.values():
            for _ in range(3):
                m(x)
        for _ in range(args.rounds):
            times = {}
            for name, m in models.items():
                start = time.perf_counter()
                m(x)
                times[name] = time.perf_counter() - start
            for name in ratios:
                ratios[name].append(times[name] / times["plain"] - 1)
    for w in watches:
        w.detach()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds, batch 8x64x56x56 fp32")
    for name, r in ratios.items():
        q = statistics.quantiles(r, n=4)
        print(f"  {name:<18} {100 * statistics.median(r):+7.1f}%  (IQR {100 * q[0]:+.1f} .. {100 * q[2]:+.1f}%)")


if __name__ == "__main__":
    main()
