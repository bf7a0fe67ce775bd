"""What torchwatch costs on CPU inference, beside the one-read floor and the tools it replaces.

Models: BERT-base (fp32, seq 128, batch 1 and 8), and two convnets built from code at batch 8,
224 x 224 (``benchmarks/convnets.py``): EfficientNet-Lite0, where depthwise convolutions make
activations large next to the arithmetic (the hard case), and ResNet-50.

**The one-read floor** is a forward hook on the same modules that only calls ``out.sum()`` on
each floating-point output (and a pre-hook doing the same for the root call's float inputs,
which torchwatch also measures): torch's own vectorised, multi-threaded reduction reading every
byte torchwatch reads once, nothing kept. Its overhead is what one read of the activations costs
on this machine; torchwatch is reported as a ratio of it (``x floor``), a figure that carries
across machines where absolute percentages do not (a faster CPU speeds the matmuls, not the read).

Method: every configuration runs on its own copy of the same model (same weights), so hooks that
cannot be removed (HF ``DebugUnderflowOverflow``) stay on their copy. Within each round, each
configuration's timed block runs right after a plain block of the same length on the plain copy,
the configurations in a rotating order; the per-pair ratio (instrumented / plain) cancels slow
drift of the machine. Reported: medians of the block times and of the per-pair ratios, and the
ratios' interquartile range.

The floor and torchwatch are also timed back to back in each of torchwatch's rounds (their order
alternating), and ``x floor`` is computed again from the median of those ratios: the floor's
overhead plus what torchwatch adds to a floor forward, over the floor's overhead. It does not
carry the noise of two separate plain blocks, which on a shared VM can move one median by several
points.

Page faults: glibc's allocator gives the memory of large activations back to the system between
forwards (chunks above its mmap threshold, and the top of its heap beyond its trim threshold), and
the kernel zeroes every page again on first touch. The benchmark reports the minor page faults of
one plain forward: where they are many (EfficientNet-Lite0 batch 8: ~82,000 here, 320 MB a forward,
a third of its CPU time in the kernel), the plain forward is slow and noisy and every percentage
small. ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4000000000`` in the environment
(or jemalloc / tcmalloc, as PyTorch's CPU tuning guide advises) keeps most of them on the heap;
RESULTS.md says which runs used it.

``every=16`` is timed in blocks of 16 consecutive calls (one of which is measured), so its ratio
is the amortised cost per call. torchwatch runs as in production: a TensorBoard sink flushing on
its own thread every 100 calls (``flush_every=100``).

Usage:
    python benchmarks/overhead.py                     # BERT batch 1 and 8, both convnets (~20 min)
    python benchmarks/overhead.py --models bert --batches 1 --quick   # a short smoke run
    python benchmarks/overhead.py --models efficientnet --json out.json
    python benchmarks/overhead.py --models efficientnet resnet50 --rounds 40   # more rounds, less noise
    python benchmarks/overhead.py --gpu               # the GPU section (benchmarks/gpu_overhead.py)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import convnets
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


def setup_floor(model: nn.Module) -> object:
    """The one-read floor: ``sum()`` of every float output of the watched modules, and of the
    root call's float inputs, nothing kept (see the module docstring)."""

    def read(value: object) -> None:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point():
                value.sum()
        elif isinstance(value, (tuple, list)):
            for item in value:
                read(item)
        elif isinstance(value, dict):
            for item in value.values():
                read(item)

    handles = [m.register_forward_hook(lambda m, a, out: read(out)) for m in _leaves(model)]
    handles.append(model.register_forward_pre_hook(lambda m, args: read(args)))
    return handles


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


FLOOR = "one-read floor (out.sum() hooks)"
WATCHED = "torchwatch, every forward"


