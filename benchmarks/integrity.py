"""Integrity benchmarks: manifest hashing, fingerprint throughput, self-test wall time.

1. Hashing a ~2.4 GB safetensors checkpoint (a 1B-parameter fp16 transformer layout) from the
   page cache: single-thread hashlib sha256 over the file (the per-core figure), torchwatch's
   ``Manifest.from_safetensors`` on every core, and the OpenSSF ``model-signing`` package's
   hashing of the same file (sha256, its default file serialization and its 1 GB-shard one), run
   with ``--peer-python`` (it pins its own dependencies: a separate environment). Runs are
   interleaved; medians reported. Goal: torchwatch >= 90% of cores x single-core throughput.
2. Fingerprint throughput on the same tensors in memory: CPU (torch ops), and on CUDA the Triton
   kernel and its torch twin over ~8 GB of bf16 weights. Goal on an H100: >= 2 TB/s.
3. ``tw.selftest`` wall time for BERT-base (from its config: weights random, sizes real) with a
   manifest and a batch-8 x seq-128 canary, split into weights / canary / fingerprint.

    python benchmarks/integrity.py --json benchmarks/integrity-last.json [--peer-python .venv-peer/bin/python]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch

import torchwatch as tw
from torchwatch.integrity import _hashing

PEER = r"""
import sys, time, pathlib, model_signing.hashing as h
path, mode = pathlib.Path(sys.argv[1]), sys.argv[2]
cfg = h.Config()
if mode == "shard":
    cfg.use_shard_serialization(hashing_algorithm="sha256")
else:
    cfg.use_file_serialization(hashing_algorithm="sha256")
t = time.perf_counter(); cfg.hash(path); print(time.perf_counter() - t)
"""


def layout(scale: float = 1.0) -> dict[str, tuple[int, ...]]:
    """Shapes of a 1B-parameter decoder (d=2048, 22 layers, MLP 5632, vocab 32000)."""
    d, ff, layers, vocab = 2048, 5632, max(1, round(22 * scale)), 32000
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (vocab, d)}
    for i in range(layers):
        for p in ("q", "k", "v", "o"):
            shapes[f"layers.{i}.attn.{p}.weight"] = (d, d)
        for p in ("gate", "up"):
            shapes[f"layers.{i}.mlp.{p}.weight"] = (ff, d)
        shapes[f"layers.{i}.mlp.down.weight"] = (d, ff)
        shapes[f"layers.{i}.norm1.weight"] = (d,)
        shapes[f"layers.{i}.norm2.weight"] = (d,)
    return shapes


def random_tensors(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(0)
    return {
        n: torch.randint(-30000, 30000, s, generator=gen, device=device, dtype=torch.int16).view(dtype)
        for n, s in shapes.items()
    }


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def sha256_file_single(path: str) -> None:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        view = memoryview(m)
        h = hashlib.sha256()
        for off in range(0, len(view), 16 << 20):
            h.update(view[off : off + (16 << 20)])
        view.release()


def sha256_file_split(path: str, threads: int) -> None:
    """The file cut into ``threads`` equal ranges hashed in parallel: the machine's ceiling for
    parallel sha256 from the page cache (not a per-tensor hash; only a yardstick)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        view = memoryview(m)
        step = -(-len(view) // threads)

        def one(start: int) -> None:
            h = hashlib.sha256()
            for off in range(start, min(start + step, len(view)), 16 << 20):
                h.update(view[off : min(off + (16 << 20), start + step)])

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, range(0, len(view), step)))
        view.release()


