"""Rollout verdicts' error rates, measured: thousands of simulated rollouts per scenario.

Each scenario replays many independent rollouts of one metric, its sequential tests read after
every batch (what a controller polling the verdict does), until a decision or the sample cap:

* A/A and "at the tolerance" (the null's boundary, the hardest case for a false rollback);
* A/B with known effects (power and the samples a decision takes);
* beside them, a fixed-sample z-test at the same level **peeked** after every batch: the error a
  dashboard-and-threshold rollout makes.

The sequential tests are the ones :func:`torchwatch.rollout` uses (:class:`MeanTest` at the
tolerance on each side, the rollback level split over the default metrics as the rollout does;
:class:`QuantileMetric` for latency), run as many side by side (``width``) for speed. The last
section runs whole A/A and A/B rollouts through ``tw.rollout`` on a small classifier.

Usage: python benchmarks/rollout_sim.py [--runs 2000] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time

import numpy as np
import torch
from torch import nn

import torchwatch as tw
from torchwatch.rollout.evidence import QuantileMetric
from torchwatch.rollout.sequential import MeanTest

ALPHA_ROLLBACK, ALPHA_PROMOTE = 0.01, 0.05
METRICS = 5  # the canary's default metrics without labels: the rollback level is split over them
Z_EACH, Z_ROLLOUT = 3.540, 2.326  # one-sided normal quantiles at 0.002 (one metric's share) and 0.01


def mean_scenario(name: str, draw, *, tol: float, low: float, runs: int, batch: int, cap: int) -> dict:
    """``draw(rng, runs, batch)`` -> values (runs, batch) in [low, 1]; worse above ``tol``."""
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    alpha_each = ALPHA_ROLLBACK / METRICS
    m = (tol - low) / (1 - low)
    rollback = MeanTest(m, "above", alpha_each, width=runs)
    promote = MeanTest(m, "below", ALPHA_PROMOTE, width=runs)
    z_rollback = np.zeros(runs, dtype=np.int64)
    z_rollout = np.zeros(runs, dtype=np.int64)
    total = np.zeros(runs)
    total_sq = np.zeros(runs)
    n = 0
    while n < cap:
        v = draw(rng, runs, batch)
        x = (v - low) / (1 - low)
        rollback.update(x.T)
        promote.update(x.T)
        n += batch
        total += v.sum(1)
        total_sq += (v**2).sum(1)
        mean = total / n
        sd = np.sqrt(np.maximum(total_sq / n - mean**2, 1e-12))
        z = (mean - tol) / (sd / math.sqrt(n))  # looked at after every batch
        z_rollback[(z_rollback == 0) & (z > Z_EACH)] = n  # at the level the sequential test has
        z_rollout[(z_rollout == 0) & (z > Z_ROLLOUT)] = n  # at the rollout's whole level
        if ((rollback.rejected_at_each > 0) | (promote.rejected_at_each > 0)).all():
            break  # every rollout decided; the z-test had the same looks
    r, p = rollback.rejected_at_each, promote.rejected_at_each
    first_rollback = (r > 0) & ((p == 0) | (r <= p))
    first_promote = (p > 0) & ~first_rollback
    decided = np.where(first_rollback, r, np.where(first_promote, p, 0))
    return {
        "rollouts": runs,
        "rollback": round(float(first_rollback.mean()), 4),
        "promote": round(float(first_promote.mean()), 4),
        "undecided": round(float((decided == 0).mean()), 4),
        "median_samples": int(np.median(decided[decided > 0])) if (decided > 0).any() else None,
        "peeked_z_rollback": round(float((z_rollback > 0).mean()), 4),
        "peeked_z_rollback_at_1pct": round(float((z_rollout > 0).mean()), 4),
        "cap": n,
    }


def latency_scenario(slower: float, *, runs: int, cap: int, tol: float = 0.10) -> dict:
    rng = np.random.default_rng(int(slower * 1000))
    outcomes, samples = [], []
    for _ in range(runs):
        q = QuantileMetric("latency_p99", 0.99, tol, alpha_rollback=ALPHA_ROLLBACK / METRICS,
                           alpha_promote=ALPHA_PROMOTE)  # fmt: skip
        n = 0
        while q.decision == "continue" and n < cap:
            q.add("primary", rng.lognormal(0, 0.3, 500))
            q.add("candidate", slower * rng.lognormal(0, 0.3, 500))
            n += 500
        outcomes.append(q.decision)
        samples.append(n)
    out = {d: round(outcomes.count(d) / runs, 4) for d in ("rollback", "promote", "continue")}
    decided = [s for s, d in zip(samples, outcomes, strict=True) if d != "continue"]
    out.update(rollouts=runs, median_samples=int(np.median(decided)) if decided else None, cap=cap)
    return out


class SwapOnSome(nn.Module):
    def __init__(self, model: nn.Module, share: float) -> None:
        super().__init__()
        self.model, self.share = model, share

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model(x).clone()
        hit = (x[:, 0] * 1000).floor().remainder(100) < self.share * 100
        y[hit] = y[hit][:, [1, 0, 2, 3]]
        return y


def whole_rollouts(runs: int, mode: str, swap: float, cap: int = 3000) -> dict:
    outcomes, calls, estimates = [], [], []
    for seed in range(runs):
        torch.manual_seed(seed)
        primary = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
        candidate = SwapOnSome(copy.deepcopy(primary), swap) if swap else copy.deepcopy(primary)
        metrics = None if mode == "shadow" else ["confidence", "entropy", "class_mix", "errors"]
        gen = torch.Generator().manual_seed(seed)
        with tw.rollout(primary, candidate, mode=mode, share=0.5, seed=seed, metrics=metrics) as ro:
            n = 0
            with torch.inference_mode():
                while n < cap:
                    ro(torch.randn(16, 8, generator=gen))
                    n += 1
                    if n % 50 == 0:
                        ro.wait()
                        if ro.verdict().decision != "continue":
                            break
            verdict = ro.verdict()
            outcomes.append(verdict.decision)
            calls.append(n)
        with torch.inference_mode():  # the true disagreement rate, from 20,000 fresh rows
            x = torch.randn(20_000, 8, generator=torch.Generator().manual_seed(10_000 + seed))
            estimates.append(float((primary(x).argmax(-1) != candidate(x).argmax(-1)).double().mean()))
    out = {d: round(outcomes.count(d) / runs, 4) for d in ("rollback", "promote", "continue")}
    out.update(rollouts=runs, median_calls=int(np.median(calls)))
    # how often the swap changed the top class: at or below the tolerance no rollback is due, above
    # it a promotion is a false one
    truth = np.array(estimates)
    decisions = np.array(outcomes)
    out["true_disagreement_quartiles"] = [round(float(q), 4) for q in np.quantile(truth, [0.25, 0.5, 0.75])]
    out["above_tolerance"] = int((truth > 0.01).sum())
    out["false_promotions"] = int(((truth > 0.01) & (decisions == "promote")).sum())
    out["false_rollbacks"] = int(((truth <= 0.01) & (decisions == "rollback")).sum())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=2000)
    p.add_argument("--whole", type=int, default=100, help="whole rollouts through tw.rollout per case")
    p.add_argument("--only-whole", action="store_true", help="only the whole rollouts")
    p.add_argument("--json")
    args = p.parse_args()
    runs = args.runs
    started = time.time()
    results: dict = {}

    def bern(rate: float):
        return lambda rng, r, b: (rng.random((r, b)) < rate).astype(np.float64)

    def paired(shift: float):  # paired differences of confidences, sd 0.1
        return lambda rng, r, b: np.clip(rng.normal(shift, 0.1, (r, b)), -1, 1)

    cases = [
        ("agreement A/A (0% disagree)", bern(0.0), 0.01, 0.0),
        ("agreement at the tolerance (1%)", bern(0.01), 0.01, 0.0),
        ("agreement within (0.5%)", bern(0.005), 0.01, 0.0),
        ("agreement A/B (2%)", bern(0.02), 0.01, 0.0),
        ("agreement A/B (5%)", bern(0.05), 0.01, 0.0),
        ("confidence A/A (drop 0)", paired(0.0), 0.05, -1.0),
        ("confidence at the tolerance (drop 0.05)", paired(0.05), 0.05, -1.0),
        ("confidence A/B (drop 0.1)", paired(0.1), 0.05, -1.0),
    ]
    for name, draw, tol, low in [] if args.only_whole else cases:
        results[name] = mean_scenario(name, draw, tol=tol, low=low, runs=runs, batch=16, cap=40_000)
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    lat_runs = max(50, runs // 10)
    for name, slower in (("latency p99 A/A", 1.0), ("latency p99 at the tolerance (+10%)", 1.1),
                         ("latency p99 A/B (+20%)", 1.2)) if not args.only_whole else ():  # fmt: skip
        results[name] = latency_scenario(slower, runs=lat_runs, cap=60_000)
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    for name, mode, swap in (("whole canary A/A", "canary", 0.0), ("whole shadow A/A", "shadow", 0.0),
                             ("whole shadow, 5% of inputs with two classes swapped", "shadow", 0.05)):  # fmt: skip
        results[name] = whole_rollouts(args.whole, mode, swap)
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    results["seconds"] = round(time.time() - started, 1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
