"""What the input, output-quality and per-module timing monitors cost on BERT-base CPU inference,
on top of the activation statistics; and what shadow mode costs the primary.

Method (as ``overhead.py``): each configuration runs on its own copy of the same model (same
weights). In every round each pair's two blocks run back to back, in alternating order, and the
per-pair ratio of block times is kept; reported are medians and interquartile ranges of the ratios.

* ``stats``: ``tw.attach(model, inputs=False)`` — activation statistics and latency only;
* ``+ inputs/outputs``: ``inputs=True, outputs="logits"`` (the three integer inputs' frequency
  sketches and the classifier head's quality); compared with ``stats``;
* ``+ timing``: the same plus ``timing=True``; compared with ``stats``;
* ``stats`` is also compared with the plain model, for scale.

Shadow: per-call latency of a plain primary vs the same primary with ``tw.shadow(primary, candidate,
sample=s)``, blocks of calls interleaved; medians, p99 and means.

Usage:
    python benchmarks/edges.py                 # batch 1 and 8, and the shadow sections (~12 minutes)
    python benchmarks/edges.py --quick         # a smoke run, not a measurement
    python benchmarks/edges.py --micro         # only the serving-thread microbenchmarks
    python benchmarks/edges.py --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time

import torch
from torch import nn

import torchwatch as tw

SEQ = 128


def bert_classifier() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(num_labels=3)).eval()


def batch(size: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(size)
    ids = torch.randint(1000, 30000, (size, SEQ), generator=g)
    mask = torch.ones_like(ids)
    mask[:, SEQ * 3 // 4 :] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def _block(model: nn.Module, inputs: dict[str, torch.Tensor], n: int) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for _ in range(n):
            model(**inputs)
    return time.perf_counter() - start


def _summary(ratios: list[float]) -> dict[str, float]:
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {"median_pct": 100 * (statistics.median(ratios) - 1), "q1_pct": 100 * (q[0] - 1),
            "q3_pct": 100 * (q[2] - 1), "pairs": len(ratios)}  # fmt: skip


def monitors(batches: list[int], rounds: int) -> dict:
    base = bert_classifier()
    logdir = tempfile.mkdtemp(prefix="tw-edges-")
    models = {name: copy.deepcopy(base) for name in ("plain", "stats", "edges", "timing")}
    sink = lambda name: [tw.TensorBoardSink(f"{logdir}/{name}")]  # noqa: E731
    watches = [
        tw.attach(models["stats"], inputs=False, sinks=sink("stats")),
        tw.attach(models["edges"], inputs=True, outputs="logits", sinks=sink("edges")),
        tw.attach(models["timing"], inputs=True, outputs="logits", timing=True, sinks=sink("timing")),
    ]
    pairs = {"stats vs plain": ("plain", "stats"), "+ inputs/outputs vs stats": ("stats", "edges"),
             "+ timing vs stats": ("stats", "timing")}  # fmt: skip
    out: dict = {}
    for size in batches:
        inputs = batch(size)
        n = max(1, 4 // size)
        for m in models.values():
            _block(m, inputs, 3)  # warm-up
        ratios: dict[str, list[float]] = {k: [] for k in pairs}
        for r in range(rounds):
            for label, (a, b) in pairs.items():
                if r % 2:
                    tb, ta = _block(models[b], inputs, n), _block(models[a], inputs, n)
                else:
                    ta, tb = _block(models[a], inputs, n), _block(models[b], inputs, n)
                ratios[label].append(tb / ta)
        ms = 1e3 * _block(models["plain"], inputs, n) / n
        out[f"batch {size}"] = {"plain_ms_per_call": ms, **{k: _summary(v) for k, v in ratios.items()}}
        shown = {k: round(v["median_pct"], 2) for k, v in out[f"batch {size}"].items() if isinstance(v, dict)}
        print(f"batch {size}: plain {ms:.1f} ms/call", shown)
    snap = watches[1].snapshot()
    out["check"] = {"input_positions": sorted(snap.inputs), "output_rows": snap.outputs.rows}
    for w in watches:
        w.detach()
    return out


class _Head(nn.Module):
    """BERT-shaped inputs, a 3-class head and almost no work: what remains is the monitors' cost."""

    def __init__(self) -> None:
        super().__init__()
        self.classifier = nn.Linear(4, 3)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        return {"logits": self.classifier(torch.ones(input_ids.shape[0], 4))}


