"""The magnitude-histogram monitor: a built-in written as one file against the Monitor protocol.

Its counts are compared with numpy's own bucketing of the same values (an independent oracle),
then followed to every place a person reads them: snapshots and records, a JSON log read back,
TensorBoard's own reader, a real Prometheus scrape, and ``torchwatch report``.
"""

from __future__ import annotations

import itertools
import json
import math
import urllib.request

import numpy as np
import pytest
import torch

import torchwatch as tw
from torchwatch.cli import report
from torchwatch.monitors.histograms import BUCKETS, LOG2_EDGES, Histograms, MagnitudeHistograms

# The documented bucket bounds, written out here rather than imported: the oracle must not share
# the code's constant (a bound off by one power in the code then fails every count below).
BOUNDS = (0.0, 2**-24, 2**-22, 2**-20, 2**-18, 2**-16, 2**-14, 2**-12, 2**-10, 2**-8, 2**-6, 2**-4, 2**-2,
          1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0)  # fmt: skip


def _oracle(tensors: list[torch.Tensor]) -> tuple[int, ...]:
    """Bucket counts from numpy, in float64 (every fp16/bf16/fp32 value is exact there): zeros,
    then ``(BOUNDS[i-1], BOUNDS[i]]``, then ``> 2^16``; NaN left out."""
    a = np.abs(np.concatenate([t.detach().double().reshape(-1).numpy() for t in tensors]))
    a = a[~np.isnan(a)]
    counts = [int((a == 0).sum())]
    counts += [int(((a > lo) & (a <= hi)).sum()) for lo, hi in itertools.pairwise(BOUNDS)]
    counts.append(int((a > BOUNDS[-1]).sum()))
    assert len(counts) == BUCKETS
    return tuple(counts)


