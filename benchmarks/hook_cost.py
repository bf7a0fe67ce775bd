"""Per-hook Python on the accelerator path, and launches per call, with the launches mocked.

At batch 1 on a GPU the cost of monitoring is the hooks' Python and one kernel launch per
watched output, not the bytes. Without a GPU both can still be counted: a watch in the device
path (``_device_path=True``, CPU tensors measured the way accelerator ones are) whose kernel
module is replaced by a stub that launches nothing, on a stack of ``N`` tiny layers. Two modes:

* ``per-output``: every output launches on its own (the path before grouped launches, and the
  path for outputs over ``GROUPED_BYTES``);
* ``grouped``: outputs are held and one grouped launch per root call measures them.

Reported: microseconds a watched forward adds per watched output (median over interleaved
plain / watched pairs, one thread) and the launches per call. A real launch costs a few
microseconds of Triton's Python plus the driver call on top of the per-output figure, once per
output in the first mode and once per call in the second.

Usage:
    python benchmarks/hook_cost.py [--layers 150] [--pairs 200] [--json out.json]
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
    for mode in ("per-output", "grouped"):
        watched = copy.deepcopy(plain)
        launches = [0]
        watch = tw.Watch(watched, _device_path=True, inputs=False)
        for table in watch.engine.activations.tables():
            table.kernel = table.grouped = stub(mode == "grouped", launches)
        added = []
        with torch.no_grad():
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=150)
    p.add_argument("--pairs", type=int, default=200)
    p.add_argument("--json")
    args = p.parse_args()
    result = run(args.layers, args.pairs)
    for mode in ("per-output", "grouped"):
        r = result[mode]
        print(f"{mode:<11} {r['us_per_output']:6.2f} us per output  {r['launches_per_call']:6.1f} launches per call")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
