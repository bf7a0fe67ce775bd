"""Compiled BERT-base on the GPU with torchwatch attached: does it run, count every call, give the
right statistics, and what does it cost against the same model compiled without torchwatch?

    python benchmarks/_compile_probe.py [torch|triton]

``torch`` (the default path): inside torch.compile the statistics are torch ops inductor fuses.
``triton``: the hand-written kernel launched from the compiled graph (reproduces the crash seen on
an H200; run it with CUDA_LAUNCH_BLOCKING=1 to see which kernel faults).
"""

import copy
import statistics
import sys
import time

import torch
import transformers

import torchwatch as tw
from torchwatch import _testing

mode = sys.argv[1] if len(sys.argv) > 1 else "torch"
torch.manual_seed(0)
cfg = transformers.BertConfig()
model = transformers.BertModel(cfg).cuda().half().eval()
plain = copy.deepcopy(model)
ids = torch.randint(0, cfg.vocab_size, (32, 512), device="cuda")
watch = tw.attach(model, flush_every=10**9)
compiled, compiled_plain = torch.compile(model), torch.compile(plain)
with torch.inference_mode(), _testing.triton_in_compile(mode == "triton"):
    for _ in range(3):
        compiled(ids)
        compiled_plain(ids)
torch.cuda.synchronize()
print(f"[{mode}] compiled and ran 3 calls; watch errors: {watch.errors}")

# statistics of one position from the compiled graph vs the eager output of the plain model
name = "encoder.layer.0.output.dense"
captured = {}
handle = plain.get_submodule(name).register_forward_hook(lambda m, i, o: captured.setdefault("x", o.float()))
watch.reset()
with torch.inference_mode():
    compiled(ids)
    plain(ids)  # eager: the oracle
handle.remove()
snap = watch.snapshot()
x = captured["x"]
got = snap[name]
print(
    f"calls {snap.calls}; {name}: count {got.count} (expect {x.numel()}), "
    f"mean {got.mean:.6g} vs {x.mean().item():.6g}, "
    f"absmax {got.absmax:.6g} vs {x.abs().max().item():.6g}, std {got.std:.6g} vs {x.std(correction=0).item():.6g}"
)
print("positions measured:", len(snap), "all with 1 call:", all(snap[n].calls == 1 for n in snap))


def timed(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.inference_mode():
        fn(ids)
    torch.cuda.synchronize()
    return time.perf_counter() - t


ratios, base = [], []
for _ in range(15):
    a, b = timed(compiled), timed(compiled_plain)
    ratios.append(a / b)
    base.append(b)
print(
    f"compiled plain {statistics.median(base) * 1e3:.2f} ms; torchwatch every call: "
    f"{(statistics.median(ratios) - 1) * 100:+.1f}% (min {min(ratios) - 1:+.1%}, max {max(ratios) - 1:+.1%})"
)
