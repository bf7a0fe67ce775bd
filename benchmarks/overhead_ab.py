"""Is this checkout's CPU overhead worse than another revision's? Both measured in alternating processes.

Two measurements, each run in a fresh process per revision, the revisions alternating so that
slow drift of the machine hits both alike:

* ``hooks``: microseconds per forward of a 100-layer ``Linear(8, 8)`` stack, batch 1, one thread:
  almost nothing but torchwatch's per-hook Python and kernel-call cost;
* ``root``: microseconds a watch adds to one call of a single ``Linear(8, 8)``, batch 1, one
  thread: the fixed cost of a root call (its bookkeeping, the monitors' call hooks, one
  measurement) with nothing to hide it;
* ``bert``: BERT-base fp32, seq 128, a TensorBoard sink flushing every 100 calls: the median over
  interleaved pairs of (watched forward / plain forward) - 1, as in ``benchmarks/overhead.py``,
  beside the one-read floor (``out.sum()`` hooks on the same leaves, interleaved the same way)
  and torchwatch as a multiple of it.

The other revision is checked out with ``git worktree`` into a temporary directory and its C
kernel built in place, so both import their own ``torchwatch``.

Usage:
    python benchmarks/overhead_ab.py --base 150563d                 # hooks, and BERT at batch 1 and 8
    python benchmarks/overhead_ab.py --base HEAD~3 --only hooks --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import copy, json, statistics, sys, tempfile, time
repo, what, batch, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
sys.path.insert(0, repo)
import torch
import torchwatch as tw
assert tw.__file__.startswith(repo), tw.__file__
if what == "hooks":
    torch.set_num_threads(1)
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(100)]).eval()
    x = torch.randn(1, 8)
    watch = tw.attach(model, flush_every=100, rules=[])
    times = []
    with torch.inference_mode():
        for _ in range(200):
            model(x)
        for _ in range(rounds):
            t = time.perf_counter()
            for _ in range(200):
                model(x)
            times.append((time.perf_counter() - t) / 200 * 1e6)
    watch.detach()
    print(json.dumps({"value": statistics.median(times)}))
elif what == "root":
    torch.set_num_threads(1)
    plain = torch.nn.Linear(8, 8).eval()
    watched = copy.deepcopy(plain)
    watch = tw.attach(watched, flush_every=100, rules=[])
    x = torch.randn(1, 8)
    extra = []
    with torch.inference_mode():
        for _ in range(500):
            plain(x)
            watched(x)
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(2000):
                plain(x)
            t1 = time.perf_counter()
            for _ in range(2000):
                watched(x)
            extra.append(((time.perf_counter() - t1) - (t1 - t0)) / 2000 * 1e6)
    watch.detach()
    print(json.dumps({"value": statistics.median(extra)}))
else:
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    base = BertModel(BertConfig()).eval()
    plain, watched, floor = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    watch = tw.attach(watched, sinks=[tw.TensorBoardSink(tempfile.mkdtemp())], flush_every=100)
    def read(m, args, out):  # the one-read floor: out.sum() on the same modules, nothing kept
        for t in (out if isinstance(out, tuple) else (out,)):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                t.sum()
    for m in floor.modules():
        if not list(m.children()) and not isinstance(m, (torch.nn.Dropout, torch.nn.Identity)):
            m.register_forward_hook(read)
    ids = torch.randint(0, 30522, (batch, 128), generator=torch.Generator().manual_seed(1))
    ratios, floors = [], []
    with torch.inference_mode():
        plain(ids)
        watched(ids)
        floor(ids)
        for _ in range(rounds):
            t0 = time.perf_counter()
            plain(ids)
            t1 = time.perf_counter()
            watched(ids)
            t2 = time.perf_counter()
            plain(ids)
            t3 = time.perf_counter()
            floor(ids)
            ratios.append((t2 - t1) / (t1 - t0))
            floors.append((time.perf_counter() - t3) / (t3 - t2))
    watch.detach()
    print(json.dumps({"value": 100 * (statistics.median(ratios) - 1), "floor": 100 * (statistics.median(floors) - 1)}))
"""


def worktree(rev: str) -> str:
    path = tempfile.mkdtemp(prefix="torchwatch-ab-")
    subprocess.run(["git", "-C", HERE, "worktree", "add", "--detach", "-q", path, rev], check=True)
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=path, check=True,
                   capture_output=True)  # fmt: skip
    return path


def measure(repo: str, what: str, batch: int, rounds: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, repo, what, str(batch), str(rounds)], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the revision to compare this checkout with")
    p.add_argument("--only", choices=("hooks", "root", "bert"), help="one measurement only")
    p.add_argument("--repeats", type=int, default=3, help="processes per revision and measurement")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    base = worktree(args.base)
    cases = [("hooks", 1, 15), ("root", 1, 15), ("bert", 1, 30), ("bert", 8, 12)]
    results = {}
    try:
        for what, batch, rounds in cases:
            if args.only and what != args.only:
                continue
            runs: dict[str, list[dict[str, float]]] = {"base": [], "this": []}
            for _ in range(args.repeats):
                runs["base"].append(measure(base, what, batch, rounds))
                runs["this"].append(measure(HERE, what, batch, rounds))
            unit = "% overhead" if what == "bert" else "us/forward" if what == "hooks" else "us added/call"
            key = f"{what}, batch {batch} ({unit})"
            results[key] = runs
            line = f"{key:<32}"
            for side, label in (("base", f"base {args.base}"), ("this", "this")):
                values = [r["value"] for r in runs[side]]
                line += f"   {label}: {[round(v, 1) for v in values]} (median {statistics.median(values):.1f})"
                if what == "bert":
                    floor = statistics.median(r["floor"] for r in runs[side])
                    ratio = statistics.median(values) / floor if floor > 0 else float("nan")
                    line += f", floor {floor:.1f}, x floor {ratio:.2f}"
            print(line)
    finally:
        subprocess.run(["git", "-C", HERE, "worktree", "remove", "--force", base], check=False)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"base": args.base, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
