"""What protecting a model with a CircuitBreaker costs per call, and what reading watch.healthy costs.

    python benchmarks/containment.py

Interleaved: the same small model called directly and through the breaker (rules off, so only
the breaker differs; the watch is attached in both), medians of per-round ratios.
"""

from __future__ import annotations

import statistics
import time
import timeit

import torch

import torchwatch as tw


def main() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).eval()
    x = torch.randn(8, 64)
    watch = tw.attach(model, every=1_000_000, rules=[])  # hooks off after the first call: isolate the breaker
    breaker = tw.CircuitBreaker(watch, fallback=lambda x: None)
    n = 2000
    with torch.inference_mode():
        for _ in range(200):
            model(x)
            breaker(x)
        direct, wrapped = [], []
        for _ in range(15):
            t = time.perf_counter()
            for _ in range(n):
                model(x)
            direct.append((time.perf_counter() - t) / n)
            t = time.perf_counter()
            for _ in range(n):
                breaker(x)
            wrapped.append((time.perf_counter() - t) / n)
    extra = statistics.median(w - d for w, d in zip(wrapped, direct, strict=True))
    healthy = min(timeit.repeat(lambda: watch.healthy, number=100_000, repeat=5)) / 100_000
    print(f"model call {statistics.median(direct) * 1e6:.1f} us; through the breaker +{extra * 1e6:.2f} us per call")
    print(f"reading watch.healthy: {healthy * 1e9:.0f} ns")
    watch.detach()


if __name__ == "__main__":
    main()
