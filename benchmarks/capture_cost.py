"""What an armed capture costs the serving thread on CPU: per call with no incident, and per incident.

Two models, every leaf watched: BERT-base-shaped (transformers, from its config; fp32, seq 128,
batch 1) and a ResNet-style convnet (batch 8, 3x224x224 input). Three variants run interleaved in
one process, one forward each per round: plain, the default watch, and the default watch with
``capture=tw.Capture(dir, inputs=True)`` (nothing faults). Reported: the median over rounds of each
variant's time over the plain forward's in the same round, minus 1, and the armed capture's cost
over the watch's.

Then per captured incident: calls that go non-finite (a NaN pixel; for BERT a NaN embedding row),
timed with the watch alone and with the watch and the capture (its serving-thread share: judging
the call, copying its inputs and outputs, queueing the bundle), interleaved, the writer left to
finish between timed calls; and the writer thread's time per bundle (off the serving thread, but
on a CPU it shares the cores: redact, the weights' fingerprint, the safetensors file, the index line).

    .venv/bin/python benchmarks/capture_cost.py --rounds 30
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
import warnings

import torch
from torch import nn

import torchwatch as tw


def _bert() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    import transformers

    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(attn_implementation="eager")).eval()
    return model, {"input_ids": torch.randint(0, 30000, (1, 128))}


def _convnet() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)

    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    layers = [*block(3, 32, 2), *block(32, 64, 2), *block(64, 64, 1), *block(64, 128, 2), *block(128, 128, 1),
              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 1000)]  # fmt: skip
    return nn.Sequential(*layers).eval(), torch.randn(8, 3, 224, 224)


def _call(model: nn.Module, x: object) -> None:
    model(**x) if isinstance(x, dict) else model(x)


def _rounds(models: dict[str, nn.Module], x: object, rounds: int, between=None) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for m in models.values():
            for _ in range(2):
                _call(m, x)
                if between is not None:
                    between()
        for _ in range(rounds):
            for name, m in models.items():
                start = time.perf_counter()
                _call(m, x)
                times[name].append(time.perf_counter() - start)
                if between is not None:
                    between()
    return times


def _median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y - 1 for x, y in zip(a, b, strict=True))


def armed(name: str, build, rounds: int) -> None:
    models = {}
    for variant in ("plain", "watch", "watch+capture"):
        models[variant], x = build()
    directory = tempfile.mkdtemp()
    watches = [tw.attach(models["watch"], rules=[]),
               tw.attach(models["watch+capture"], rules=[], capture=tw.Capture(directory, inputs=True))]  # fmt: skip
    times = _rounds(models, x, rounds)
    for w in watches:
        w.detach()
    assert tw.Incident.list(directory) == []
    plain = statistics.median(times["plain"]) * 1e3
    print(f"{name}: plain forward {plain:.1f} ms (median of {rounds})")
    for variant in ("watch", "watch+capture"):
        print(f"  {variant:<15} {100 * _median_ratio(times[variant], times['plain']):+6.2f}% over plain")
    extra = _median_ratio(times["watch+capture"], times["watch"])
    print(f"  armed capture over the watch: {100 * extra:+.2f}% ({extra * plain * 1e3:+.0f} us per call)")


def per_incident(name: str, build, rounds: int) -> None:
    models = {}
    for variant in ("watch", "watch+capture"):
        models[variant], x = build()
    bad = dict(x) if isinstance(x, dict) else x.clone()
    if isinstance(bad, dict):  # token ids cannot be NaN: the fault enters as an embedding output instead
        models["watch"].embeddings.word_embeddings.weight.data[bad["input_ids"][0, 0]] = math.nan
        models["watch+capture"].embeddings.word_embeddings.weight.data[bad["input_ids"][0, 0]] = math.nan
    else:
        bad[0, 0, 0, 0] = math.nan
    directory = tempfile.mkdtemp()
    capture = tw.Capture(directory, inputs=True, max_per_hour=10**6, max_total_bytes=1 << 40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tw.TorchwatchWarning)
        watches = [tw.attach(models["watch"], rules=[], on_nonfinite="ignore"),
                   tw.attach(models["watch+capture"], rules=[], on_nonfinite="ignore", capture=capture)]  # fmt: skip
        monitor = watches[1].engine.monitor("capture")
        # the writer thread must not run during the next timed call (it would slow whichever came next)
        times = _rounds(models, bad, rounds, between=lambda: monitor.writer.wait(300))
        written = len(tw.Incident.list(directory))
        job_time = []
        for path in tw.Incident.list(directory)[:5]:  # the writer's share, timed on this thread
            incident = tw.Incident.load(path)
            job = _job(incident)
            start = time.perf_counter()
            monitor.writer.write(job)
            job_time.append(time.perf_counter() - start)
        for w in watches:
            w.detach()
    extra = statistics.median(a - b for a, b in zip(times["watch+capture"], times["watch"], strict=True))
    print(f"  per captured incident ({written} bundles written): serving thread {extra * 1e3:+.2f} ms per faulting "
          f"call; writer thread {statistics.median(job_time) * 1e3:.1f} ms per bundle")  # fmt: skip


def _job(incident: tw.Incident):
    from torchwatch.capture.writer import Pending

    return Pending(incident.trigger, [incident.trigger], incident.call, incident.trace_id, incident.cohort,
                   incident.time, True, incident.environment, args=incident.args, kwargs=incident.kwargs,
                   outputs=incident.outputs, stats=incident.stats, stats_scope="call")  # fmt: skip


def per_module(rounds: int) -> None:
    """The armed capture's cost per watched module, where nothing else hides it: 200 tiny layers."""

    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(*[nn.Linear(16, 16) for _ in range(200)]).eval()

    models = {"plain": build(), "watch": build(), "watch+capture": build()}
    capture = tw.Capture(tempfile.mkdtemp(), inputs=True)
    watches = [tw.attach(models["watch"], rules=[]), tw.attach(models["watch+capture"], rules=[], capture=capture)]
    times = _rounds(models, torch.randn(1, 16), rounds * 5)
    for w in watches:
        w.detach()
    us = {name: statistics.median(t) * 1e6 / 200 for name, t in times.items()}
    print(
        f"200 x Linear(16, 16), batch 1: {us['plain']:.1f} us per module plain, watch +{us['watch'] - us['plain']:.1f} "
        f"us, armed capture +{us['watch+capture'] - us['watch']:.1f} us more per module"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=30)
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds")
    per_module(args.rounds)
    for name, build in (("BERT-base fp32 seq 128 batch 1", _bert), ("convnet batch 8x3x224x224", _convnet)):
        armed(name, build, args.rounds)
        per_incident(name, build, max(5, args.rounds // 3))


if __name__ == "__main__":
    main()
