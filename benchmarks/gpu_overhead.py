"""What torchwatch costs on a GPU (issue 3's goals), measured in one process.

Sections, each with plain and instrumented copies of the same model run interleaved, CUDA-event
timed, medians of per-pair ratios:

* the stats kernel alone on a 256 MB tensor, as a fraction of the copy bandwidth: typical values
  (the one-read fast pass) and NaN/Inf/overflow spread everywhere (every share read twice) — first,
  so a run cut short still has it;
* launch-bound eager (batch 1, seq 128), full statistics every forward, under ``no_grad`` (one
  grouped launch per call, outputs probed by version) and under ``inference_mode`` (the same
  launch, outputs probed by a copy compared on the device: see monitors/activations/grouping.py);
* GPT-2 greedy decoding with the KV cache under ``no_grad``, full statistics every token;
* compute-bound eager (batch 32, seq 512), full statistics, with the bandwidth floor: bytes of the
  instrumented activations divided by the copy bandwidth measured in the same run;
* the same under ``torch.compile``;
* launch-bound eager (batch 1, seq 128) with ``every=16`` (timed in blocks of 16 calls);
* launch-bound under CUDA graphs (``mode="reduce-overhead"``), full statistics every replay;
* peers at the compute-bound point: hand-written ``.item()`` hooks, torchwatch's torch-ops path.

Results are printed as they come and rewritten to ``--json`` after each one, so a run cut short
still leaves numbers. ``--smoke`` runs tiny configurations on whatever device is there (CPU
included), to check the script itself.

Usage: python benchmarks/gpu_overhead.py --json out.json [--models bert gpt2] [--smoke]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

import torchwatch as tw
from torchwatch._select import IDENTITY_LIKE

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _time(fn: Callable[[], object], block: int) -> float:
    """Seconds for ``block`` calls, the device drained before and after."""
    _sync()
    start = time.perf_counter()
    for _ in range(block):
        fn()
    _sync()
    return time.perf_counter() - start


def paired(plain: Callable[[], object], other: Callable[[], object], *, rounds: int, block: int = 1) -> dict:
    for fn in (plain, other, plain, other):
        _time(fn, block)  # warm-up (compiles, captures, allocator)
    pairs = []
    for _ in range(rounds):
        p = _time(plain, block)
        o = _time(other, block)
        pairs.append((p / block, o / block))
    ratios = sorted(o / p for p, o in pairs)
    return {
        "rounds": rounds,
        "plain_ms": round(1e3 * statistics.median(p for p, _ in pairs), 4),
        "instrumented_ms": round(1e3 * statistics.median(o for _, o in pairs), 4),
        "overhead_pct": round(100 * (statistics.median(ratios) - 1), 2),
        "overhead_range_pct": [round(100 * (ratios[0] - 1), 2), round(100 * (ratios[-1] - 1), 2)],
    }


def copy_bandwidth(nbytes: int) -> float:
    """Device copy bandwidth in bytes/s, counting bytes read and written."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=DEVICE)
    dst = torch.empty_like(src)
    t = min(_time(lambda: dst.copy_(src), 10) for _ in range(3)) / 10
    return 2 * nbytes / t


def activation_bytes(model: nn.Module, call: Callable[[], object]) -> int:
    """Bytes of the floating-point outputs of the modules torchwatch watches by default."""
    total = 0

    def count(module: nn.Module, args: object, out: object) -> None:
        nonlocal total
        t = out[0] if isinstance(out, (tuple, list)) else out
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            total += t.numel() * t.element_size()

    handles = [m.register_forward_hook(count) for m in _watched_leaves(model)]
    with torch.inference_mode():
        call()
    for h in handles:
        h.remove()
    return total


def build(name: str, dtype: torch.dtype, smoke: bool) -> tuple[nn.Module, int]:
    import transformers

    torch.manual_seed(0)
    if name == "bert":
        cfg = transformers.BertConfig(**({"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2,
                                          "intermediate_size": 128} if smoke else {}))  # fmt: skip
        model = transformers.BertModel(cfg)
    else:
        cfg = transformers.GPT2Config(**({"n_layer": 2, "n_embd": 64, "n_head": 2} if smoke else {}))
        model = transformers.GPT2LMHeadModel(cfg)
    return model.to(DEVICE, dtype).eval(), cfg.vocab_size