def monitor_call_cost(calls: int) -> dict:
    """Serving-thread microseconds per call of the input and output monitors (three [1, 128]
    integer inputs, a 3-class head), and of timing one module, on a model that does almost nothing."""
    inputs = batch(1)
    models = {name: _Head() for name in ("stats", "edges", "timing")}
    watches = [
        tw.attach(models["stats"], inputs=False, rules=[]),
        tw.attach(models["edges"], outputs="logits", rules=[]),
        tw.attach(models["timing"], outputs="logits", timing=True, rules=[]),
    ]
    per: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():
        _block(m, inputs, 100)
    for _ in range(15):
        for name, m in models.items():
            per[name].append(1e6 * _block(m, inputs, calls // 15) / (calls // 15))
    us = {k: statistics.median(v) for k, v in per.items()}
    for w in watches:
        w.detach()
    out = {"stats_only_us": us["stats"], "inputs_outputs_added_us": us["edges"] - us["stats"],
           "timing_one_module_added_us": us["timing"] - us["edges"]}  # fmt: skip
    print("monitor call cost:", out)
    return out


def shadow_hook_cost(calls: int) -> dict:
    """Serving-thread cost of shadow mode on a 100-us model: the hooks on unsampled calls, and the
    copies on sampled ones, amortised at sample=0.01 (the candidate is a no-op so that nothing else
    competes for the cores)."""
    torch.manual_seed(0)
    primary = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    plain = copy.deepcopy(primary)
    x = torch.randn(8, 256)
    sh = tw.shadow(primary, nn.Identity(), sample=0.01, seed=1, max_pending=10_000)
    per: dict[str, list[float]] = {"plain": [], "shadow": []}
    with torch.inference_mode():
        for r in range(20):
            order = (("plain", plain), ("shadow", primary)) if r % 2 else (("shadow", primary), ("plain", plain))
            for name, model in order:
                t = time.perf_counter()
                for _ in range(calls // 20):
                    model(x)
                per[name].append((time.perf_counter() - t) / (calls // 20))
    r = sh.close()
    us = {k: 1e6 * statistics.median(v) for k, v in per.items()}
    out = {"plain_us": us["plain"], "shadow_us": us["shadow"], "added_us": us["shadow"] - us["plain"],
           "sampled": r.sampled, "calls": r.seen}  # fmt: skip
    print("shadow hooks:", out)
    return out


def shadow_cost(samples: list[float], calls: int, block: int) -> dict:
    base = bert_classifier()
    primaries = {s: copy.deepcopy(base) for s in [0.0, *samples]}  # 0.0: the plain primary
    shadows = {s: tw.shadow(primaries[s], copy.deepcopy(base), sample=s, seed=1, max_pending=4) for s in samples}
    inputs = batch(1)
    lat: dict[float, list[float]] = {s: [] for s in primaries}
    for m in primaries.values():
        _block(m, inputs, 3)
    with torch.inference_mode():
        for _ in range(calls // block):
            for s, model in primaries.items():
                for _ in range(block):
                    t = time.perf_counter()
                    model(**inputs)
                    lat[s].append(time.perf_counter() - t)
    out = {}
    for s, values in lat.items():
        values.sort()
        p99 = values[int(0.99 * len(values))]
        out[f"sample {s}"] = {"median_ms": 1e3 * statistics.median(values), "p99_ms": 1e3 * p99,
                              "mean_ms": 1e3 * statistics.fmean(values), "calls": len(values)}  # fmt: skip
    for s, sh in shadows.items():
        r = sh.close()
        out[f"sample {s}"].update(compared=r.calls, dropped=r.dropped, top1=r.outputs[0].top1 if r.outputs else None)
    plain = out["sample 0.0"]
    for s in samples:
        o = out[f"sample {s}"]
        o["median_pct"] = 100 * (o["median_ms"] / plain["median_ms"] - 1)
        o["mean_pct"] = 100 * (o["mean_ms"] / plain["mean_ms"] - 1)
    print("shadow:", json.dumps(out, indent=1))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--quick", action="store_true", help="few rounds: a smoke run, not a measurement")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--micro", action="store_true", help="only the serving-thread microbenchmarks (~1 minute)")
    args = p.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    machine = {"torch": torch.__version__, "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    micro = {"monitor_call_cost": monitor_call_cost(3_000 if args.quick else 30_000)}
    if args.micro:
        micro["shadow_hooks"] = shadow_hook_cost(2_000 if args.quick else 40_000)
        results = {"machine": machine, **micro}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        return
    results = {
        "machine": machine,
        **micro,
        "monitors": monitors(args.batches, 3 if args.quick else 15),
        "shadow_hooks": shadow_hook_cost(2_000 if args.quick else 40_000),
        "shadow": shadow_cost([0.01], 40 if args.quick else 240, 20),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
