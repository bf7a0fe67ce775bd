"""What comparing replicas costs: one compare_replicas round and one canary re-check on BERT-base
(a one-rank gloo group: the probe is the per-rank cost; the exchange adds one store write and one
read per peer), and the serving path with a canary monitor attached but idle vs none.

    python benchmarks/fleet_cost.py
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch
import torch.distributed as dist
from transformers import BertConfig, BertModel

import torchwatch as tw
from torchwatch.distributed import compare_replicas


def main() -> None:
    torch.manual_seed(0)
    model = BertModel(BertConfig(attn_implementation="eager")).eval()
    ids = torch.randint(1000, 5000, (2, 16), generator=torch.Generator().manual_seed(1))
    canary = tw.Canary.record(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    dist.init_process_group("gloo", init_method=f"file://{tempfile.mkdtemp()}/rdzv", rank=0, world_size=1)
    rounds = []
    for _ in range(5):
        t = time.perf_counter()
        compare_replicas(model, canary)
        rounds.append(time.perf_counter() - t)
    dist.destroy_process_group()
    x = {"input_ids": torch.randint(1000, 5000, (8, 128)), "attention_mask": torch.ones(8, 128, dtype=torch.long)}
    with tw.attach(model) as watch:
        checks = watch.verify_canary_every(3600, canary)
        held, total = [], []
        for _ in range(5):
            t = time.perf_counter()
            checks.check_now()
            total.append(time.perf_counter() - t)
            held.append(checks.last.seconds)
    with torch.inference_mode():
        plain = []
        for _ in range(5):
            t = time.perf_counter()
            model(**x)
            plain.append(time.perf_counter() - t)
    print(f"compare_replicas round (1 rank, BERT-base, canary 2x16 tokens): median {statistics.median(rounds):.3f} s")
    print(f"canary re-check: model held {statistics.median(held) * 1e3:.1f} ms, whole check (with fingerprint) "
          f"{statistics.median(total):.3f} s")  # fmt: skip
    print(f"for scale, one plain forward at batch 8 x 128 tokens: {statistics.median(plain):.3f} s")


if __name__ == "__main__":
    main()
