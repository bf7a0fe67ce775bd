"""What torchwatch costs on BERT-base CPU inference, side by side with the tools it replaces.

Method: every configuration runs on its own copy of the same model (same weights), so hooks that
cannot be removed (HF ``DebugUnderflowOverflow``) stay on their copy. Within each round, each
configuration's timed block runs right after a plain block of the same length on the plain copy;
the per-pair ratio (instrumented / plain) cancels slow drift of the machine. Reported: medians of
the block times and of the per-pair ratios, and the ratios' interquartile range.

``every=16`` is timed in blocks of 16 consecutive calls (one of which is measured), so its ratio
is the amortised cost per call. torchwatch runs as in production: a TensorBoard sink flushing on
its own thread every 100 calls (``flush_every=100``).

Usage:
    python benchmarks/overhead.py                     # batch 1 and 8, all peers (~10 minutes)
    python benchmarks/overhead.py --batches 1 --quick # a short smoke run
    python benchmarks/overhead.py --json out.json     # also write the numbers as JSON
    python benchmarks/overhead.py --gpu               # the GPU section (benchmarks/gpu_overhead.py)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch
from torch import nn

import torchwatch as tw
from torchwatch._select import IDENTITY_LIKE
from torchwatch.kernels import cpu

SEQ = 128


def bert_base() -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig()).eval()


def _leaves(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if not list(m.children()) and not isinstance(m, IDENTITY_LIKE)]


def setup_torchwatch(every: int) -> Callable[[nn.Module], object]:
    def setup(model: nn.Module) -> object:
        logdir = tempfile.mkdtemp(prefix="tw-bench-")
        return tw.attach(model, every=every, sinks=[tw.TensorBoardSink(logdir)], flush_every=100)

    return setup


def pooler_reference(model: nn.Module) -> tw.Reference:
    """A drift reference on BERT's pooled output (``pooler.activation``, 768-d), from random ids."""
    g = torch.Generator().manual_seed(2)
    data = [torch.randint(0, model.config.vocab_size, (16, SEQ), generator=g) for _ in range(14)]
    return tw.Reference.fit(model, data, modules=["pooler.activation"], window=8, resamples=2000)


def setup_torchwatch_drift(ref: tw.Reference) -> Callable[[nn.Module], object]:
    def setup(model: nn.Module) -> object:
        logdir = tempfile.mkdtemp(prefix="tw-bench-")
        return tw.attach(model, sinks=[tw.TensorBoardSink(logdir)], flush_every=100, drift=ref)

    return setup


def setup_item_hooks(model: nn.Module) -> object:
    """What people write by hand: seven statistics, one .item() each, on the same modules."""

    def hook(module: nn.Module, args: object, out: object) -> None:
        t = out[0] if isinstance(out, tuple) else out
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            _ = (
                t.mean().item(), t.std().item(), t.min().item(), t.max().item(), t.abs().max().item(),
                torch.isnan(t).sum().item(), (t == 0).sum().item(),
            )  # fmt: skip

    return [m.register_forward_hook(hook) for m in _leaves(model)]


def setup_hf_debug(model: nn.Module) -> object:
    from transformers.debug_utils import DebugUnderflowOverflow

    return DebugUnderflowOverflow(model)


def setup_torchinstruments(model: nn.Module) -> object:
    """Its default selection (every module), sampling every forward (a 1 us interval)."""
    from torchinstruments import inject_observer

    inject_observer(model, interval=datetime.timedelta(microseconds=1), output_dir=tempfile.mkdtemp(prefix="ti-bench-"))
    return None