def configs_for(
    model: str, batch: int, quick: bool, every16: bool, ref: tw.Reference | None, floor_rounds: int | None = None
) -> list[tuple]:
    """(name, setup, block, rounds) per configuration; rounds scale with the forward's length."""
    scale = 1 if batch == 1 else 0.4

    def rounds(full: int, smoke: int) -> int:
        return smoke if quick else max(2, int(full * scale))

    configs = [
        (FLOOR, setup_floor, 1, floor_rounds or rounds(40, 6)),
        (WATCHED, setup_torchwatch(1), 1, floor_rounds or rounds(40, 6)),
    ]
    if every16:
        configs.append(("torchwatch, every=16", setup_torchwatch(16), 16, rounds(20, 2)))
    if ref is not None:
        configs.append(("torchwatch + drift (pooler)", setup_torchwatch_drift(ref), 1, rounds(20, 4)))
    configs += [
        ("hand-written .item() hooks", setup_item_hooks, 1, rounds(10, 2)),
        ("HF DebugUnderflowOverflow", setup_hf_debug, 1, rounds(10, 2)),
    ]
    if model == "bert" and _available("torchinstruments"):
        configs.append(("torchinstruments, every forward", setup_torchinstruments, 1, 1 if quick or batch > 1 else 2))
    return configs


def build(model: str) -> tuple[nn.Module, Callable[[int], torch.Tensor]]:
    """The model and a function giving its input at a batch size."""
    if model == "bert":
        net = bert_base()
        ids = torch.Generator().manual_seed(1)
        return net, lambda b: torch.randint(0, net.config.vocab_size, (b, SEQ), generator=ids)
    make = {"efficientnet": convnets.efficientnet_lite0, "resnet50": convnets.resnet50}[model]
    return make(), convnets.images


def run(
    models: list[str], batches: list[int], quick: bool, every16_batches: list[int], floor_rounds: int | None = None
) -> dict:
    results: dict = {"machine": _machine(), "date": datetime.date.today().isoformat(), "cases": {}}
    for model in models:
        base, make_input = build(model)
        ref = pooler_reference(base) if model == "bert" else None
        for batch in batches if model == "bert" else [8]:
            configs = configs_for(model, batch, quick, batch in every16_batches, ref, floor_rounds)
            results["cases"][f"{model}, batch {batch}"] = run_case(base, make_input(batch), configs)
    return results


def run_case(base: nn.Module, x: torch.Tensor, configs: list[tuple]) -> dict:
    plain = copy.deepcopy(base)
    models = {}
    for name, setup, _, _ in configs:
        m = copy.deepcopy(base)
        models[name] = (m, setup(m))
    with torch.inference_mode():
        for m in [plain] + [m for m, _ in models.values()]:
            m(x)  # warm-up: allocators, kernels, lazy plans
        rounds = max(r for *_, r in configs)
        times: dict[str, list[tuple[float, float]]] = {name: [] for name, *_ in configs}
        beyond: list[float] = []  # torchwatch forward / floor forward, timed back to back
        rss_before = _rss_mb()
        for r in range(rounds):
            for name, _, block, n_rounds in configs[r % len(configs) :] + configs[: r % len(configs)]:
                if r >= n_rounds:
                    continue
                t_plain = _time(plain, x, block)
                t_cfg = _time(models[name][0], x, block)
                times[name].append((t_plain / block, t_cfg / block))
                if name == WATCHED:  # torchwatch against the floor itself, back to back (order alternating)
                    t_floor = _time(models[FLOOR][0], x, block)
                    beyond.append(t_cfg / t_floor if r % 2 else _time(models[WATCHED][0], x, block) / t_floor)
                print(f"  round {r + 1}/{n_rounds} {name}: {100 * (t_cfg / t_plain - 1):+.2f}%", file=sys.stderr,
                      flush=True)  # fmt: skip
        rss_growth = _rss_mb() - rss_before
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        plain(x)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        before = cpu.rereads()
        models[WATCHED][0](x)
        rereads = cpu.rereads() - before
    watch = models[WATCHED][1]
    summary = {name: _summary(pairs) for name, pairs in times.items()}
    floor = summary[FLOOR]["overhead_pct"]
    for name, s in summary.items():
        if name.startswith("torchwatch") and floor > 0:
            s["x_floor"] = round(s["overhead_pct"] / floor, 2)
    # The same ratio from the back-to-back pairs: the floor's overhead plus what torchwatch adds to a
    # floor forward, over the floor's overhead (less noisy than the ratio of two medians above).
    extra = statistics.median(beyond) - 1
    paired = (floor / 100 + extra * (1 + floor / 100)) / (floor / 100) if floor > 0 else float("nan")
    summary[WATCHED]["beyond_floor_pct"] = round(100 * extra, 2)
    summary[WATCHED]["x_floor_paired"] = round(paired, 2)
    for _, handle in models.values():
        if isinstance(handle, tw.Watch):
            handle.detach()
    return {
        "rss_growth_mb_during_runs": round(rss_growth, 1),
        "plain_minor_page_faults_per_forward": faults,
        "kernel_blocks_read_again_per_forward": rereads,
        "torchwatch_errors": watch.errors,
        "configs": summary,
    }


