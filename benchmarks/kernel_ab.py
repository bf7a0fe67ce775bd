"""Two builds of the C kernel in one process, called in alternation: the comparison a noisy
machine allows.

On a shared VM the same forward moves by 10-40% between runs, so two builds timed in two runs
compare the host's moods. Here both ``_cstats`` builds are loaded side by side (under two module
names: each has its own state) and take turns:

* ``--calls``: each build measures one tensor (in L2, one thread) ``reps`` times, in turn, 60
  times; reported: ns per 32 values, medians, and the median of the per-turn ratios B/A.
* ``--model``: in a real forward, every leaf's hook runs one of ``sum()`` (the one-read floor),
  build A or build B, rotating per forward (as ``in_forward.py`` does for one build); reported:
  ms per forward in the hooks, each build as a multiple of the floor (medians, and paired).

Build the other side in a worktree first::

    git worktree add /tmp/old <commit>
    PY=$PWD/.venv/bin/python; (cd /tmp/old && $PY setup.py build_ext --inplace -q)
    .venv/bin/python benchmarks/kernel_ab.py --calls /tmp/old/torchwatch/kernels/_cstats*.so \
        torchwatch/kernels/_cstats*.so
    .venv/bin/python benchmarks/kernel_ab.py --model efficientnet --rounds 12 OLD.so NEW.so

(The paths of the two builds are the last two arguments; the first is A.)
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from in_forward import build

from torchwatch._casts import cast_plan
from torchwatch.kernels.cpu import DTYPE_CODES, LEVELS
from torchwatch.stats import DEFAULT_CAST_DTYPES


def load(path: str, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"{name}._cstats", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tensor(kind: str, n: int) -> torch.Tensor:
    x = torch.randn(n)
    return {"randn": x, "relu": x.clamp(min=0), "shifted": x + 3, "bf16": x.bfloat16()}[kind]


def calls(builds: list[ModuleType], kinds: list[str]) -> None:
    for b in builds:
        b.set_threads(0)  # one thread: the pass itself, not the fork
    for n in (1 << 15, 1 << 18):
        for kind in kinds:
            x = tensor(kind, n)
            plan = cast_plan(x.dtype, DEFAULT_CAST_DTYPES)
            plans = [b.Plan(plan.tiny, plan.under, plan.over) for b in builds]
            address, code, reps = x.data_ptr(), DTYPE_CODES[x.dtype], max(1, 2_000_000 // n)
            ns: list[list[float]] = [[], []]
            for turn in range(60):
                for k in (0, 1) if turn % 2 else (1, 0):
                    start = time.perf_counter()
                    for _ in range(reps):
                        builds[k].tensor_stats(address, n, code, plans[k], False)
                    ns[k].append((time.perf_counter() - start) / reps / n * 32 * 1e9)
            ratio = statistics.median(b / a for a, b in zip(*ns, strict=True))
            print(f"{kind:8s} n={n:7d}  A {statistics.median(ns[0]):5.2f}  B {statistics.median(ns[1]):5.2f} "
                  f"ns per 32 values  B/A {ratio:.3f}")  # fmt: skip


def in_forward(builds: list[ModuleType], model_name: str, rounds: int) -> None:
    model, x = build(model_name)
    model.eval()
    plan = cast_plan(torch.float32, DEFAULT_CAST_DTYPES)
    plans = [b.Plan(plan.tiny, plan.under, plan.over) for b in builds]
    leaves = [m for m in model.modules() if not list(m.children())]
    spent = [0.0]

    def hook(how: int):
        def run(module: torch.nn.Module, args: object, out: object) -> None:
            if not (isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.is_contiguous()):
                return
            start = time.perf_counter()
            if how < 0:
                out.sum()
            else:
                builds[how].tensor_stats(out.data_ptr(), out.numel(), 0, plans[how], False)
            spent[0] += time.perf_counter() - start

        return run

    per: dict[int, list[float]] = {-1: [], 0: [], 1: []}
    order = [-1, 0, 1]
    with torch.inference_mode():
        model(x)
        for r in range(rounds):
            for how in order[r % 3 :] + order[: r % 3]:
                handles = [m.register_forward_hook(hook(how)) for m in leaves]
                spent[0] = 0.0
                model(x)
                per[how].append(spent[0])
                for h in handles:
                    h.remove()
    floor = statistics.median(per[-1])
    print(f"{model_name}, batch 8, {rounds} forwards each: floor (sum) {1e3 * floor:.2f} ms per forward in the hooks")
    for k, label in ((0, "A"), (1, "B")):
        ms = statistics.median(per[k])
        paired = statistics.median(a / f for a, f in zip(per[k], per[-1], strict=True))
        print(f"  build {label}: {1e3 * ms:.2f} ms, x floor {ms / floor:.3f} (medians), {paired:.3f} (paired)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="build A: a _cstats shared library")
    p.add_argument("b", help="build B")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--calls", action="store_true", help="calls on tensors in L2, one thread")
    how.add_argument("--model", choices=("bert", "efficientnet", "resnet50"), help="inside this model's forwards")
    p.add_argument("--kinds", default="randn,relu,shifted,bf16", help="--calls: tensors (randn, relu, shifted, bf16)")
    p.add_argument("--rounds", type=int, default=12, help="--model: forwards of each of floor, A and B")
    p.add_argument("--level", choices=LEVELS, help="both builds' vector path (default: this CPU's best)")
    args = p.parse_args()
    torch.manual_seed(0)
    builds = [load(args.a, "build_a"), load(args.b, "build_b")]
    if args.level:
        for b in builds:
            b.set_simd_level(LEVELS.index(args.level))
    if args.calls:
        torch.set_num_threads(1)
        calls(builds, args.kinds.split(","))
    else:
        in_forward(builds, args.model, args.rounds)


if __name__ == "__main__":
    main()
