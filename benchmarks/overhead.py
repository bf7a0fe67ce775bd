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
cannot be removed (HF ``DebugUnderflowOverflow``) stay on their copy. The plain copy, a **second
plain copy** (an A/A control), the floor and torchwatch every forward are timed in every round, one
forward each, in an order that rotates every round and runs backwards every other cycle; each
configuration's ratio to the plain forward of its own round cancels slow drift of the machine, and
the floor and torchwatch share that plain forward. Reported: medians of the forward times and of
the per-round ratios, the ratios' interquartile range, and 95% bootstrap intervals (rounds resampled
whole) for the median overheads and for ``x floor``, torchwatch's median overhead over the floor's.
The A/A copy's "overhead" is the method's own error on this machine: an interval far from 0 would
mean the copies differ (memory placement), not the hooks. Also printed: torchwatch's forward over
the floor's forward of the same round (median), what torchwatch adds to one read. The other
configurations (peers, ``every=16``, drift) run fewer rounds, each block right after a plain block
of the same length.

Earlier versions timed the floor and torchwatch in separate rounds, each after its own plain block,
and printed a "paired" ratio from an extra back-to-back pair; on a shared VM their ``x floor`` moved
by 0.1–0.2 between runs (benchmarks/RESULTS.md). It still does from one process to the next (0.9 to
1.3 for EfficientNet-Lite0 on a 2-vCPU VM): the intervals say how far one process's figure can be
trusted, and ``--processes N`` pools several so that the spread between them enters the interval.

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
    # the kernel, torch's own operators and oneDNN's convolutions all on their AVX2 paths, as on an AVX2-only CPU:
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/overhead.py --level avx2
    python benchmarks/overhead.py --gpu               # the GPU section (benchmarks/gpu_overhead.py)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import convnets
import interleaved
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


PLAIN_AGAIN = "plain, a second copy (A/A)"
FLOOR = "one-read floor (out.sum() hooks)"
WATCHED = "torchwatch, every forward"
CORE = (PLAIN_AGAIN, FLOOR, WATCHED)  # timed in every round, beside the plain copy


def configs_for(
    model: str, batch: int, quick: bool, every16: bool, ref: tw.Reference | None, core_rounds: int | None = None
) -> list[tuple]:
    """(name, setup, block, rounds) per configuration; rounds scale with the forward's length.
    The first three (:data:`CORE`) are timed in every round, one forward each, beside the plain one."""
    scale = 1 if batch == 1 else 0.4

    def rounds(full: int, smoke: int) -> int:
        return smoke if quick else max(2, int(full * scale))

    core = core_rounds or rounds(150, 6)
    configs = [(PLAIN_AGAIN, None, 1, core), (FLOOR, setup_floor, 1, core), (WATCHED, setup_torchwatch(1), 1, core)]
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
    models: list[str],
    batches: list[int],
    quick: bool,
    every16_batches: list[int],
    core_rounds: int | None = None,
    core_only: bool = False,
) -> dict:
    results: dict = {"machine": _machine(), "date": datetime.date.today().isoformat(), "cases": {}}
    for model in models:
        base, make_input = build(model)
        ref = pooler_reference(base) if model == "bert" else None
        for batch in batches if model == "bert" else [8]:
            configs = configs_for(model, batch, quick, batch in every16_batches, ref, core_rounds)
            if core_only:
                configs = [c for c in configs if c[0] in CORE]
            results["cases"][f"{model}, batch {batch}"] = run_case(base, make_input(batch), configs)
    return results


