"""Several threads running one watched model: counts stay exact, sampling stays exact."""

from __future__ import annotations

import threading

import pytest
import torch
from _models import mlp

import torchwatch as tw

THREADS, CALLS = 8, 200


def _hammer(model, watch, *, nan_every: int = 0) -> list[BaseException]:
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def run(tid: int) -> None:
        try:
            start.wait()
            for i in range(CALLS):
                x = torch.randn(2, 16)
                if nan_every and i % nan_every == 0:
                    x[0, 0] = float("nan")
                with watch.context(cohort=f"t{tid % 2}", trace_id=f"{tid}-{i}"):
                    model(x)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


@pytest.mark.parametrize("every", [1, 3])
def test_eight_threads_two_hundred_forwards_counts_exact(every):
    model = mlp()
    sink = tw.MemorySink()
    with tw.attach(model, every=every, flush_every=7, sinks=[sink], on_nonfinite="ignore") as watch:
        assert _hammer(model, watch, nan_every=10) == []
        snap = watch.snapshot()
    total = THREADS * CALLS
    sampled = len(range(0, total, every))
    assert snap.calls == total and snap.sampled == sampled
    assert snap["0"].calls == sampled and snap["0"].count == sampled * 2 * 16
    assert snap["5"].count == sampled * 2 * 4
    if every == 1:  # every tenth input holds one NaN, which Linear '0' spreads over its 16 outputs
        assert snap["0"].nan == THREADS * len(range(0, CALLS, 10)) * 16
    assert sum(r.calls for r in sink.records) == total
    assert sum(r.sampled for r in sink.records) == sampled
    assert watch.errors == {}


def test_cohort_snapshots_partition_the_calls_across_threads():
    model = mlp()
    with tw.attach(model) as watch:
        assert _hammer(model, watch) == []
        a, b, both = watch.snapshot(cohort="t0"), watch.snapshot(cohort="t1"), watch.snapshot()
    assert a["0"].calls + b["0"].calls == both["0"].calls == THREADS * CALLS
    assert a["0"].count + b["0"].count == both["0"].count


def test_windows_cut_while_large_outputs_are_measured_lose_nothing():
    # Outputs over one kernel chunk are measured with the GIL released and merged straight into
    # their window's accumulator; a flush on another thread may cut that window meanwhile, and
    # the measurement must land in the next one (never in a window already read).
    model = torch.nn.Sequential(torch.nn.Linear(16, 20_000), torch.nn.ReLU()).eval()
    sink = tw.MemorySink()
    with tw.attach(model, flush_every=1_000_000, sinks=[sink], rules=[]) as watch:
        done = threading.Event()

        def flusher() -> None:
            while not done.is_set():
                watch.flush()

        t = threading.Thread(target=flusher)
        t.start()
        try:
            assert _hammer(model, watch) == []
        finally:
            done.set()
            t.join()
        snap = watch.snapshot()
    total = THREADS * CALLS
    assert snap["0"].calls == snap["1"].calls == total
    assert snap["0"].count == snap["1"].count == total * 2 * 20_000
    assert sum(r.calls for r in sink.records) == total and len(sink.records) > 1
