"""Per-hook Python on the accelerator path, and launches per call, with the launches mocked.

At batch 1 on a GPU the cost of monitoring is the hooks' Python and one kernel launch per
watched output, not the bytes. Without a GPU both can still be counted: a watch in the device
path (``torchwatch._testing.device_path()``, CPU tensors measured the way accelerator ones are) whose kernel
module is replaced by a stub that launches nothing, on a stack of ``N`` tiny layers. Two modes:

* ``per-output``: every output launches on its own (the path before grouped launches, and the
  path for outputs over ``GROUPED_BYTES``);
* ``grouped``: outputs are held and one grouped launch per root call measures them, under
  ``torch.no_grad()`` and under ``torch.inference_mode()`` (positions probed by a copy first).

Reported: microseconds a watched forward adds per watched output (median over interleaved
plain / watched pairs, one thread) and the launches per call. A real launch costs a few
microseconds of Triton's Python plus the driver call on top of the per-output figure, once per
output in the first mode and once per call in the second.

``--cold``: the CPU path instead, the way a hook runs inside a real forward: each watched
module (a ``Linear(768, 8)``, 256 outputs) runs right after a ``Linear(768, 3072)`` on 32 rows,
whose 9.4 MB of weights push the interpreter's own data out of the caches. Reported:
microseconds a forward adds per watched module for a no-op hook, the one-read floor (``sum()``)
and torchwatch, interleaved with plain forwards, all threads of torch in use.

Usage:
    python benchmarks/hook_cost.py [--layers 150] [--pairs 200] [--json out.json]
    python benchmarks/hook_cost.py --cold [--layers 24] [--pairs 60]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import types

import torch
from torch import nn

import torchwatch as tw
from torchwatch import _testing
from torchwatch.kernels import torch_ops


def stub(grouped: bool, launches: list[int]) -> types.SimpleNamespace:
    """A kernel module that launches nothing and counts what it would have launched."""

    def merge_into(*args, **kwargs):
        launches[0] += 1

    def merge_group(table, items, plan, call):
        launches[0] += 1

    return types.SimpleNamespace(
        supports=lambda x, k: True,
        merge_into=merge_into,
        groupable=torch_ops.groupable if grouped else (lambda x, k: False),
        merge_group=merge_group,
    )


def run(layers: int, pairs: int) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    plain = nn.Sequential(*(nn.Linear(8, 8) for _ in range(layers)))
    x = torch.randn(1, 8)
    result = {"layers": layers, "pairs": pairs, "torch": torch.__version__}
    for mode, grad_mode in (("per-output", torch.no_grad), ("grouped", torch.no_grad),
                            ("grouped, inference_mode", torch.inference_mode)):  # fmt: skip
        watched = copy.deepcopy(plain)
        launches = [0]
        with _testing.device_path():
            watch = tw.Watch(watched, inputs=False)
        for table in watch.engine.monitor("stats").tables():
            table.kernel = table.grouped = stub(mode.startswith("grouped"), launches)
        added = []
        with grad_mode():
            for _ in range(20):
                watched(x), plain(x)
            launches[0] = 0
            for _ in range(pairs):  # interleaved: slow drift of the machine hits both alike
                t0 = time.perf_counter()
                plain(x)
                t1 = time.perf_counter()
                watched(x)
                added.append((time.perf_counter() - t1) - (t1 - t0))
        watch.detach()
        result[mode] = {
            "us_per_output": round(statistics.median(added) / layers * 1e6, 2),
            "launches_per_call": launches[0] / pairs,
        }
    return result


class _Step(nn.Module):
    """A large matmul (the caches go cold), then the small watched module."""

    def __init__(self) -> None:
        super().__init__()
        self.heavy = nn.Linear(768, 3072)
        self.back = nn.Linear(3072, 768)
        self.probe = nn.Linear(768, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.back(self.heavy(x))
        self.probe(h)
        return h


def cold(steps: int, pairs: int) -> dict:
    torch.manual_seed(0)
    plain = nn.Sequential(*(_Step() for _ in range(steps))).eval()
    x = torch.randn(32, 768)
    probes = r".*probe"

    def noop(model: nn.Module) -> None:
        for name, m in model.named_modules():
            if name.endswith("probe"):
                m.register_forward_hook(lambda m, a, out: None)

    def floor(model: nn.Module) -> None:
        for name, m in model.named_modules():
            if name.endswith("probe"):
                m.register_forward_hook(lambda m, a, out: out.sum())

    def watch(model: nn.Module) -> None:
        tw.attach(model, modules=probes, inputs=False, flush_every=100)

    configs = {"no-op hook": noop, "one-read floor (sum)": floor, "torchwatch": watch}
    models = {}
    for name, setup in configs.items():
        models[name] = copy.deepcopy(plain)
        setup(models[name])
    added: dict[str, list[float]] = {name: [] for name in configs}
    with torch.inference_mode():
        for m in [plain, *models.values()]:
            m(x)
        for _ in range(pairs):
            for name, m in models.items():
                t0 = time.perf_counter()
                plain(x)
                t1 = time.perf_counter()
                m(x)
                added[name].append((time.perf_counter() - t1) - (t1 - t0))
    return {
        "steps": steps, "pairs": pairs, "torch_threads": torch.get_num_threads(),
        "us_added_per_hook": {name: round(statistics.median(v) / steps * 1e6, 1) for name, v in added.items()},
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=150)
    p.add_argument("--pairs", type=int, default=200)
    p.add_argument("--cold", action="store_true", help="the CPU path, with caches cold as in a real forward")
    p.add_argument("--json")
    args = p.parse_args()
    if args.cold:
        result = cold(args.layers if args.layers != 150 else 24, args.pairs if args.pairs != 200 else 60)
        for name, us in result["us_added_per_hook"].items():
            print(f"{name:<22} {us:6.1f} us per watched module")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
        return
    result = run(args.layers, args.pairs)
    for mode in ("per-output", "grouped", "grouped, inference_mode"):
        r = result[mode]
        print(f"{mode:<24} {r['us_per_output']:6.2f} us per output  {r['launches_per_call']:6.1f} launches per call")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
