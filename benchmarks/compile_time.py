"""How much longer ``torch.compile`` takes with torchwatch attached (CPU inductor).

Each measurement is a fresh process (inductor's in-process caches would hide the cost; the
on-disk caches go to a new temporary directory per process), the plain and watched runs
alternating. A 2-layer BERT built from its config (hidden size 256, 4 heads, seq 64, batch 2,
random weights), ``torch.compile(fullgraph=True)``; timed: the first call (tracing, inductor, C++
compilation) and the first four (a recompile on a later call would show there); the watched runs
check that every call was counted.

Usage:
    python benchmarks/compile_time.py                 # 3 processes each
    python benchmarks/compile_time.py --repeats 5 --json out.json
    python benchmarks/compile_time.py --repo /tmp/old-checkout   # another revision's torchwatch
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time
if sys.argv[2]:
    sys.path.insert(0, sys.argv[2])
import torch
from transformers import BertConfig, BertModel
watched = sys.argv[1] == "watched"
torch.manual_seed(0)
config = BertConfig(num_hidden_layers=2, hidden_size=256, num_attention_heads=4, intermediate_size=1024)
model = BertModel(config).eval()
ids = torch.randint(0, config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
watch = None
if watched:
    import torchwatch as tw
    assert not sys.argv[2] or tw.__file__.startswith(sys.argv[2]), tw.__file__
    watch = tw.attach(model, inputs=False, rules=[])
compiled = torch.compile(model, fullgraph=True)
with torch.inference_mode():
    t = time.perf_counter()
    compiled(input_ids=ids)
    first = time.perf_counter() - t
    for _ in range(3):  # a recompile (a guard the first call broke) would show here
        compiled(input_ids=ids)
    total = time.perf_counter() - t
calls = None
if watch is not None:
    snap = watch.snapshot()
    calls = snap.calls
    assert snap.calls == 4 and all(s.calls == 4 for s in snap.values()), (snap.calls, snap)
    watch.detach()
print(json.dumps({"seconds": first, "total": total, "calls": calls}))
"""


def measure(kind: str, repo: str = "") -> tuple[float, float]:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(prefix="tw-inductor-"))
    out = subprocess.run([sys.executable, "-c", CHILD, kind, repo], check=True, capture_output=True, text=True, env=env)
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    return doc["seconds"], doc["total"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="processes per configuration")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--repo", default="", help="import torchwatch from this checkout (another revision)")
    args = p.parse_args()
    runs: dict[str, list[tuple[float, float]]] = {"plain": [], "watched": []}
    for _ in range(args.repeats):
        for kind in ("plain", "watched"):
            runs[kind].append(measure(kind, args.repo))
    ratios = {}
    for i, what in enumerate(("first call", "first 4 calls")):
        plain = statistics.median(r[i] for r in runs["plain"])
        watched = statistics.median(r[i] for r in runs["watched"])
        ratios[what] = watched / plain
        shown = {kind: [round(r[i], 1) for r in runs[kind]] for kind in runs}
        print(f"{what}: plain {shown['plain']} s (median {plain:.1f}), watched {shown['watched']} s "
              f"(median {watched:.1f}): {watched / plain:.2f}x")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": runs, "ratios": ratios}, f, indent=2)


if __name__ == "__main__":
    main()
