"""Root-call latency: the sketch's error bound against numpy, CUDA-event timing's CPU twin, the SLO rule."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchwatch as tw
from torchwatch import rules
from torchwatch.monitors.latency import CallTimer, LatencySketch


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(1e-6, 100.0, allow_nan=False), min_size=1, max_size=400),
    accuracy=st.sampled_from([0.01, 0.05]),
)
def test_quantiles_are_within_the_relative_accuracy_of_the_data(values, accuracy):
    sketch = LatencySketch(accuracy)
    sketch.add_all(values)
    ordered = np.sort(np.asarray(values))
    for q in (0.0, 0.5, 0.95, 0.99, 1.0):
        exact = ordered[math.floor(q * (len(values) - 1))]
        assert abs(sketch.quantile(q) - exact) <= accuracy * exact * (1 + 1e-9), (q, sketch.quantile(q), exact)
    assert sketch.count == len(values) and sketch.max == max(values)


def test_merging_equals_sketching_everything():
    rng = np.random.default_rng(0)
    a, b = rng.lognormal(-4, 1, 500), rng.lognormal(-3, 0.5, 300)
    left, right, both = LatencySketch(), LatencySketch(), LatencySketch()
    left.add_all(a)
    right.add_all(b)
    both.add_all(np.concatenate([a, b]))
    merged = left.merge(right)
    assert merged.buckets == both.buckets and merged.count == 800
    assert merged.quantile(0.99) == both.quantile(0.99)
    with pytest.raises(tw.ConfigError, match="different accuracy"):
        left.merge(LatencySketch(0.05))


class FakeEvent:
    """Stands in for torch.cuda.Event: a clock the test advances, and a device that finishes late."""

    clock = 0.0
    done_until = 0.0

    def __init__(self) -> None:
        self.t = None

    def record(self) -> None:
        self.t = FakeEvent.clock

    def query(self) -> bool:
        return self.t <= FakeEvent.done_until

    def elapsed_time(self, end: FakeEvent) -> float:
        return (end.t - self.t) * 1e3  # milliseconds, like CUDA events


def test_device_timings_are_read_only_when_finished():
    timer = CallTimer(cuda=True, event_factory=FakeEvent)
    FakeEvent.clock, FakeEvent.done_until = 0.0, -1.0
    for duration in (0.010, 0.020, 0.030):
        token = timer.start()
        FakeEvent.clock += duration
        timer.stop(token)
    FakeEvent.done_until = 0.030  # the device has finished the first two calls only
    first = timer.take()
    assert first.count == 2 and first.max_ms == pytest.approx(20.0)
    FakeEvent.done_until = 1.0
    second = timer.take()
    assert second.count == 1 and second.p50_ms == pytest.approx(30.0, rel=0.01)
    assert timer.peek().count == 0  # the timer holds one window; the watch keeps the totals


def test_watch_reports_latency_in_snapshots_records_and_sinks(tmp_path):
    class Slow(torch.nn.Module):
        def forward(self, x):
            time.sleep(0.004)
            return x * 2

    model = Slow()
    sink = tw.MemorySink()
    outer = []  # each call's duration measured around it: the watch's timing lies inside
    with tw.attach(model, sinks=[sink, tw.JsonlSink(tmp_path / "s.jsonl")], flush_every=5, rules=[]) as watch:
        for _ in range(10):
            start = time.perf_counter()
            model(torch.ones(2))
            outer.append(1e3 * (time.perf_counter() - start))
        snap = watch.snapshot()
        watch.flush()
    assert snap.latency.count == 10
    # the sleep is a lower bound; the durations measured outside the call an upper one (the
    # sketch's relative accuracy is 1%)
    assert 4.0 <= snap.latency.p50_ms <= snap.latency.p99_ms <= snap.latency.max_ms <= 1.01 * max(outer)
    assert [r.latency.count for r in sink.records] == [5, 5]
    lines = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert lines[0]["latency"]["count"] == 5 and lines[0]["latency"]["p95_ms"] >= 4.0


def test_slo_rule_fires_on_slow_calls_and_validates(quiet):
    class Slow(torch.nn.Module):
        def forward(self, x):
            time.sleep(0.003)
            return x

    model = Slow()
    with tw.attach(model, flush_every=10, rules=[rules.LatencySLO(max_ms=1.0, min_calls=10)]) as watch:
        for _ in range(10):
            model(torch.ones(1))
        watch.flush()
    (alert,) = [a for a in watch.alerts if a.rule == "latency_slo"]
    assert alert.stat == "latency.p99_ms" and alert.value > 3.0 and alert.expected == 1.0
    with pytest.raises(tw.ConfigError, match="quantile='p90' is not valid"):
        rules.LatencySLO(max_ms=5, quantile="p90")
    with pytest.raises(tw.ConfigError, match="max_ms must be a finite number > 0, got 0"):
        rules.LatencySLO(max_ms=0)


def test_timings_stay_bounded_without_flushes():
    timer = CallTimer()
    for _ in range(10_000):
        timer.stop(timer.start())
    assert len(timer._raw) < 4096 and timer.peek().count == 10_000
    FakeEvent.clock, FakeEvent.done_until = 0.0, -1.0  # a device that never finishes
    gpu = CallTimer(cuda=True, event_factory=FakeEvent)
    for _ in range(5000):
        gpu.stop(gpu.start())
    assert len(gpu._pending) == 4096 and gpu.dropped == 5000 - 4096


def test_a_failing_timer_costs_neither_the_answer_nor_the_statistics(quiet):
    model = torch.nn.Linear(3, 3)
    with tw.attach(model, rules=[]) as watch:

        def broken(token):
            raise RuntimeError("event pool exhausted")

        watch.engine.monitor("latency").timer.stop = broken
        out = model(torch.ones(2, 3))
        snap = watch.snapshot()
    assert out.shape == (2, 3) and snap[""].count == 6 and snap.calls == 1
    assert watch.errors.get("(root call)") == 1


def test_device_timings_a_flush_never_read_are_counted_and_warned_once(monkeypatch):
    """On a device that has not finished (or a watch never flushed), the oldest pending timings
    go: the watch counts them in errors, sends the count with records and warns once."""
    FakeEvent.clock, FakeEvent.done_until = 0.0, -1.0  # the device never finishes
    model = torch.nn.Linear(2, 2)
    sink = tw.MemorySink()
    watch = tw.attach(model, sinks=[sink], flush_every=10**6, rules=[])
    monkeypatch.setattr(watch.engine.monitor("latency"), "timer", CallTimer(cuda=True, event_factory=FakeEvent))
    for _ in range(4096 + 10):
        model(torch.ones(1, 2))
    with pytest.warns(tw.TorchwatchWarning, match="device timings of calls were dropped"):
        watch.flush()
    assert watch.errors["latency timings lost"] == 10
    assert sink.records[-1].errors["latency timings lost"] == 10
    watch.detach()
