"""torch.compile: hooks attached before compiling are traced into the graph (fullgraph=True)."""

from __future__ import annotations

import math

import pytest
import torch
from _oracle import U32, assert_within, gamma
from torch import nn

import torchwatch as tw


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def small() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).eval()


def _eager_with_bounds(model: nn.Sequential, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's eager output and a bound on how far any correct float32 evaluation of the
    same layers (inductor's fused, vectorised code on this CPU, say) can be from it.

    Linear over n inputs: both evaluations are within gamma_(n+1) (|x| |W|^T + |b|) of the exact
    result (Higham's bound, any summation order, FMA or not), and an input already off by d
    moves the output by at most |W| d. GELU: |gelu'| <= 1.13, and each implementation's own
    error (erf to ~2 ulp, then 1 + erf and the products) is below 8 u |y| absolute.
    """
    out, err = x, torch.zeros_like(x)
    layers = []
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                n = layer.in_features + 1
                magnitude = out.abs() @ layer.weight.abs().T + layer.bias.abs()
                err = err @ layer.weight.abs().T + 2 * gamma(n) * magnitude
            elif isinstance(layer, nn.GELU):
                err = 1.13 * err + 2 * 8 * U32 * out.abs()
            else:
                raise AssertionError(f"no error bound for {layer}")
            out = layer(out)
            layers.append((out, err))
    return layers


def test_fullgraph_compile_keeps_counting_with_the_right_statistics():
    model = small()
    xs = [torch.randn(5, 8) * s for s in (1.0, 10.0, 0.1)]
    eager = [_eager_with_bounds(model, x) for x in xs]
    with tw.attach(model) as watch:
        compiled = torch.compile(model, fullgraph=True)
        with torch.no_grad():
            for x in xs:
                compiled(x)
        snap = watch.snapshot()
    assert snap.calls == 3 and snap.sampled == 3
    for i, name in enumerate(("0", "1", "2")):
        values = torch.cat([e[i][0].reshape(-1) for e in eager])
        bounds = torch.cat([e[i][1].reshape(-1) for e in eager])
        assert_within(snap[name], values, bounds)
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


def test_compiled_statistics_are_one_opaque_op_per_output():
    """Inside a compiled graph each watched output adds one torchwatch op, not the ~40 small
    reductions that made inductor compile a 2-layer BERT 5x slower (benchmarks/compile_time.py)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = small()
    with tw.attach(model, inputs=False) as watch:
        compiled = torch.compile(model, backend=backend, fullgraph=True)
        with torch.no_grad():
            compiled(torch.randn(5, 8))
            compiled(torch.randn(5, 8))
        snap = watch.snapshot()
    targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op in ("call_function", "call_method")]
    assert sum("torchwatch.merge_stats" in t for t in targets) == 3  # one per watched output
    reductions = [t for t in targets if any(r in t for r in ("sum", "amin", "amax", "isfinite", "isnan"))]
    assert reductions == []  # the model has none of its own; the statistics' stay inside the op
    assert snap.calls == 2 and snap["2"].count == 2 * 5 * 4
    # compiled once: the hooks' bookkeeping leaves no guard that the first call invalidates
    assert len(graphs) == 1
