"""Module selection: every selector form, and errors that say what exists."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import torchwatch as tw
from torchwatch._select import select_modules


def model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(4, 4),
        nn.Dropout(),
        nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Identity()),
        nn.LayerNorm(4),
    )


def names(spec) -> list[str]:
    return [n for n, _ in select_modules(model(), spec)]


def test_none_selects_leaves_except_identity_like():
    assert names(None) == ["0", "2.0", "2.1", "3"]


def test_regex_must_match_the_whole_name():
    assert names(r"2\.\d") == ["2.0", "2.1", "2.2"]
    assert names(re.compile(r"\d")) == ["0", "1", "2", "3"]  # "2.0" does not fully match
    assert names(".*") == ["", "0", "1", "2", "2.0", "2.1", "2.2", "3"]


def test_names_types_and_callables():
    assert names(["3", "0"]) == ["0", "3"]  # model order, not argument order
    assert names((nn.Linear, nn.LayerNorm)) == ["0", "2.0", "3"]
    assert names(lambda fqn, m: fqn.startswith("2") and fqn != "2") == ["2.0", "2.1", "2.2"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nothing", r"modules='nothing' \(a regex matched against the whole name\) selected no module of Sequential; "
                    r"its modules include '0', '1', '2', '2.0'"),
        ("(", r"modules='\(' is not a valid regular expression: missing \), unterminated subpattern"),
        (["2.1x", "3"], r"modules names no such module: '2.1x' \(did you mean '2.1'\?\)$"),
        ((nn.Conv2d,), r"modules=\('Conv2d',\) \(module types\) selected no module"),
        (lambda fqn, m: False, r"modules='<lambda>' \(a callable\) selected no module"),
        (42, r"modules=42 is not a selector: pass None, a regex string, a list of module names, a tuple of "
             r"nn.Module types, or a callable \(fqn, module\) -> bool"),
        ([], r"modules=\[\] is not a selector"),
        (nn.Linear, r"is not a selector"),
    ],
)  # fmt: skip
def test_bad_selectors_say_what_to_do(spec, message):
    with pytest.raises(tw.ConfigError, match=message):
        select_modules(model(), spec)


def test_a_raising_selector_callable_names_the_module():
    def picky(fqn, module):
        if fqn == "2.1":
            raise TypeError("no GELU please")
        return True

    with pytest.raises(
        tw.ConfigError, match=r"the modules callable raised TypeError\('no GELU please'\) on module '2.1'"
    ):
        select_modules(model(), picky)


def test_attach_uses_the_selector():
    m = model()
    with tw.attach(m, modules=(nn.LayerNorm,)) as watch:
        m(torch.randn(2, 4))
        assert list(watch.snapshot()) == ["<input>", "3"]  # the root call's input is measured too


class _SamePadConv(nn.Conv2d):
    """A convolution with TF-style "same" padding done by a padding module it holds (as models
    ported from TensorFlow do): a Conv2d with a child, so not a leaf."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, 3)
        self.pad = nn.ZeroPad2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.pad(x))


def test_by_default_layers_with_helpers_inside_are_watched_whole_and_pass_throughs_are_not(quiet):
    from torch.nn.utils.parametrizations import weight_norm

    model = nn.Sequential(
        _SamePadConv(3, 4), nn.BatchNorm2d(4), nn.ReLU6(), nn.ZeroPad2d(1), nn.Flatten(),
        weight_norm(nn.Linear(4 * 10 * 10, 5)), nn.Dropout(), nn.TransformerEncoderLayer(5, 1, 8),
    ).eval()  # fmt: skip
    chosen = [n for n, _ in select_modules(model, None)]
    # the padded convolution and the parametrized Linear whole; no padding layer, no helper inside
    # a layer (its padding, its weight parametrization); a transformer layer is a container
    assert chosen == ["0", "1", "2", "4", "5", "7.self_attn.out_proj", "7.linear1", "7.linear2", "7.norm1", "7.norm2"]
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("nan")
    with tw.attach(model, on_nonfinite="ignore") as watch:
        model(torch.randn(2, 3, 8, 8))
        snap = watch.snapshot()
    assert watch.last_trip.module == "0"  # the NaN's origin is the convolution, not a helper
    assert "0" in snap and snap["0"].nan > 0 and "0.pad" not in snap and "3" not in snap