def bench_hashing(args: argparse.Namespace, out: dict) -> dict[str, torch.Tensor]:
    from safetensors.torch import save_file

    workdir = tempfile.mkdtemp(prefix="tw-integrity-")
    path = os.path.join(workdir, "model.safetensors")
    tensors = random_tensors(layout(args.scale), torch.float16, "cpu")
    save_file(tensors, path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:  # into the page cache
        while f.read(64 << 20):
            pass
    threads = _hashing.default_threads()
    rows: dict[str, list[float]] = {
        "hashlib 1 thread": [],
        f"hashlib {threads} threads, equal ranges (ceiling)": [],
        f"torchwatch {threads} threads": [],
    }
    peers = []
    if args.peer_python:
        peers = ["file", "shard"]
        for p in peers:
            rows[f"model-signing ({p} serialization)"] = []
    for _ in range(args.repeats):  # interleaved
        rows["hashlib 1 thread"].append(median_time(lambda: sha256_file_single(path), 1))
        rows[f"hashlib {threads} threads, equal ranges (ceiling)"].append(
            median_time(lambda: sha256_file_split(path, threads), 1)
        )
        rows[f"torchwatch {threads} threads"].append(median_time(lambda: tw.Manifest.from_safetensors(path), 1))
        for p in peers:
            done = subprocess.run(
                [args.peer_python, "-c", PEER, workdir, p], capture_output=True, text=True, check=True, timeout=600
            )
            rows[f"model-signing ({p} serialization)"].append(float(done.stdout.split()[-1]))
    single = size / statistics.median(rows["hashlib 1 thread"])
    result = {"file_bytes": size, "threads": threads, "runs": {}}
    print(f"\nhashing {size / 1e9:.2f} GB from page cache, {threads} CPUs, medians of {args.repeats}")
    for name, ts in rows.items():
        gbps = size / statistics.median(ts) / 1e9
        result["runs"][name] = {"seconds": ts, "GB/s": gbps}
        print(f"  {name:<36} {gbps:6.2f} GB/s  ({statistics.median(ts):.2f} s)")
    tw_rate = size / statistics.median(rows[f"torchwatch {threads} threads"])
    result["torchwatch_vs_ideal"] = tw_rate / (threads * single)
    ceiling = size / statistics.median(rows[f"hashlib {threads} threads, equal ranges (ceiling)"])
    result["torchwatch_vs_ceiling"] = tw_rate / ceiling
    print(
        f"  torchwatch / ({threads} x single-core) = {result['torchwatch_vs_ideal']:.1%} (goal >= 90%); "
        f"/ parallel ceiling = {result['torchwatch_vs_ceiling']:.1%}"
    )
    out["hashing"] = result
    os.unlink(path)
    os.rmdir(workdir)
    return tensors


def fingerprint_rate(tensors: dict[str, torch.Tensor], backend: str, repeats: int) -> tuple[float, int]:
    module = torch.nn.Module()
    for i, t in enumerate(tensors.values()):
        module.register_buffer(f"t{i}", t)
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    tw.fingerprint(module, backend=backend)  # compile / warm up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return size / median_time(lambda: tw.fingerprint(module, backend=backend), repeats), size


def kernel_sweep(gpu: dict[str, torch.Tensor]) -> dict[str, float]:
    """The fingerprint kernel alone (CUDA events, cached chunk table) over tile and warp choices."""
    from torchwatch.integrity.fingerprinting import DEFAULT_CHUNK_BYTES, _chunk_table
    from torchwatch.kernels import triton_fingerprint
    from torchwatch.kernels.fingerprint_ops import as_words

    chunk_words = DEFAULT_CHUNK_BYTES // 8
    words = {n: as_words(t) for n, t in gpu.items()}
    size = sum(w.numel() * 8 for w in words.values())
    table = _chunk_table(torch.device("cuda"), words, chunk_words)
    reference = torch.empty(table.shape[0], dtype=torch.int64, device="cuda")
    triton_fingerprint.chunk_sums(table, reference, chunk_words)
    rates = {}
    for block, warps in ((2048, 8), (1024, 4), (4096, 8), (2048, 4), (4096, 16), (8192, 16)):
        out = torch.empty_like(reference)
        triton_fingerprint.chunk_sums(table, out, chunk_words, block=block, num_warps=warps)
        assert torch.equal(out, reference), (block, warps)
        times = []
        for _ in range(10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            triton_fingerprint.chunk_sums(table, out, chunk_words, block=block, num_warps=warps)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        rates[f"BLOCK={block} warps={warps}"] = size / statistics.median(times) / 1e12
        print(f"  kernel only, BLOCK={block:5d} warps={warps:2d}: {rates[f'BLOCK={block} warps={warps}']:.2f} TB/s")
    return rates


def bench_fingerprint(args: argparse.Namespace, out: dict, cpu_tensors: dict[str, torch.Tensor]) -> None:
    result = {}
    rate, size = fingerprint_rate(cpu_tensors, "torch", max(1, args.repeats // 2))
    result["cpu torch"] = {"GB/s": rate / 1e9, "bytes": size}
    print(f"\nfingerprint, CPU ({torch.get_num_threads()} threads), {size / 1e9:.2f} GB: {rate / 1e9:.2f} GB/s")
    if torch.cuda.is_available():
        gpu = random_tensors(layout(args.gpu_scale), torch.bfloat16, "cuda")
        for backend in ("triton", "torch"):
            rate, size = fingerprint_rate(gpu, backend, 5)
            result[f"cuda {backend}"] = {"TB/s": rate / 1e12, "bytes": size}
            print(f"fingerprint, {torch.cuda.get_device_name()} {backend}, {size / 1e9:.2f} GB: {rate / 1e12:.2f} TB/s")
        result["cuda triton kernel only"] = kernel_sweep(gpu)
        module = torch.nn.Module()
        for i, t in enumerate(list(gpu.values())[:40]):
            module.register_buffer(f"t{i}", t)
        size = sum(b.numel() * b.element_size() for b in module.buffers())
        seconds = median_time(lambda: tw.Manifest.from_model(module), 3)
        result["cuda sha256 via host staging"] = {"GB/s": size / seconds / 1e9, "bytes": size}
        print(f"sha256 manifest of {size / 1e9:.2f} GB on the GPU (pinned staging): {size / seconds / 1e9:.2f} GB/s")
        del gpu, module
        torch.cuda.empty_cache()
    out["fingerprint"] = result


def bench_selftest(args: argparse.Namespace, out: dict) -> None:
    import transformers

    cfg = transformers.BertConfig()  # BERT-base sizes
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    result = {}
    for device in devices:
        torch.manual_seed(0)
        model = transformers.BertModel(cfg).eval().to(device)
        if device == "cuda":
            model.half()
        workdir = tempfile.mkdtemp(prefix="tw-selftest-")
        mpath, cpath = os.path.join(workdir, "m.json"), os.path.join(workdir, "c.safetensors")
        manifest = tw.Manifest.from_model(model)
        manifest.save(mpath)
        inputs = {
            "input_ids": torch.randint(0, cfg.vocab_size, (8, 128)),
            "attention_mask": torch.ones(8, 128, dtype=torch.long),
        }
        tw.Canary.record(model, inputs, manifest=manifest).save(cpath)
        runs = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            report = tw.selftest(model, manifest=mpath, canary=cpath)
            total = time.perf_counter() - t
            t = time.perf_counter()
            tw.fingerprint(model)
            fp = time.perf_counter() - t
            runs.append(
                {"total": total, "weights": report.weights.seconds, "canary": report.canary.seconds, "fingerprint": fp}
            )
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        nbytes = sum(e.nbytes for e in manifest.tensors.values())
        result[device] = {"bytes": nbytes, **med}
        print(
            f"\nselftest BERT-base on {device} ({nbytes / 1e6:.0f} MB): {med['total']:.2f} s "
            f"(weights {med['weights']:.2f}, canary {med['canary']:.2f}, fingerprint {med['fingerprint']:.2f})"
        )
    out["selftest"] = result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write results here")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--scale", type=float, default=1.0, help="layers relative to the 22-layer layout (file size)")
    p.add_argument("--gpu-scale", type=float, default=3.6, help="layers for the GPU fingerprint (3.6: ~8 GB)")
    p.add_argument("--peer-python", help="a python with model-signing installed (make bench-integrity makes one)")
    p.add_argument("--skip", nargs="*", default=[], choices=["hashing", "fingerprint", "selftest"])
    args = p.parse_args()
    out: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
    }
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    tensors = (
        bench_hashing(args, out) if "hashing" not in args.skip else random_tensors(layout(0.25), torch.float16, "cpu")
    )
    if "fingerprint" not in args.skip:
        bench_fingerprint(args, out, tensors)
    del tensors
    if "selftest" not in args.skip:
        bench_selftest(args, out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
