"""What a rollout costs the serving thread per call, measured in one process.

Plain calls of the primary and calls through ``tw.rollout`` are interleaved in blocks (the
candidate is an identical copy, so routing a call to it costs the same model time); medians of
per-block microseconds per call, and the difference. Cases: canary at 5% and 50%, shadow at 1%
(the candidate runs on the shadow thread; the serving thread copies the sampled call), on a small
MLP classifier (the cost is nearly all torchwatch's) and a BERT-base classifier at batch 1.
The evidence thread shares the CPU with serving: its own time per call is printed too.

Usage: python benchmarks/rollout_cost.py [--blocks 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from torch import nn

import torchwatch as tw


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
        return model.eval(), torch.randn(16, 64)
    import transformers

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = transformers.BertForSequenceClassification(transformers.BertConfig(num_labels=2))

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=ids).logits

    return Classifier().eval(), torch.randint(0, 30000, (1, 128))


def per_call_us(fn, x: torch.Tensor, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn(x)
    return 1e6 * (time.perf_counter() - start) / calls


def case(model: nn.Module, x: torch.Tensor, *, mode: str, share: float, blocks: int, calls: int) -> dict:
    ro = tw.rollout(model, copy.deepcopy(model), mode=mode, share=share, seed=0, max_pending=1 << 16,
                    metrics=["confidence", "entropy", "class_mix", "errors"])  # fmt: skip
    plain, routed, drained = [], [], []
    with torch.inference_mode():
        for fn in (model, ro, model, ro):
            per_call_us(fn, x, calls)  # warm-up
        ro.wait()
        for _ in range(blocks):
            plain.append(per_call_us(model, x, calls))
            routed.append(per_call_us(ro, x, calls))
            start = time.perf_counter()
            ro.wait()  # the evidence thread's backlog after the block, timed apart from serving
            drained.append(1e6 * (time.perf_counter() - start) / calls)
    ro.close()
    p, r = statistics.median(plain), statistics.median(routed)
    return {"plain_us": round(p, 1), "rollout_us": round(r, 1), "added_us": round(r - p, 1),
            "added_pct": round(100 * (r / p - 1), 2), "dropped": ro.dropped,
            "evidence_drain_us_per_call": round(statistics.median(drained), 1)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=30)
    p.add_argument("--models", nargs="+", default=["mlp", "bert"])
    p.add_argument("--json")
    args = p.parse_args()
    results = {}
    for name in args.models:
        model, x = build(name)
        calls = 200 if name == "mlp" else 5
        for mode, share in (("canary", 0.05), ("canary", 0.5), ("shadow", 0.01)):
            key = f"{name}/{mode}/{share}"
            results[key] = case(model, x, mode=mode, share=share, blocks=args.blocks, calls=calls)
            print(f"{key}: {json.dumps(results[key])}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