def _hostile(dtype: torch.dtype, n: int = 4000, seed: int = 0) -> torch.Tensor:
    """Values over every bucket, with the bucket bounds themselves, their neighbours, zeros,
    subnormals, ±Inf and NaN."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * torch.exp2(torch.randint(-30, 20, (n,), generator=g))
    edges = torch.tensor(BOUNDS[1:], dtype=torch.float64)
    special = torch.cat([edges, -edges, torch.nextafter(edges, edges * 2), torch.nextafter(edges, edges * 0),
                         torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1e-40, 6e4, 7e4])])  # fmt: skip
    return torch.cat([x, special]).to(dtype)


class Identity(torch.nn.Module):
    def forward(self, x):
        return x * 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_counts_match_numpy_bucketing_for_every_dtype(dtype):
    model = torch.nn.Sequential(Identity())
    batches = [_hostile(dtype, seed=s) for s in range(3)]
    with tw.attach(model, monitors=[Histograms()], rules=[], on_nonfinite="ignore") as watch:
        for x in batches:
            model(x)
        got = watch.snapshot().extra["histograms"]
    assert got.counts["0"] == _oracle(batches)


def test_records_add_up_to_the_snapshot_and_come_back_from_json(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    sink, path = tw.MemorySink(), tmp_path / "stats.jsonl"
    xs = [torch.randn(5, 8, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    with tw.attach(model, monitors=[Histograms(["1"])], sinks=[sink, tw.JsonlSink(path)], flush_every=2) as watch:
        outs = [model(x) for x in xs]
        total = watch.snapshot().extra["histograms"]
    assert total.counts == {"1": _oracle(outs)}
    per_record = [r.extra["histograms"] for r in sink.records]
    assert [h.counts["1"] for h in per_record] == [_oracle(outs[i : i + 2]) for i in (0, 2, 4)]
    read = [tw.Record.from_json(json.loads(line)).extra["histograms"] for line in path.read_text().splitlines()]
    assert read == per_record and all(isinstance(h, MagnitudeHistograms) for h in read)


def test_only_sampled_calls_are_counted_and_reset_forgets():
    model = torch.nn.Sequential(Identity())
    xs = [torch.full((3,), float(2**i)) for i in range(4)]
    with tw.attach(model, monitors=[Histograms(["0"])], every=2, rules=[]) as watch:
        for x in xs:
            model(x)
        assert watch.snapshot().extra["histograms"].counts == {"0": _oracle([xs[0], xs[2]])}
        watch.reset()
        assert watch.snapshot().extra["histograms"].counts == {"0": (0,) * BUCKETS}


def test_tensorboard_reads_real_histograms(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = torch.nn.Sequential(Identity())
    x = _hostile(torch.float32)
    with tw.attach(model, monitors=[Histograms(["0"])], sinks=[tw.TensorBoardSink(tmp_path)], rules=[],
                   on_nonfinite="ignore"):  # fmt: skip
        model(x)
    acc = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    assert "histograms/0/log2_abs" in acc.Tags()["histograms"]
    (event,) = acc.Histograms("histograms/0/log2_abs")
    want = _oracle([x])
    h = event.histogram_value
    # the first bucket is the empty one below the lowest edge; then the nonzero buckets in order
    assert list(h.bucket_limit) == list(LOG2_EDGES) and list(h.bucket) == [0.0, *map(float, want[1:])]
    assert h.num == sum(want[1:])
    (zero,) = acc.Scalars("histograms/0/zero_fraction")
    assert zero.value == pytest.approx(want[0] / sum(want), rel=1e-6)  # float32 in the event file


def test_prometheus_scrape_shows_cumulative_buckets():
    pytest.importorskip("prometheus_client")
    sink = tw.PrometheusSink(port=0, model_name="histograms-test")
    model = torch.nn.Sequential(Identity())
    xs = [_hostile(torch.float32, n=500, seed=s) for s in range(2)]
    with tw.attach(model, monitors=[Histograms(["0"])], sinks=[sink], rules=[], on_nonfinite="ignore",
                   flush_every=1) as watch:  # fmt: skip
        for x in xs:
            model(x)
        watch.flush()
        body = urllib.request.urlopen(f"http://127.0.0.1:{sink.port}/metrics").read().decode()
    want = np.cumsum(_oracle(xs))
    for bound, n in zip((*BOUNDS, math.inf), want, strict=True):
        le = "+Inf" if bound == math.inf else f"{bound:g}"
        line = f'torchwatch_abs_histogram_total{{le="{le}",model="histograms-test",module="0"}} {float(n)}'
        assert line in body, line


def test_report_shows_the_histograms(tmp_path):
    model = torch.nn.Sequential(Identity())
    xs = [torch.full((10,), 0.75), torch.zeros(5)]
    with tw.attach(model, monitors=[Histograms(["0"])], sinks=[tw.JsonlSink(tmp_path / "s.jsonl")], rules=[],
                   flush_every=1):  # fmt: skip
        for x in xs:
            model(x)
    summary = report.summarize(report.load(tmp_path))
    (h,) = [h for h in summary["histograms"] if h["tag"] == "histograms/0/log2_abs"]
    i = LOG2_EDGES.index(0.0) - 1  # 0.75 lies in (2^-2, 2^0]
    assert h["total"] == 10 and h["counts"][i] == 10
    assert "histograms/0/log2_abs" in report.text(summary) and "(-2, 0]: 100%" in report.text(summary)


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ({"bounds": [0.0, 1.0], "counts": {}}, "bounds"),
        ({"bounds": list(BOUNDS), "counts": []}, "counts"),
        ({"bounds": [2 * b for b in BOUNDS], "counts": {}}, "bounds"),
        ({"bounds": list(BOUNDS), "counts": {"0": [1] * (BUCKETS - 1)}}, "non-negative integers"),
        ({"bounds": list(BOUNDS), "counts": {"0": [-1] * BUCKETS}}, "non-negative integers"),
        ({"bounds": list(BOUNDS), "counts": {"0": [0.5] * BUCKETS}}, "non-negative integers"),
        ("histogram", "expected a JSON object"),
    ],
)
def test_a_damaged_log_value_is_a_format_error_naming_the_field(doc, match):
    with pytest.raises(tw.FormatError, match=match):
        MagnitudeHistograms.from_dict(doc, "line 3, extra.'histograms'")


def test_unknown_modules_are_refused_at_attach():
    with pytest.raises(tw.ConfigError, match="no modules"):
        tw.attach(torch.nn.Sequential(Identity()), monitors=[Histograms(["nope"])])
