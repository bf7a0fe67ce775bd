"""torch.compile: hooks attached before compiling are traced into the graph (fullgraph=True)."""

from __future__ import annotations

import math

import pytest
import torch
from _oracle import assert_matches, oracle
from torch import nn

import torchwatch as tw


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def small() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).eval()


def test_fullgraph_compile_keeps_counting_with_the_right_statistics():
    model = small()
    xs = [torch.randn(5, 8) * s for s in (1.0, 10.0, 0.1)]
    with torch.no_grad():
        outs = [(model[0](x), model[1](model[0](x)), model(x)) for x in xs]
    with tw.attach(model) as watch:
        compiled = torch.compile(model, fullgraph=True)
        with torch.no_grad():
            for x in xs:
                compiled(x)
        snap = watch.snapshot()
    assert snap.calls == 3 and snap.sampled == 3
    for i, name in enumerate(("0", "1", "2")):
        assert_matches(snap[name], oracle(torch.cat([o[i].reshape(-1) for o in outs])))
    assert watch.errors == {}


def test_device_sampling_works_inside_the_compiled_graph():
    model = small()
    with tw.attach(model, every=2, sampling="device") as watch:
        compiled = torch.compile(model, fullgraph=True)
        with torch.no_grad():
            for _ in range(5):
                compiled(torch.randn(3, 8))
        snap = watch.snapshot()
    assert snap.calls == 5
    assert snap["0"].calls == 3  # calls 0, 2 and 4
    assert snap["2"].count == 3 * 3 * 4


def test_nonfinite_origin_and_flushes_from_compiled_calls():
    model = small()
    sink = tw.MemorySink()
    alerts = []
    with tw.attach(model, sinks=[sink], on_nonfinite=alerts.append) as watch:
        compiled = torch.compile(model, fullgraph=True)
        with torch.no_grad():
            for i in range(4):
                x = torch.randn(2, 8)
                if i == 2:
                    x[0, 0] = math.nan
                compiled(x)
        watch.flush()
        first = watch.snapshot().nonfinite
    assert {name: (r.call, r.origin) for name, r in first.items()} == {"0": (2, "0"), "1": (2, "0"), "2": (2, "0")}
    assert [(a.module, a.call) for a in alerts] == [("0", 2)]
    assert sum(r.calls for r in sink.records) == 4
    assert sink.records[-1].stats["0"].nan == 16
