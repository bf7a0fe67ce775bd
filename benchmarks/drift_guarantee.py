"""No-drift run lengths per reference draw, per detector: what the per-reference guarantee buys.

Synthetic embeddings as in ``drift_mixture.py`` (64-d Gaussians, window 32), or with ``--data
text`` the real sentence embeddings of ``drift_text.py`` (96-d spaCy vectors of docstring
sentences; references are random docs sentences, streams draw the others). For each of
``--draws`` references of ``--reference`` samples, fit with ``--guarantee`` (or ``none``), then
``--streams`` streams of fresh windows (from a 50,000-sample pool of the same population) run
through the live detectors' arithmetic — the joint p-value CUSUM and the three accumulating
detectors, at the thresholds ``OnlineDrift`` sets — until the first alarm (cap ``--cap``). The
test of the window being filled never runs here (windows arrive whole), so with four of the five
budget shares active the whole target is ``arl x 5/4`` windows. Reported per draw: the mean and
median run length and which detector alarmed first.

Usage:
    python benchmarks/drift_guarantee.py --reference 5000 --draws 4 --streams 200 --guarantee 0.9
    python benchmarks/drift_guarantee.py --reference 5000 --draws 4 --streams 200 --guarantee none
    python benchmarks/drift_guarantee.py --data text ...   (needs requirements/drift-bench.txt)
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import torch
from torch import nn

import torchwatch as tw
from torchwatch.monitors.drift.online import OnlineDrift
from torchwatch.monitors.drift.statistics import window_sums

sys.path.insert(0, os.path.dirname(__file__))
from drift_mixture import WINDOW, source


def run_lengths(ref: tw.Reference, pool: np.ndarray, streams: int, cap: int, rng: np.random.Generator,
                chunk: int = 100) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(first alarm per stream, detector index: 0 CUSUM, 1 PCA mean, 2 random features, 3 spread)."""
    monitor = OnlineDrift(ref, torch.device("cpu"), None)
    ((name, m),) = ref.modules.items()
    live = monitor.modules[name]
    rows = m.sample_features(pool)
    lam = ref.smoothing
    fitted = ((m.center_z, m.white_z), (m.center_phi, m.white_phi), (m.center_spread, m.white_spread))
    limits = [monitor.cusum.threshold] + [det.threshold for det in live.detectors]
    caps = [det.cap for det in live.detectors]
    s = np.zeros(streams)
    e = [np.zeros((streams, centre.size)) for centre, _ in fitted]
    first, who = np.full(streams, cap), np.full(streams, -1)
    alive = np.ones(streams, dtype=bool)
    for t0 in range(0, cap, chunk):
        sums = window_sums(rows, rng.integers(0, len(pool), size=(streams * chunk, WINDOW)))
        p = ref.joint_p(m.module_p(m.window_statistics(np.full(len(sums), float(WINDOW)), sums))[:, None])
        p = p.reshape(streams, chunk)
        sums = sums.reshape(streams, chunk, -1)
        vs = []
        for columns, (centre, white), pooled in zip(m.detector_columns(), fitted, m.pooled.tolist(), strict=True):
            scale = math.sqrt(WINDOW / (1 + WINDOW / pooled * (2 - lam) / lam))  # as standardised_means
            vs.append(np.einsum("ij,abj->abi", white, scale * (sums[:, :, columns] / WINDOW - centre)))
        for t in range(chunk):
            s = np.maximum(0.0, s - np.log(np.maximum(p[:, t], 1e-300)) - ref.delta)
            hit = [s >= limits[0]]
            for j in range(3):
                v = vs[j][:, t]
                norm = np.sqrt((v * v).sum(1))
                v = v * np.minimum(1.0, caps[j] / np.maximum(norm, 1e-300))[:, None]
                e[j] = (1 - lam) * e[j] + lam * v
                hit.append((2 - lam) / lam * (e[j] ** 2).sum(1) >= limits[1 + j])
            hit = np.array(hit)
            new = hit.any(0) & alive
            first[new] = t0 + t + 1
            who[new] = hit[:, new].argmax(0)
            alive &= ~new
            s[hit[0]] = 0.0
        if not alive.any():
            break
    return first, who


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", type=int, default=5000)
    p.add_argument("--draws", type=int, default=4)
    p.add_argument("--streams", type=int, default=200)
    p.add_argument("--arl", type=float, default=200)
    p.add_argument("--cap", type=int, default=2000)
    p.add_argument("--guarantee", default="0.9", help="a probability, or none")
    p.add_argument("--data", choices=("synthetic", "text"), default="synthetic")
    args = p.parse_args()
    guarantee = None if args.guarantee == "none" else float(args.guarantee)
    if args.data == "text":
        from drift_text import embeddings

        docs = embeddings()[0]["docs"].astype(np.float64)
    else:
        sample = source(2.6)
        pool = sample(50_000, torch.Generator().manual_seed(99)).double().numpy()
    for d in range(args.draws):
        start = time.time()
        if args.data == "text":  # as drift_text.py's no-drift part: a random reference, the rest for streams
            order = np.random.default_rng(1000 + d).permutation(len(docs))
            x, pool = torch.from_numpy(docs[order[: args.reference]]), docs[order[args.reference :]]
        else:
            x = sample(args.reference, torch.Generator().manual_seed(1 + d))
        ref = tw.Reference.fit(nn.Sequential(nn.Identity()), x.split(500), modules=["0"], window=WINDOW,
                               arl=args.arl, resamples=4000, seed=d, guarantee=guarantee)  # fmt: skip
        first, who = run_lengths(ref, pool, args.streams, args.cap, np.random.default_rng(d))
        by = np.bincount(who + 1, minlength=5)[1:]
        print(
            f"{args.data}: guarantee {args.guarantee}, reference {args.reference}, draw {d}: "
            f"mean run {first.mean():.0f} median {np.median(first):.0f} "
            f"(capped at {args.cap}: {(who < 0).mean():.0%}); first alarms by "
            f"CUSUM/PCA mean/random features/spread {by.tolist()} ({time.time() - start:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
