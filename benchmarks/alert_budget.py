"""False alerts on clean traffic and detection delays, default rules, on a CNN with mixed scenes.

The traffic of ``tests/_images.py`` (five kinds of scene mixed at random, 1-8 images a request:
interval statistics that depend on which kinds an interval held, as a pretrained CNN's do on real
photos), ``flush_every=5``, every default rule, ``attach(outputs="auto")``. Prints, per seed, the
alerts raised over ``--requests`` clean requests (after the 30-interval warm-up), and for four
faults injected after a clean warm-up the interval (of 5 requests) at which the first alert of
the expected rule came.

    .venv/bin/python benchmarks/alert_budget.py --seeds 10 --requests 1000
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _images import MEAN, STD, cnn, requests, serve  # the tests' traffic, shared on purpose

import torchwatch as tw

FLUSH = 5
FAULTS = {
    "unnormalised": {"baseline_absmax", "baseline_std", "input_shift", "cast_overflow"},
    "blue channel dead": {"input_shift"},
    "BatchNorm weights x8": {"baseline_std", "baseline_absmax"},
    "NaN in a conv weight": {"nonfinite"},
}


def clean(seed: int, n: int) -> tuple[int, int]:
    model = cnn()
    watch = tw.attach(model, flush_every=FLUSH, outputs="auto")
    found = serve(model, watch, requests(np.random.default_rng(seed), n))
    series = watch.snapshot().baselines.series
    watch.detach()
    return len(found), series


def delay(fault: str, seed: int) -> int | None:
    rng = np.random.default_rng(100 + seed)
    model = cnn()
    watch = tw.attach(model, flush_every=FLUSH, outputs="auto")
    serve(model, watch, requests(rng, 40 * FLUSH))
    with torch.no_grad():
        if fault == "BatchNorm weights x8":
            model[2][1].weight.mul_(8.0)
        if fault == "NaN in a conv weight":
            model[1][0].weight[0, 0, 0, 0] = math.nan
    try:
        for i in range(20):
            batches = requests(rng, FLUSH, normalize=fault != "unnormalised")
            if fault == "blue channel dead":
                for x in batches:
                    x[:, 2] = float(-MEAN[2, 0, 0] / STD[2, 0, 0])
            if {a.rule for a in serve(model, watch, batches)} & FAULTS[fault]:
                return i + 1
        return None
    finally:
        watch.detach()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--requests", type=int, default=1000)
    args = p.parse_args()
    warnings.simplefilter("ignore", tw.TorchwatchWarning)
    torch.set_num_threads(1)
    total = 0
    for seed in range(args.seeds):
        alerts, series = clean(seed, args.requests)
        total += alerts
        print(f"clean seed {seed}: {alerts} alert(s) in {args.requests} requests ({series} series)", flush=True)
    print(f"clean total: {total} alert(s) in {args.seeds} x {args.requests} requests")
    for fault in FAULTS:
        found = [delay(fault, s) for s in range(3)]
        print(f"{fault}: caught at interval {found} (intervals of {FLUSH} requests, 3 seeds)", flush=True)


if __name__ == "__main__":
    main()