def _available(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run(batches: list[int], quick: bool, every16_batches: list[int]) -> dict:
    base = bert_base()
    results: dict = {"machine": _machine(), "date": datetime.date.today().isoformat(), "batches": {}}
    ref = pooler_reference(base)
    for batch in batches:
        ids = torch.randint(0, base.config.vocab_size, (batch, SEQ), generator=torch.Generator().manual_seed(1))
        scale = 1 if batch == 1 else 0.4
        configs = [
            ("torchwatch, every forward", setup_torchwatch(1), 1, 6 if quick else int(40 * scale)),
            ("torchwatch + drift (pooler)", setup_torchwatch_drift(ref), 1, 4 if quick else int(20 * scale)),
            ("hand-written .item() hooks", setup_item_hooks, 1, 2 if quick else int(10 * scale)),
            ("HF DebugUnderflowOverflow", setup_hf_debug, 1, 2 if quick else int(10 * scale)),
        ]
        if batch in every16_batches:
            configs.insert(1, ("torchwatch, every=16", setup_torchwatch(16), 16, 2 if quick else int(20 * scale)))
        if _available("torchinstruments"):
            configs.append(
                ("torchinstruments, every forward", setup_torchinstruments, 1, 1 if quick or batch > 1 else 2)
            )
        plain = copy.deepcopy(base)
        models = {}
        for name, setup, _, _ in configs:
            m = copy.deepcopy(base)
            handle = setup(m)
            models[name] = (m, handle)
        with torch.inference_mode():
            for m in [plain] + [m for m, _ in models.values()]:
                m(ids)  # warm-up: allocators, kernels, lazy plans
            rounds = max(r for *_, r in configs)
            times: dict[str, list[tuple[float, float]]] = {name: [] for name, *_ in configs}
            rss_before = _rss_mb()
            for r in range(rounds):
                for name, _, block, n_rounds in configs[r % len(configs) :] + configs[: r % len(configs)]:
                    if r >= n_rounds:
                        continue
                    t_plain = _time(plain, ids, block)
                    t_cfg = _time(models[name][0], ids, block)
                    times[name].append((t_plain / block, t_cfg / block))
                    print(f"  batch {batch} round {r + 1}/{n_rounds} {name}: {100 * (t_cfg / t_plain - 1):+.2f}%",
                          file=sys.stderr, flush=True)  # fmt: skip
            rss_growth = _rss_mb() - rss_before
        watch = models["torchwatch, every forward"][1]
        results["batches"][batch] = {
            "rss_growth_mb_during_runs": round(rss_growth, 1),
            "torchwatch_errors": watch.errors,
            "configs": {name: _summary(pairs) for name, pairs in times.items()},
        }
        for _, handle in models.values():
            if isinstance(handle, tw.Watch):
                handle.detach()
    return results


def _time(model: nn.Module, ids: torch.Tensor, block: int) -> float:
    start = time.perf_counter()
    for _ in range(block):
        model(ids)
    return time.perf_counter() - start


def _summary(pairs: list[tuple[float, float]]) -> dict:
    ratios = sorted(c / p for p, c in pairs)
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {
        "rounds": len(pairs),
        "plain_ms": round(1e3 * statistics.median(p for p, _ in pairs), 2),
        "instrumented_ms": round(1e3 * statistics.median(c for _, c in pairs), 2),
        "overhead_pct": round(100 * (statistics.median(ratios) - 1), 2),
        "overhead_iqr_pct": [round(100 * (q[0] - 1), 2), round(100 * (q[2] - 1), 2)],
    }


def _machine() -> dict:
    model_name = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model_name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": model_name,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "torchwatch_kernel": "C, AVX2" if cpu.simd() else ("C, portable" if cpu.available else "torch ops"),
    }


def _print_table(results: dict) -> None:
    print(f"\nmachine: {results['machine']}")
    for batch, res in results["batches"].items():
        growth = res["rss_growth_mb_during_runs"]
        print(f"\nBERT-base fp32, CPU, batch {batch}, seq {SEQ} (RSS growth during runs: {growth} MB)")
        print(f"{'configuration':<34} {'rounds':>6} {'plain ms':>10} {'with ms':>10} {'overhead':>9}  IQR")
        for name, s in res["configs"].items():
            lo, hi = s["overhead_iqr_pct"]
            print(f"{name:<34} {s['rounds']:>6} {s['plain_ms']:>10.1f} {s['instrumented_ms']:>10.1f} "
                  f"{s['overhead_pct']:>+8.2f}%  [{lo:+.2f}%, {hi:+.2f}%]")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--every16-batches", type=int, nargs="*", default=[1], help="batches to time every=16 at")
    p.add_argument("--quick", action="store_true", help="few rounds: a smoke run, not a measurement")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--gpu", action="store_true", help="run the GPU section instead (benchmarks/gpu_overhead.py)")
    args = p.parse_args()
    if args.gpu:
        import gpu_overhead

        gpu_overhead.run(["bert", "gpt2"], smoke=False, out_path=args.json)
        return
    results = run(args.batches, args.quick, args.every16_batches)
    _print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
