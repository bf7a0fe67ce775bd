"""Every public argument is checked once, the same way: a bad one is a ConfigError that names it,
never a raw TypeError/ValueError/OverflowError/AttributeError from deep inside."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import torchwatch as tw
from torchwatch import rules

HOSTILE = [None, 5, -1, 0, 2.5, float("nan"), float("inf"), "x", "", True, [], [1], {}, object(), b"x", 10**30]


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 4))


def _targets(tmp: str) -> dict[str, tuple]:
    """name -> (call taking keyword arguments, the callable whose signature lists them)."""
    model = _model()
    manifest = tw.Manifest.from_model(model)
    return {
        "attach": (lambda **k: tw.attach(_model(), **k), tw.attach),
        "MemorySink": (tw.MemorySink, tw.MemorySink),
        "JsonlSink": (tw.JsonlSink, tw.JsonlSink),
        "IncidentLog": (tw.IncidentLog, tw.IncidentLog),
        "TensorBoardSink": (lambda **k: tw.TensorBoardSink(**{"logdir": f"{tmp}/tb", **k}), tw.TensorBoardSink),
        "PrometheusSink": (lambda **k: tw.PrometheusSink(**{"registry": _registry(), **k}).close(), tw.PrometheusSink),
        "InputMonitor": (tw.InputMonitor, tw.InputMonitor),
        "OutputMonitor": (tw.OutputMonitor, tw.OutputMonitor),
        "AlertPolicy": (rules.AlertPolicy, rules.AlertPolicy),
        "CastRange": (lambda **k: rules.CastRange(**{"dtype": "float16", **k}), rules.CastRange),
        "ControlChart": (lambda **k: rules.ControlChart(**{"stat": "absmax", **k}), rules.ControlChart),
        "EdgeChart": (rules.EdgeChart, rules.EdgeChart),
        "LatencySLO": (lambda **k: rules.LatencySLO(**{"max_ms": 10, **k}), rules.LatencySLO),
        "rules.defaults": (rules.defaults, rules.defaults),
        "Tolerances": (tw.Tolerances, tw.Tolerances),
        "arl_windows": (
            lambda **k: tw.arl_windows(**{"days": 1, "requests_per_second": 1, "window": 32, **k}),
            tw.arl_windows,
        ),
        "fingerprint": (lambda **k: tw.fingerprint(model, **k), tw.fingerprint),
        "Manifest.from_model": (lambda **k: tw.Manifest.from_model(model, **k), tw.Manifest.from_model),
        "tensor_stats": (lambda **k: tw.tensor_stats(torch.ones(3), **k), tw.tensor_stats),
        "Canary.record": (lambda **k: tw.Canary.record(model, torch.ones(2, 4), **k), tw.Canary.record),
        "compare": (lambda **k: tw.compare(model, _model(), torch.ones(2, 4), **k), tw.compare),
        "shadow": (lambda **k: tw.shadow(_model(), _model(), **k).close(), tw.shadow),
        "Reference.fit": (
            lambda **k: tw.Reference.fit(
                model, [torch.randn(64, 4) for _ in range(8)], **{"modules": ["0"], "window": 8, "resamples": 100, **k}
            ),
            tw.Reference.fit,
        ),
        "CircuitBreaker": (lambda **k: tw.CircuitBreaker(tw.attach(_model()), **k), tw.CircuitBreaker),
        "selftest": (lambda **k: tw.selftest(model, **{"manifest": manifest, **k}), tw.selftest),
        "verify_weights": (lambda **k: tw.verify_weights(model, **{"manifest": manifest, **k}), tw.verify_weights),
        "Watch.flush": (lambda **k: tw.attach(_model()).flush(**k), tw.Watch.flush),
        "Watch.detach": (lambda **k: tw.attach(_model()).detach(**k), tw.Watch.detach),
    }


def _registry():
    import prometheus_client

    return prometheus_client.CollectorRegistry()


POSITIONAL = {"model", "model_a", "model_b", "primary", "candidate", "inputs", "batches", "x", "watch", "self",
              "model_or_path", "manifest_or_path"}  # fmt: skip


def _keywords(target) -> list[str]:
    params = inspect.signature(target).parameters.values()
    return [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in POSITIONAL]


def _call(call, name: str, value: object) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out = call(**{name: value})
        except (tw.ConfigError, tw.FormatError):  # FormatError: a path that names no readable file
            return
    if isinstance(out, tw.Watch):
        out.detach()


def test_every_public_keyword_takes_hostile_values_or_refuses_them_with_a_config_error(tmp_path):
    targets = _targets(str(tmp_path))
    checked = 0
    for label, (call, signature_of) in targets.items():
        for name in _keywords(signature_of):
            for value in HOSTILE:
                try:
                    _call(call, name, value)
                except Exception as exc:  # noqa: BLE001 - the assertion reports it
                    pytest.fail(f"{label}({name}={value!r}) raised {type(exc).__name__}: {exc}")
                checked += 1
    assert checked > 1000  # every target and keyword was exercised


anything = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6) | st.binary(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    | st.tuples(inner, inner),
    max_leaves=6,
)  # fmt: skip


@given(data=st.data())
def test_any_value_for_any_keyword(data, tmp_path_factory):
    targets = _targets(str(tmp_path_factory.mktemp("args")))
    label = data.draw(st.sampled_from(sorted(targets)))
    call, signature_of = targets[label]
    name = data.draw(st.sampled_from(_keywords(signature_of)))
    value = data.draw(anything)
    try:
        _call(call, name, value)
    except Exception as exc:  # noqa: BLE001 - the assertion reports it
        pytest.fail(f"{label}({name}={value!r}) raised {type(exc).__name__}: {exc}")