def run_case(base: nn.Module, x: torch.Tensor, configs: list[tuple]) -> dict:
    plain = copy.deepcopy(base)
    models = {}
    for name, setup, _, _ in configs:
        m = copy.deepcopy(base)
        models[name] = (m, setup(m) if setup else None)
    core = [c for c in configs if c[0] in CORE]
    extra = [c for c in configs if c[0] not in CORE]
    with torch.inference_mode():
        for m in [plain] + [m for m, _ in models.values()]:
            m(x)  # warm-up: allocators, kernels, lazy plans
        rounds = max(r for *_, r in configs)
        times: dict[str, list[tuple[float, float]]] = {name: [] for name, *_ in configs}
        beyond: list[float] = []  # torchwatch forward / floor forward, same round
        rss_before = _rss_mb()
        for r in range(rounds):
            if r < core[0][3]:
                # The plain copy and the core configurations, one forward each, in an order that
                # rotates every round and runs backwards every other cycle (each one as often
                # before as after each other one).
                names = [None] + [name for name, *_ in core]
                k = r % len(names)
                order = names[k:] + names[:k]
                if (r // len(names)) % 2:
                    order.reverse()
                t = {name: _time(models[name][0] if name else plain, x, 1) for name in order}
                for name in names[1:]:
                    times[name].append((t[None], t[name]))
                beyond.append(t[WATCHED] / t[FLOOR])
                _progress(r, core[0][3], "core", 100 * (t[WATCHED] / t[None] - 1))
            for name, _, block, n_rounds in extra[r % max(1, len(extra)) :] + extra[: r % max(1, len(extra))]:
                if r >= n_rounds:
                    continue
                t_plain = _time(plain, x, block)
                t_cfg = _time(models[name][0], x, block)
                times[name].append((t_plain / block, t_cfg / block))
                _progress(r, n_rounds, name, 100 * (t_cfg / t_plain - 1))
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
    # torchwatch every forward shares the floor's rounds: its ratio from the unrounded medians, as
    # --processes pools it (the others' from their own rounds' percentages, above)
    core_rounds = [(p, f, w) for (p, f), (_, w) in zip(times[FLOOR], times[WATCHED], strict=True)]
    summary[WATCHED]["x_floor"] = round(interleaved.x_floor(core_rounds), 2)
    interval = interleaved.x_floor_interval([core_rounds])
    summary[WATCHED]["x_floor_ci95"] = [round(v, 2) for v in interval] if interval else None
    summary[WATCHED]["beyond_floor_pct"] = round(100 * (statistics.median(beyond) - 1), 2)
    for _, handle in models.values():
        if isinstance(handle, tw.Watch):
            handle.detach()
    return {
        "rss_growth_mb_during_runs": round(rss_growth, 1),
        "plain_minor_page_faults_per_forward": faults,
        "kernel_blocks_read_again_per_forward": rereads,
        "torchwatch_errors": watch.errors,
        "configs": summary,
        # seconds per forward, round by round: plain, then each core configuration (for --processes)
        "core_rounds": {"plain": [p for p, _ in times[FLOOR]]} | {name: [c for _, c in times[name]] for name in CORE},
    }


def _progress(r: int, n_rounds: int, name: str, pct: float) -> None:
    print(f"  round {r + 1}/{n_rounds} {name}: {pct:+.2f}%", file=sys.stderr, flush=True)


def _time(model: nn.Module, x: torch.Tensor, block: int) -> float:
    start = time.perf_counter()
    for _ in range(block):
        model(x)
    return time.perf_counter() - start


def _summary(pairs: list[tuple[float, float]]) -> dict:
    ratios = sorted(c / p for p, c in pairs)
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    out = {
        "rounds": len(pairs),
        "plain_ms": round(1e3 * statistics.median(p for p, _ in pairs), 2),
        "instrumented_ms": round(1e3 * statistics.median(c for _, c in pairs), 2),
        "overhead_pct": round(100 * (statistics.median(ratios) - 1), 2),
        "overhead_iqr_pct": [round(100 * (q[0] - 1), 2), round(100 * (q[2] - 1), 2)],
    }
    interval = interleaved.overhead_interval([pairs])
    if interval:
        out["overhead_ci95_pct"] = [round(100 * v, 2) for v in interval]
    return out


def _machine() -> dict:
    model_name, flags, family = platform.processor(), [], ""
    try:
        with open("/proc/cpuinfo") as f:
            info = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
        info = {key.strip(): value.strip() for key, value in info.items()}
        model_name, flags = info["model name"], info["flags"].split()
        family = f"{info['vendor_id']} family {info['cpu family']} model {info['model']}"
    except (OSError, KeyError):
        pass
    used, _ = cpu.simd_levels()
    runtime, threads = cpu.parallel_info()
    return {
        "cpu": model_name,
        "cpu_family": family,
        "vector_flags": [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_fp16") if f in flags],
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
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
        print(head + "  IQR / 95% CI of the median")
        for name, s in res["configs"].items():
            lo, hi = s["overhead_iqr_pct"]
            ratio = f"{s['x_floor']:.2f}" if "x_floor" in s else ""
            ci = " / [{:+.2f}%, {:+.2f}%]".format(*s["overhead_ci95_pct"]) if "overhead_ci95_pct" in s else ""
            print(f"{name:<36} {s['rounds']:>6} {s['plain_ms']:>10.1f} {s['instrumented_ms']:>10.1f} "
                  f"{s['overhead_pct']:>+8.2f}% {ratio:>8}  [{lo:+.2f}%, {hi:+.2f}%]{ci}")  # fmt: skip
        w = res["configs"][WATCHED]
        low, high = w["x_floor_ci95"] or (float("nan"), float("nan"))
        x = w.get("x_floor", float("nan"))
        print(f"torchwatch: {x:.2f}x the floor's overhead (95% CI {low:.2f} .. {high:.2f}), "
              f"{w['beyond_floor_pct']:+.2f}% per forward beyond a floor forward of the same round")  # fmt: skip


def pool(runs: list[dict]) -> dict:
    """The core rounds of several processes' results, case by case: overheads and ``x floor``
    over all their rounds, with two-level bootstrap intervals (:mod:`interleaved`)."""
    pooled: dict = {}
    for case in runs[0]["cases"]:
        groups = [run["cases"][case]["core_rounds"] for run in runs]
        out: dict = {"processes": len(groups), "rounds": sum(len(g["plain"]) for g in groups)}
        for name in CORE:
            pairs = [list(zip(g["plain"], g[name], strict=True)) for g in groups]
            flat = [pair for group in pairs for pair in group]
            interval = interleaved.overhead_interval(pairs)
            out[name] = {
                "overhead_pct": round(100 * interleaved.median_overhead(*zip(*flat, strict=True)), 2),
                "overhead_ci95_pct": [round(100 * v, 2) for v in interval] if interval else None,
            }
        rounds = [list(zip(g["plain"], g[FLOOR], g[WATCHED], strict=True)) for g in groups]
        interval = interleaved.x_floor_interval(rounds)
        out["x_floor"] = round(interleaved.x_floor([r for group in rounds for r in group]), 2)
        out["x_floor_ci95"] = [round(v, 2) for v in interval] if interval else None
        out["x_floor_per_process"] = [round(interleaved.x_floor(group), 2) for group in rounds]
        pooled[case] = out
    return pooled


def _print_pooled(pooled: dict) -> None:
    for case, out in pooled.items():
        print(f"\n{case}, {out['processes']} processes pooled ({out['rounds']} rounds)")
        for name in CORE:
            o = out[name]
            ci = "[{:+.2f}%, {:+.2f}%]".format(*o["overhead_ci95_pct"]) if o["overhead_ci95_pct"] else ""
            print(f"{name:<36} {o['overhead_pct']:>+8.2f}%  95% CI {ci}")
        low, high = out["x_floor_ci95"] or (float("nan"), float("nan"))
        each = ", ".join(f"{x:.2f}" for x in out["x_floor_per_process"])
        print(f"torchwatch: {out['x_floor']:.2f}x the floor's overhead (95% CI {low:.2f} .. {high:.2f}; "
              f"per process {each})")  # fmt: skip


def _run_processes(n: int, argv: list[str]) -> list[dict]:
    """This benchmark in ``n`` fresh processes one after another (the first with the peers, the
    others with the core configurations only); their results."""
    runs = []
    with tempfile.TemporaryDirectory(prefix="tw-overhead-") as tmp:
        for i in range(n):
            path = os.path.join(tmp, f"{i}.json")
            extra = ["--core-only"] if i else []
            subprocess.run([sys.executable, __file__, *argv, *extra, "--json", path], check=True)
            with open(path) as f:
                runs.append(json.load(f))
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=("bert", "efficientnet", "resnet50"),
                   default=["bert", "efficientnet", "resnet50"])  # fmt: skip
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="BERT's batch sizes (convnets: 8)")
    p.add_argument("--every16-batches", type=int, nargs="*", default=[1], help="batches to time every=16 at")
    p.add_argument("--quick", action="store_true", help="few rounds: a smoke run, not a measurement")
    p.add_argument("--rounds", type=int, help="rounds of the A/A copy, the floor and torchwatch every forward "
                   "(default: 150 at batch 1, 60 at larger batches)")  # fmt: skip
    p.add_argument(
        "--level", choices=cpu.LEVELS, help="run torchwatch's kernel at this vector level (default: the best)"
    )
    p.add_argument("--core-only", action="store_true", help="only the A/A copy, the floor and torchwatch every "
                   "forward (no peers, every=16 or drift)")  # fmt: skip
    p.add_argument("--processes", type=int, default=1, help="run in this many fresh processes one after another "
                   "and pool their rounds (process-to-process variation enters the intervals)")  # fmt: skip
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--gpu", action="store_true", help="run the GPU section instead (benchmarks/gpu_overhead.py)")
    args = p.parse_args()
    if args.gpu:
        import gpu_overhead

        gpu_overhead.run(["bert", "gpt2"], smoke=False, out_path=args.json)
        return
    if args.processes > 1:
        argv = _strip(sys.argv[1:], ("--processes", "--json"))
        runs = _run_processes(args.processes, argv)
        results = {"machine": runs[0]["machine"], "date": runs[0]["date"], "runs": runs, "pooled": pool(runs)}
        _print_pooled(results["pooled"])
    else:
        level = cpu.simd_level(cpu.LEVELS.index(args.level)) if args.level else contextlib.nullcontext()
        with level:
            results = run(args.models, args.batches, args.quick, args.every16_batches, args.rounds, args.core_only)
        _print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def _strip(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """``argv`` without ``options`` and their values (``--opt v`` or ``--opt=v``)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        elif not arg.startswith(tuple(o + "=" for o in options)):
            out.append(arg)
    return out


if __name__ == "__main__":
    main()
