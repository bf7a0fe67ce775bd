"""Whatever a module returns, the model call never fails and every float tensor is measured."""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict

import pytest
import torch
from _device import device_watch
from _models import Out, Pair, Structured
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import torchwatch as tw
from torchwatch._pytree import MAX_TENSORS, tensors_in


def test_labels_follow_positions():
    a, b, c = torch.ones(1), torch.ones(2), torch.ones(3)
    assert [(label, t.numel()) for label, t in tensors_in((a, (b, c)))] == [("", 1), ("[1][0]", 2), ("[1][1]", 3)]
    assert [label for label, _ in tensors_in({"x": a, "y": [b, c]})] == ["", ".y[0]", ".y[1]"]
    assert [label for label, _ in tensors_in(Pair(a, b))] == ["", ".aux"]
    # a None first field keeps the others' labels stable (HF ModelOutput.loss is None at inference)
    assert [label for label, _ in tensors_in(Out(logits=None, hidden=a))] == [".hidden"]
    assert [label for label, _ in tensors_in(Out(logits=b, hidden=a))] == ["", ".hidden"]


def test_hf_model_output_is_walked_by_field():
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    out = BaseModelOutputWithPooling(last_hidden_state=torch.ones(2, 3), pooler_output=torch.ones(2))
    assert [label for label, _ in tensors_in(out)] == ["", ".pooler_output"]


def test_deep_and_wide_outputs_are_bounded():
    deep = torch.ones(1)
    for _ in range(20):
        deep = [deep]
    assert tensors_in(deep) == []
    assert len(tensors_in([torch.ones(1)] * 500)) == MAX_TENSORS
    loop: list = []
    loop.append(loop)
    assert tensors_in(loop) == []


def test_every_float_position_is_measured_and_the_rest_skipped():
    def make(x):
        return (
            x * 2,
            {"mask": x > 0, "ids": torch.arange(3), "c": torch.ones(2, dtype=torch.complex64), "h": x.half()},
            None,
            "text",
            7,
            [torch.ones(3, 3).to_sparse(), torch.empty(2, device="meta"), x.to(torch.float8_e4m3fn)],
            Out(logits=None, hidden=x.double()),
        )

    model = nn.Sequential(Structured(make))
    x = torch.randn(2, 3)
    with tw.attach(model, inputs=False) as watch:
        out = model(x)
        snap = watch.snapshot()
    assert torch.equal(out[0], x * 2)
    assert list(snap) == ["0", "0[1].h", "0[5][2]", "0[6].hidden"]  # fp8 is measured too
    assert snap["0[1].h"].count == 6 and snap["0[6].hidden"].count == 6
    assert watch.errors == {}


_leaf = st.one_of(
    st.just(None),
    st.integers(),
    st.text(max_size=3),
    st.sampled_from(
        ["f32", "f16", "bf16", "f64", "int", "bool", "complex", "empty", "scalar", "sparse", "meta", "nan"]
    ),
)


def _build(spec, x):
    if isinstance(spec, str) and spec in {
        "f32",
        "f16",
        "bf16",
        "f64",
        "int",
        "bool",
        "complex",
        "empty",
        "scalar",
        "sparse",
        "meta",
        "nan",
    }:
        return {
            "f32": x, "f16": x.half(), "bf16": x.bfloat16(), "f64": x.double(), "int": x.long(), "bool": x > 0,
            "complex": x.to(torch.complex64), "empty": x[:0], "scalar": x.sum(), "sparse": x.to_sparse(),
            "meta": torch.empty(2, device="meta"), "nan": x * math.nan,
        }[spec]  # fmt: skip
    if isinstance(spec, list):
        return [_build(s, x) for s in spec]
    if isinstance(spec, tuple):
        return tuple(_build(s, x) for s in spec)
    if isinstance(spec, dict):
        return OrderedDict((k, _build(v, x)) for k, v in spec.items())
    return spec


_structures = st.recursive(
    _leaf,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(st.text("abc", min_size=1, max_size=2), children, max_size=3),
    ),
    max_leaves=12,
)


@given(spec=_structures)
def test_no_output_structure_breaks_the_model_call(spec):
    model = nn.Sequential(Structured(lambda x: _build(spec, x)), nn.Identity())
    x = torch.randn(2, 3)
    with tw.attach(model, modules=["0"], on_nonfinite="ignore", inputs=False) as watch:
        out = model(x)
        snap = watch.snapshot()
    assert type(out) is type(_build(spec, x))
    measured = [t for _, t in tensors_in(out) if t.is_floating_point() and t.layout == torch.strided and not t.is_meta]
    assert sum(s.count for s in snap.values()) == sum(t.numel() for t in measured)
    assert watch.errors == {}


@pytest.mark.parametrize("device_path", [False, True])
def test_a_new_output_key_every_call_keeps_positions_bounded_and_counts_what_it_skips(device_path):
    """A module returning a dict with a fresh key per call must not grow the watch without bound:
    CPU tensors and device tables have the same capacity, and what is skipped is counted."""
    calls = {"n": 0}

    def fresh_key(x):
        calls["n"] += 1
        return {"logits": x * 1.0, f"k{calls['n']}": x * 2.0}  # the first key is the module's own position

    model = Structured(fresh_key)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with device_watch(model, inputs=False, device_path=device_path, rules=[]) as watch:
            capacity = watch.engine.monitor("stats").capacity
            for _ in range(capacity + 50):
                model(torch.ones(2))
            snap = watch.snapshot()
    assert len(snap) == capacity
    assert snap.errors["positions not measured"] == 1 + (capacity + 50) - capacity  # "" and one key a call
    assert sum("output positions" in str(w.message) for w in caught) == 1  # warned once
