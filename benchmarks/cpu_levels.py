"""The C kernel's vector paths side by side on this CPU: portable, AVX2, AVX-512 (where present).

Per dtype, the kernel's throughput on a BERT-base-sized activation (batch 8 x seq 128 x 768 and
x 3072, torch's threads, the median of interleaved repeats) beside ``x.sum()`` (the one-read
floor), and, with ``--bert``, BERT-base's
every-forward overhead with the watch on each level (interleaved plain/watched pairs in one
process, as in ``benchmarks/overhead.py``).

Usage:
    python benchmarks/cpu_levels.py                  # kernel throughput per level
    python benchmarks/cpu_levels.py --bert --rounds 10
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

import torchwatch as tw
from torchwatch._casts import cast_plan
from torchwatch.kernels import cpu, host_stats
from torchwatch.stats import DEFAULT_CAST_DTYPES


def kernel_rates(repeats: int) -> dict[str, dict[str, float]]:
    levels = range(cpu.simd_levels()[1] + 1)
    out: dict[str, dict[str, float]] = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        plan = cast_plan(dtype, DEFAULT_CAST_DTYPES)
        for width in (768, 3072):
            x = torch.randn(8 * 128, width).mul_(0.5).to(dtype)
            times: dict[int | str, list[float]] = {level: [] for level in levels}
            times["sum"] = []  # the one-read floor: torch's own reduction, all its threads
            for _ in range(repeats):
                t = time.perf_counter()
                x.sum()
                times["sum"].append(time.perf_counter() - t)
                for level in levels:
                    with cpu.simd_level(level):
                        t = time.perf_counter()
                        host_stats(x, plan)
                        times[level].append(time.perf_counter() - t)
            size = x.numel() * x.element_size()
            gbs = {(cpu.LEVELS[lv] if isinstance(lv, int) else lv): size / statistics.median(ts) / 1e9
                   for lv, ts in times.items()}  # fmt: skip
            out[f"{str(dtype).removeprefix('torch.')} [1024, {width}]"] = gbs
    return out


def bert_overhead(rounds: int, batch: int) -> dict[str, float]:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    base = BertModel(BertConfig()).eval()
    plain, watched = copy.deepcopy(base), copy.deepcopy(base)
    watch = tw.attach(watched, flush_every=100)
    ids = torch.randint(0, 30522, (batch, 128), generator=torch.Generator().manual_seed(1))
    levels = range(1, cpu.simd_levels()[1] + 1)
    ratios: dict[int, list[float]] = {level: [] for level in levels}
    with torch.inference_mode():
        plain(ids)
        watched(ids)
        for _ in range(rounds):
            for level in levels:
                with cpu.simd_level(level):
                    t0 = time.perf_counter()
                    plain(ids)
                    t1 = time.perf_counter()
                    watched(ids)
                    ratios[level].append((time.perf_counter() - t1) / (t1 - t0))
    watch.detach()
    return {cpu.LEVELS[lv]: 100 * (statistics.median(r) - 1) for lv, r in ratios.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--bert", action="store_true", help="also BERT-base every-forward overhead per level")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results: dict[str, object] = {"levels": cpu.simd_levels(), "kernel_gb_per_s": kernel_rates(args.repeats)}
    for case, rates in results["kernel_gb_per_s"].items():  # type: ignore[union-attr]
        print(f"{case:<22}", "  ".join(f"{k} {v:6.2f} GB/s" for k, v in rates.items()))
    if args.bert:
        results["bert_overhead_percent"] = over = bert_overhead(args.rounds, args.batch)
        print(f"BERT-base batch {args.batch} every forward:", "  ".join(f"{k} {v:+.2f}%" for k, v in over.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
