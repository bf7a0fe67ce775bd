"""Small persistent shifts: a share of traffic from a second source, with and without the
accumulating detectors (synthetic embeddings; no extra packages).

Embeddings: 64-dimensional Gaussians with a spread of variances. The second source is the same
distribution moved ``--delta`` whitened standard deviations along a random direction inside the
top 10 principal components (so it is neither novelty nor a gross shift: each 32-sample window of
a 25% mixture moves the window's whitened mean by about ``0.25 · delta · sqrt(32)``). For each
mixture share (and a creep: the share rising from 0 to 50% over 50 windows), ``--streams``
streams of fresh windows run until the first drift alarm (cap ``--cap`` windows); reported: the
windows to detection (for the creep, the share reached by then) with the accumulating detectors
(the shipped detector) and with the per-window CUSUM alone at the whole budget (the detector
before them). ``--null`` instead measures no-drift run lengths at a short target ARL.

Usage:
    python benchmarks/drift_mixture.py [--reference 5000] [--delta 2.6] [--streams 10]
    python benchmarks/drift_mixture.py --null --arl 200 --streams 60
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import torch
from torch import nn

import torchwatch as tw
from torchwatch.monitors.drift.online import OnlineDrift

D = 64
WINDOW = 32


def source(delta: float):
    torch.manual_seed(0)
    mix = torch.randn(D, D) / math.sqrt(D) * torch.linspace(0.2, 2, D)
    evals, evecs = torch.linalg.eigh(mix.T @ mix)
    coef = torch.randn(10)
    other = (evecs[:, -10:] * evals[-10:].sqrt()) @ (coef / coef.norm() * delta)

    def sample(n: int, g: torch.Generator, share: float = 0.0) -> torch.Tensor:
        x = torch.randn(n, D, generator=g) @ mix
        k = round(n * share)
        x[:k] += other
        return x

    return sample


def delay(ref: tw.Reference, sample, share, seed: int, cap: int, accumulate: bool) -> int | None:
    """Windows until the first drift alarm (None within ``cap``); ``share``: a number, or a
    function of the window index (creep)."""
    monitor = OnlineDrift(ref, torch.device("cpu"), None)
    if not accumulate:
        monitor.cusum.threshold = ref.threshold(ref.arl)
        for det in monitor.modules["0"].detectors:
            det.threshold = math.inf
    mod = monitor.modules["0"]
    g = torch.Generator().manual_seed(seed)
    for w in range(cap):
        mod.sums.zero_()
        mod.count.zero_()
        monitor.observe("0", sample(WINDOW, g, share(w) if callable(share) else share))
        if any(a.rule == "drift" for a in monitor._evaluate(w, {"0": mod.sums[0].numpy().copy()}, w)):
            return w + 1
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", type=int, default=5000, help="reference samples")
    p.add_argument("--delta", type=float, default=2.6)
    p.add_argument("--arl", type=float, default=10_000)
    p.add_argument("--streams", type=int, default=10)
    p.add_argument("--cap", type=int, default=60)
    p.add_argument("--null", action="store_true")
    p.add_argument("--json")
    args = p.parse_args()
    sample = source(args.delta)
    g = torch.Generator().manual_seed(1)
    ref = tw.Reference.fit(nn.Sequential(nn.Identity()), sample(args.reference, g).split(500), modules=["0"],
                           window=WINDOW, arl=args.arl, resamples=4000)  # fmt: skip
    result: dict = {"reference": args.reference, "delta": args.delta, "arl": args.arl}
    if args.null:
        runs = [delay(ref, sample, 0.0, 1000 + s, int(10 * args.arl), True) or int(10 * args.arl)
                for s in range(args.streams)]  # fmt: skip
        result["null_runs"] = {"mean": float(np.mean(runs)), "median": float(np.median(runs)), "streams": len(runs)}
        print(f"no drift, target ARL {args.arl:g}: mean run {np.mean(runs):.0f} windows, median {np.median(runs):.0f}")
    else:
        for share in (0.1, 0.25, 0.5):
            for accumulate in (True, False):
                d = [delay(ref, sample, share, s, args.cap, accumulate) for s in range(args.streams)]
                key = f"{share:.0%} {'accumulating' if accumulate else 'cusum only'}"
                result[key] = d
                found = [x for x in d if x is not None]
                print(f"{key:<24} detected {len(found)}/{len(d)} within {args.cap}; windows: {d}")
        for accumulate in (True, False):  # creep: the share rises from 0 to 50% over 50 windows
            d = [delay(ref, sample, lambda w: min(0.5, w / 100), s, 50, accumulate) for s in range(args.streams)]
            key = f"creep {'accumulating' if accumulate else 'cusum only'}"
            result[key] = d
            at = [f"{min(0.5, (x - 1) / 100):.0%}" if x else "-" for x in d]
            print(f"{key:<24} share when detected: {at}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