def _time(model: nn.Module, x: torch.Tensor, block: int) -> float:
    start = time.perf_counter()
    for _ in range(block):
        model(x)
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
    model_name, flags = platform.processor(), []
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read().splitlines()
        model_name = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
        flags = next(line.split(":", 1)[1].split() for line in info if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    used, _ = cpu.simd_levels()
    runtime, threads = cpu.parallel_info()
    return {
        "cpu": model_name,
        "vector_flags": [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_fp16") if f in flags],
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "torchwatch_kernel": f"C, {cpu.LEVELS[used]}, {threads} thread(s) via {runtime}"
        if cpu.available
        else "torch ops",
    }


def _print_table(results: dict) -> None:
    print(f"\nmachine: {results['machine']}")
    for case, res in results["cases"].items():
        growth = res["rss_growth_mb_during_runs"]
        again = res["kernel_blocks_read_again_per_forward"]
        faults = res["plain_minor_page_faults_per_forward"]
        print(f"\n{case} (fp32, CPU; RSS growth during runs: {growth} MB; kernel blocks read again per forward: "
              f"{again}; page faults per plain forward: {faults})")  # fmt: skip
        head = f"{'configuration':<36} {'rounds':>6} {'plain ms':>10} {'with ms':>10} {'overhead':>9} {'x floor':>8}"
        print(head + "  IQR")
        for name, s in res["configs"].items():
            lo, hi = s["overhead_iqr_pct"]
            ratio = f"{s['x_floor']:.2f}" if "x_floor" in s else ""
            print(f"{name:<36} {s['rounds']:>6} {s['plain_ms']:>10.1f} {s['instrumented_ms']:>10.1f} "
                  f"{s['overhead_pct']:>+8.2f}% {ratio:>8}  [{lo:+.2f}%, {hi:+.2f}%]")  # fmt: skip
        w = res["configs"][WATCHED]
        print(f"torchwatch against the floor, back to back: {w['beyond_floor_pct']:+.2f}% per forward, "
              f"{w['x_floor_paired']:.2f}x the floor's overhead")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=("bert", "efficientnet", "resnet50"),
                   default=["bert", "efficientnet", "resnet50"])  # fmt: skip
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="BERT's batch sizes (convnets: 8)")
    p.add_argument("--every16-batches", type=int, nargs="*", default=[1], help="batches to time every=16 at")
    p.add_argument("--quick", action="store_true", help="few rounds: a smoke run, not a measurement")
    p.add_argument("--rounds", type=int, help="rounds of the floor and of torchwatch every forward (default: 40 at "
                   "batch 1, 16 at larger batches)")  # fmt: skip
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--gpu", action="store_true", help="run the GPU section instead (benchmarks/gpu_overhead.py)")
    args = p.parse_args()
    if args.gpu:
        import gpu_overhead

        gpu_overhead.run(["bert", "gpt2"], smoke=False, out_path=args.json)
        return
    results = run(args.models, args.batches, args.quick, args.every16_batches, args.rounds)
    _print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
