"""Flushes lose nothing: a writer that falls behind, calls in flight, sinks that never finish."""

from __future__ import annotations

import json
import threading
import warnings

import torch
from _models import mlp
from torch import nn

import torchwatch as tw
from torchwatch.cli import report
from torchwatch.engine.core import MERGE_RECORDS_BEHIND


class Blocking(tw.Sink):
    """Blocks in write() until released: the worker falls behind as far as the test wants."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.records: list[tw.Record] = []

    def write(self, record: tw.Record) -> None:
        self.release.wait(60)
        self.records.append(record)


def _jsonl_calls(path) -> int:
    return sum(json.loads(line)["calls"] for line in path.read_text().splitlines())


def test_a_writer_that_falls_behind_merges_intervals_and_every_call_reaches_the_sinks(tmp_path):
    blocking, path = Blocking(), tmp_path / "s.jsonl"
    model = mlp()
    with tw.attach(model, sinks=[blocking, tw.JsonlSink(path)], flush_every=1) as watch:
        for _ in range(1000):
            model(torch.randn(2, 16))
        blocking.release.set()  # the first record was stuck in write() all along
        watch.flush()
        snap = watch.snapshot()
    assert snap.calls == 1000
    assert sum(r.calls for r in blocking.records) == 1000
    assert sum(r.stats["0"].count for r in blocking.records) == snap["0"].count == 1000 * 2 * 16
    assert len(blocking.records) + sum(r.merged for r in blocking.records) >= 1000  # one flush per call
    # the one stuck in write(), a merged one, the last MERGE_RECORDS_BEHIND one by one, the final flush
    assert len(blocking.records) <= 3 + MERGE_RECORDS_BEHIND
    assert _jsonl_calls(path) == 1000
    assert report.summarize(report.load(tmp_path))["calls"] == 1000
    assert watch.errors == {}


def test_four_threads_with_flush_every_call_and_a_slow_writer_lose_no_call(tmp_path):
    path = tmp_path / "s.jsonl"
    blocking = Blocking()
    model = mlp()
    with tw.attach(model, sinks=[blocking, tw.JsonlSink(path)], flush_every=1) as watch:

        def serve() -> None:
            for _ in range(400):
                model(torch.randn(2, 16))

        threads = [threading.Thread(target=serve) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        blocking.release.set()
        snap = watch.snapshot()
    assert snap.calls == 1600 and snap["0"].calls == 1600
    assert sum(r.calls for r in blocking.records) == 1600
    assert sum(r.stats["0"].calls for r in blocking.records if "0" in r.stats) == 1600
    assert _jsonl_calls(path) == 1600


def test_a_call_in_flight_during_another_threads_flush_reaches_the_sinks():
    """The call is counted in the interval it started in; the modules that ran after the flush
    land in the next interval, which has statistics but no root call of its own."""
    entered, gate = threading.Event(), threading.Event()

    class Gate(nn.Module):
        def forward(self, x):
            entered.set()
            gate.wait(60)
            return x

    model = nn.Sequential(nn.Linear(4, 4), Gate(), nn.Linear(4, 4)).eval()
    sink = tw.MemorySink()
    with tw.attach(model, sinks=[sink], flush_every=1000, rules=[]) as watch:
        caller = threading.Thread(target=lambda: model(torch.randn(3, 4)))
        caller.start()
        entered.wait(60)
        watch.flush()  # '0' measured and the call counted; '1' and '2' not yet
        gate.set()
        caller.join()
        watch.flush()
        snap = watch.snapshot()
    assert [r.calls for r in sink.records] == [1, 0]
    for name in ("0", "1", "2"):
        assert sum(r.stats[name].count for r in sink.records if name in r.stats) == snap[name].count == 12


def test_a_sink_that_never_finishes_costs_detach_only_its_timeout_and_is_counted():
    blocking = Blocking()
    model = mlp()
    watch = tw.attach(model, sinks=[blocking], flush_every=1)
    for _ in range(5):
        model(torch.randn(2, 16))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watch.detach(timeout=0.2)
    assert watch.errors["records not written"] >= 1
    assert any("were not written by then" in str(w.message) for w in caught)
    blocking.release.set()
