"""Does a compiled BERT-base on the GPU run the stats kernel on every watched output?"""

import time

import torch
import transformers

import torchwatch as tw

torch.manual_seed(0)
cfg = transformers.BertConfig()
model = transformers.BertModel(cfg).cuda().half().eval()
ids = torch.randint(0, cfg.vocab_size, (32, 512), device="cuda")
watch = tw.attach(model, flush_every=10**9)
with torch.inference_mode():
    model(ids)
compiled = torch.compile(model)
for _ in range(3):
    with torch.inference_mode():
        compiled(ids)
torch.cuda.synchronize()
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    with torch.inference_mode():
        compiled(ids)
    torch.cuda.synchronize()
rows = [e for e in prof.key_averages() if "stats_kernel" in e.key]
print("stats kernel rows:", [(e.key, e.count, round(e.device_time_total / 1e3, 3)) for e in rows])
total = sum(e.device_time_total for e in prof.key_averages()) / 1e3
print("all kernels ms:", round(total, 3))
snap = watch.snapshot()
names = list(snap)
print("positions", len(names), "calls first/last:", snap[names[0]].calls, snap[names[-1]].calls)
print("intermediate.dense count", snap["encoder.layer.0.intermediate.dense"].count, "per call", 32 * 512 * 3072)
for label, fn in (("eager", model), ("compiled", compiled)):
    torch.cuda.synchronize()
    s = time.perf_counter()
    for _ in range(5):
        with torch.inference_mode():
            fn(ids)
    torch.cuda.synchronize()
    print(label, "ms", round((time.perf_counter() - s) / 5 * 1e3, 2))