def _watched_leaves(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if not list(m.children()) and not isinstance(m, IDENTITY_LIKE)]


def sum_hooks(model: nn.Module) -> None:
    """The one-read floor: each watched output read once by torch's own reduction, nothing kept."""

    def hook(module: nn.Module, args: object, out: object) -> None:
        t = out[0] if isinstance(out, tuple) else out
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            t.sum()

    for m in _watched_leaves(model):
        m.register_forward_hook(hook)


def hand_hooks(model: nn.Module) -> None:
    def hook(module: nn.Module, args: object, out: object) -> None:
        t = out[0] if isinstance(out, tuple) else out
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            _ = (t.mean().item(), t.float().std().item(), t.min().item(), t.max().item(), t.abs().max().item(),
                 torch.isnan(t).sum().item(), (t == 0).sum().item())  # fmt: skip

    for m in _watched_leaves(model):
        m.register_forward_hook(hook)


def run(models: list[str], smoke: bool, out_path: str | None) -> dict:
    results: dict = {"device": _device_name(), "torch": torch.__version__, "triton": _triton_version(), "sections": {}}

    def record(key: str, value: dict) -> None:
        results["sections"][key] = value
        print(f"{key}: {json.dumps(value)}", flush=True)
        if out_path:
            with open(out_path, "w") as f:
                json.dump(results, f, indent=2)

    big, small = ((2, 32), (1, 8)) if smoke else ((32, 512), (1, 128))
    rounds = 3 if smoke else 10
    bandwidth = copy_bandwidth(2**24 if smoke else 2**30)
    record("copy_bandwidth_GBps", {"value": round(bandwidth / 1e9, 1)})
    record("stats_kernel_256MB", kernel_throughput(bandwidth, smoke))

    compiled: list[tuple] = []
    for name in models:
        dtype = torch.float16 if name == "bert" else torch.bfloat16
        base, vocab = build(name, dtype, smoke)
        ids_big = torch.randint(0, vocab, big, device=DEVICE)
        ids_small = torch.randint(0, vocab, small, device=DEVICE)

        plain = base
        watched = copy.deepcopy(base)
        watch = tw.attach(watched, flush_every=100)
        # in both modes the small outputs wait for one grouped launch per call once probed
        for mode in (torch.no_grad, torch.inference_mode):
            res = paired(runner(plain, ids_small, mode), runner(watched, ids_small, mode), rounds=rounds, block=16)
            res["errors"] = watch.errors
            record(f"{name}/eager/batch{small[0]}_seq{small[1]}/full/{mode.__name__}", res)
        if name == "gpt2":
            steps = 4 if smoke else 32
            res = paired(decoder(plain, ids_small, steps), decoder(watched, ids_small, steps), rounds=rounds)
            res["tokens"] = steps
            res["errors"] = watch.errors
            record(f"{name}/decode/prompt{small[1]}_tokens{steps}/full", res)
        one_read = copy.deepcopy(base)
        sum_hooks(one_read)
        floor = paired(runner(plain, ids_small), runner(one_read, ids_small), rounds=rounds, block=16)
        record(f"{name}/eager/batch{small[0]}_seq{small[1]}/one_read_floor", floor)
        floor_s = activation_bytes(base, runner(base, ids_big)) / bandwidth
        floor = paired(runner(plain, ids_big), runner(one_read, ids_big), rounds=rounds)
        record(f"{name}/eager/batch{big[0]}_seq{big[1]}/one_read_floor", floor)
        del one_read
        res = paired(runner(plain, ids_big), runner(watched, ids_big), rounds=rounds)
        res["bandwidth_floor_ms"] = round(1e3 * floor_s, 4)
        res["overhead_vs_floor"] = round(
            (res["instrumented_ms"] - res["plain_ms"]) / max(1e3 * floor_s, 1e-9), 2
        )  # fmt: skip
        # the goal's ratio: torchwatch's added time over the added time of one plain read of each output
        res["overhead_vs_one_read"] = round(res["overhead_pct"] / max(floor["overhead_pct"], 1e-3), 2)
        res["errors"] = watch.errors
        record(f"{name}/eager/batch{big[0]}_seq{big[1]}/full", res)

        hand = copy.deepcopy(base)
        hand_hooks(hand)
        record(
            f"{name}/eager/batch{big[0]}_seq{big[1]}/hand_item_hooks",
            paired(runner(plain, ids_big), runner(hand, ids_big), rounds=max(2, rounds // 3)),
        )
        del hand

        ops = copy.deepcopy(base)
        ops_watch = tw.attach(ops, flush_every=100)
        for table in ops_watch.engine.monitor("stats").tables():
            table.kernel = None  # torchwatch without its fused kernel: the torch-ops path
        record(
            f"{name}/eager/batch{big[0]}_seq{big[1]}/torchwatch_torch_ops",
            paired(runner(plain, ids_big), runner(ops, ids_big), rounds=max(2, rounds // 3)),
        )
        ops_watch.detach()
        del ops

        sampled = copy.deepcopy(base)
        tw.attach(sampled, every=16, flush_every=160)
        record(
            f"{name}/eager/batch{small[0]}_seq{small[1]}/every16",
            paired(runner(plain, ids_small), runner(sampled, ids_small), rounds=rounds, block=16),
        )
        del sampled

        if name == "bert" or smoke:
            compiled.append((name, plain, watched, watch, ids_big, ids_small))
        else:
            watch.detach()
            del watched
        del base, plain
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()

    # compiling takes minutes with the watch attached: after every eager section, so a run cut
    # short has those
    for name, plain, watched, watch, ids_big, ids_small in compiled:
        if DEVICE.type == "cuda":
            torch._dynamo.reset()
            calls_before = watch.snapshot().calls
            graph_plain = torch.compile(plain, mode="reduce-overhead")
            graph_watched = torch.compile(watched, mode="reduce-overhead")
            res = paired(runner(graph_plain, ids_small), runner(graph_watched, ids_small), rounds=rounds, block=16)
            res["replays_counted"] = watch.snapshot().calls - calls_before
            res["replays_run"] = 16 * (rounds + 2)
            res["errors"] = watch.errors
            record(f"{name}/reduce-overhead/batch{small[0]}_seq{small[1]}/full", res)
        torch._dynamo.reset()
        compiled_plain = torch.compile(plain)
        compiled_watched = torch.compile(watched)
        res = paired(runner(compiled_plain, ids_big), runner(compiled_watched, ids_big), rounds=rounds)
        res["errors"] = watch.errors
        record(f"{name}/compile/batch{big[0]}_seq{big[1]}/full", res)
        watch.detach()
        torch._dynamo.reset()

    return results


def runner(model: nn.Module, ids: torch.Tensor, mode: Callable = torch.inference_mode) -> Callable[[], object]:
    def call() -> object:
        with mode():
            return model(ids)

    return call


def decoder(model: nn.Module, prompt: torch.Tensor, steps: int) -> Callable[[], object]:
    """Greedy decoding of ``steps`` tokens with the KV cache: one root call per token."""

    def call() -> object:
        with torch.no_grad():
            out = model(prompt, use_cache=True)
            for _ in range(steps):
                token = out.logits[:, -1:].argmax(-1)
                out = model(token, past_key_values=out.past_key_values, use_cache=True)
        return out

    return call


def kernel_throughput(bandwidth: float, smoke: bool) -> dict:
    """The stats kernel alone on a 256 MB tensor: read bandwidth vs the copy bandwidth.

    On a GPU, also a sweep of tile size, warps and program count around the shipped choice;
    each configuration's result is checked against the torch-ops twin before it is timed.
    """
    from torchwatch._accumulators import stats_from_raw
    from torchwatch._casts import cast_plan
    from torchwatch._table import DeviceTable
    from torchwatch.kernels import torch_ops
    from torchwatch.stats import DEFAULT_CAST_DTYPES

    names = DEFAULT_CAST_DTYPES
    nbytes = 2**20 if smoke else 2**28
    if DEVICE.type == "cuda":
        from torchwatch.kernels import triton_stats as kernel
    else:
        kernel = torch_ops

    def stats(merge, x: torch.Tensor, make_scratch: bool):
        table = DeviceTable(DEVICE, len(names), 4)
        plan = cast_plan(x.dtype, names)
        if make_scratch:
            table.scratch = kernel.Workspace(table, [plan])
        table.slot("x")
        fn = lambda: merge(table, 0, x, plan, 0, use_flag=False)  # noqa: E731
        return table, fn

    def measure(x: torch.Tensor, check: bool) -> dict:
        table, fn = stats(kernel.merge_into, x, kernel is not torch_ops)
        fn()
        out = {}
        if check:
            twin, twin_fn = stats(torch_ops.merge_into, x, False)
            twin_fn()
            got = stats_from_raw(*table.read_active().stats["x"], names).to_dict()
            want = stats_from_raw(*twin.read_active().stats["x"], names).to_dict()
            close = lambda a, b: a == b if not isinstance(b, float) else abs(a - b) <= 1e-6 * max(1.0, abs(b))  # noqa: E731
            out["matches_twin"] = all(close(got[k], want[k]) for k in want)
        t = min(_time(fn, 5) for _ in range(3)) / 5
        read_bw = x.numel() * x.element_size() / t
        # the copy moves each byte twice (read + write); a pure read can use the whole bandwidth
        out.update(ms=round(1e3 * t, 4), read_GBps=round(read_bw / 1e9, 1),
                   fraction_of_copy_bandwidth=round(read_bw / bandwidth, 3))  # fmt: skip
        return out

    result: dict = {"kernel": kernel.__name__.rsplit(".", 1)[-1]}
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x = torch.randn(nbytes // torch.finfo(dtype).bits * 8, device=DEVICE).to(dtype)
        x[2::77777] = 1e-30
        x[::97] = 0.0
        # typical activations: finite, below every cast's range (the kernel's one-read fast pass)
        result[str(dtype).removeprefix("torch.")] = measure(x, check=True)
        # NaN, Inf and overflow spread over the whole tensor: every program reads its share twice
        x[::1000003] = float("nan")
        x[1::999983] = float("inf")
        x[3::77777] = 3e5
        result[str(dtype).removeprefix("torch.") + "_hostile"] = measure(x, check=True)
        if dtype == torch.float16 and DEVICE.type == "cuda":  # tile, warps and programs
            default = (kernel.BLOCK, kernel.NUM_WARPS, kernel.MAX_PROGRAMS)
            sweep = {}
            for block, warps, programs in ((512, 4, 256), (1024, 4, 512), (512, 4, 1024), (1024, 8, 1024),
                                           (2048, 8, 512), (256, 2, 2048), (512, 2, 1024)):  # fmt: skip
                kernel.BLOCK, kernel.NUM_WARPS, kernel.MAX_PROGRAMS = block, warps, programs
                r = measure(x, check=True)
                sweep[f"block{block}_warps{warps}_programs{programs}"] = (
                    r["matches_twin"],
                    r["fraction_of_copy_bandwidth"],
                )
            kernel.BLOCK, kernel.NUM_WARPS, kernel.MAX_PROGRAMS = default
            result["float16_sweep"] = sweep
        del x
    return result


def _device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["bert", "gpt2"], choices=["bert", "gpt2"])
    p.add_argument("--smoke", action="store_true", help="tiny configurations, any device: checks the script")
    p.add_argument("--json", help="write results here (rewritten after each section)")
    args = p.parse_args()
    if DEVICE.type != "cuda" and not args.smoke:
        sys.exit("no CUDA device: run with --smoke to check the script on CPU")
    run(args.models, args.smoke, args.json)


if __name__ == "__main__":
    main()
