"""The statistics kernel beside the one-read floor on every activation of a real forward, timed
inside the hooks.

``overhead.py`` times whole forwards, which is the figure that matters but carries the noise of
everything else the forward does (a shared VM moves it by +-10% between rounds). This times only
the work a hook adds, on the activations as the forward leaves them (in cache or not): a hook
that calls ``out.sum()`` (torch's own vectorised, multi-threaded reduction: the one-read floor)
and a hook that calls the C kernel on the same output, in alternate forwards. Reported per module
type: milliseconds per forward in the hooks and their ratio, and the kernel's blocks read again
(their shift guess was poor) per forward.

    .venv/bin/python benchmarks/in_forward.py --model efficientnet --rounds 8
    .venv/bin/python benchmarks/in_forward.py --model bert --level avx2   # the AVX2 path on an AVX-512 CPU
    .venv/bin/python benchmarks/in_forward.py --model bert --dtype bfloat16 --rounds 4   # a bfloat16 model
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import convnets

from torchwatch._casts import cast_plan
from torchwatch.kernels import cpu
from torchwatch.stats import DEFAULT_CAST_DTYPES


def build(model: str) -> tuple[nn.Module, torch.Tensor]:
    if model == "bert":
        from overhead import bert_base

        return bert_base(), torch.randint(0, 30522, (8, 128))
    make = {"efficientnet": convnets.efficientnet_lite0, "resnet50": convnets.resnet50}[model]
    return make(), convnets.images(8)


def measure(model: nn.Module, x: torch.Tensor, rounds: int, dtype: torch.dtype) -> tuple[dict, dict, int]:
    """Per leaf: the median seconds per forward its hook spent in ``out.sum()`` and in the kernel, on
    its ``dtype`` outputs; and the kernel's blocks read again in one forward."""
    plan = cast_plan(dtype, DEFAULT_CAST_DTYPES)
    code = cpu.DTYPE_CODES[dtype]
    leaves = [(name, m) for name, m in model.named_modules() if not list(m.children())]
    times: dict[str, dict[str, list[float]]] = {how: collections.defaultdict(list) for how in ("sum", "kernel")}
    kinds: dict[str, str] = {}

    def hook(name: str, how: str):
        def run(module: nn.Module, args: object, out: object) -> None:
            if not (isinstance(out, torch.Tensor) and out.dtype == dtype and out.is_contiguous()):
                return
            kinds[name] = type(module).__name__
            start = time.perf_counter()
            if how == "sum":
                out.sum()
            else:
                cpu.raw_stats(out.data_ptr(), out.numel(), code, plan)
            times[how][name].append(time.perf_counter() - start)

        return run

    with torch.inference_mode():
        model(x)
        again = 0
        for r in range(rounds):
            for how in ("sum", "kernel") if r % 2 else ("kernel", "sum"):
                handles = [m.register_forward_hook(hook(name, how)) for name, m in leaves]
                before = cpu.rereads()
                model(x)
                again = cpu.rereads() - before if how == "kernel" else again
                for h in handles:
                    h.remove()
    per_kind: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0])
    for name, kind in kinds.items():
        row = per_kind[kind]
        row[0] += statistics.median(times["sum"][name])
        row[1] += statistics.median(times["kernel"][name])
        row[2] += 1
    blocks = sum(-(-o // cpu.BLOCK) for o in _numels(model, x, leaves))
    return dict(per_kind), {"blocks": blocks}, again


def _numels(model: nn.Module, x: torch.Tensor, leaves: list) -> list[int]:
    sizes: list[int] = []
    handles = [m.register_forward_hook(lambda m, a, o: sizes.append(o.numel()) if isinstance(o, torch.Tensor) else None)
               for _, m in leaves]  # fmt: skip
    with torch.inference_mode():
        model(x)
    for h in handles:
        h.remove()
    return sizes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("bert", "efficientnet", "resnet50"), default="efficientnet")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--level", choices=cpu.LEVELS, help="the kernel's vector path (default: this CPU's best)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="the model's dtype")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    if not cpu.available:
        sys.exit("the C kernel was not built: nothing to compare")
    model, x = build(args.model)
    model.eval().to(dtype)
    x = x.to(dtype) if x.is_floating_point() else x
    best = cpu.simd_levels()[1]
    with cpu.simd_level(cpu.LEVELS.index(args.level) if args.level else best):
        per_kind, info, again = measure(model, x, args.rounds, dtype)
        level, _ = cpu.simd_levels()
    runtime, threads = cpu.parallel_info()
    print(f"{args.model}, batch 8, {args.dtype}; kernel {cpu.LEVELS[level]}, {threads} thread(s) ({runtime}); "
          f"{args.rounds} forwards each, alternating")  # fmt: skip
    print(f"{'module type':<20} {'modules':>7} {'floor ms':>9} {'kernel ms':>10} {'x floor':>8}")
    total = [0.0, 0.0]
    for kind, (s, k, n) in sorted(per_kind.items(), key=lambda kv: -kv[1][1]):
        total[0] += s
        total[1] += k
        print(f"{kind:<20} {n:>7} {1e3 * s:>9.2f} {1e3 * k:>10.2f} {k / s if s else float('nan'):>8.2f}")
    print(f"{'all':<20} {'':>7} {1e3 * total[0]:>9.2f} {1e3 * total[1]:>10.2f} {total[1] / total[0]:>8.2f}")
    print(f"kernel blocks read again per forward: {again} of {info['blocks']}")


if __name__ == "__main__":
    main()
