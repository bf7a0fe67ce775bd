"""CircuitBreaker: opens on a tripping alert (replacing the bad answer), half-opens, closes."""

from __future__ import annotations

import threading

import pytest
import torch

import torchwatch as tw

NAN = float("nan")


def _setup(**kwargs):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    watch = tw.attach(model, on_nonfinite="ignore", rules=[])
    changes = []
    breaker = tw.CircuitBreaker(watch, on_change=lambda old, new, why: changes.append((old, new)), **kwargs)
    return model, watch, breaker, changes


def test_open_half_open_close_cycle():
    now = [0.0]  # the breaker's clock: the test moves it, nothing sleeps
    model, watch, breaker, changes = _setup(
        fallback=lambda x: torch.full((len(x), 2), -1.0), cooldown=0.2, clock=lambda: now[0]
    )
    good = torch.ones(3, 2)
    assert torch.equal(breaker(good), model(good)) and breaker.state == "closed"
    out = breaker(torch.tensor([[NAN, 1.0]]))
    assert out.tolist() == [[-1.0, -1.0]] and breaker.state == "open"  # the NaN answer never leaves
    assert breaker.reason.rule == "nonfinite"
    now[0] = 0.19
    assert breaker(good).tolist() == [[-1.0, -1.0]] * 3  # open, cool-down not over: the model is not called
    now[0] = 0.2
    assert breaker(torch.tensor([[NAN, 0.0]])).tolist() == [[-1.0, -1.0]]  # half-open trial fails
    assert breaker.state == "open"
    now[0] = 0.45
    assert torch.equal(breaker(good), model(good)) and breaker.state == "closed"
    assert changes == [("closed", "open"), ("open", "half-open"), ("half-open", "open"), ("open", "half-open"),
                       ("half-open", "closed")]  # fmt: skip
    assert breaker.fallback_calls == 3
    watch.detach()


def test_without_fallback_the_caller_gets_circuit_open_error():
    _model, watch, breaker, _ = _setup(cooldown=60)
    with pytest.raises(tw.CircuitOpenError, match="circuit open: NaN arrived with the model's input '<input>'"):
        breaker(torch.tensor([[NAN, 1.0]]))
    with pytest.raises(tw.CircuitOpenError):
        breaker(torch.ones(1, 2))
    watch.detach()


def test_a_trip_between_calls_opens_before_the_next_call():
    model, watch, breaker, _ = _setup(fallback=lambda x: "fallback", cooldown=60)
    model(torch.tensor([[NAN, 1.0]]))  # traffic that bypassed the breaker
    assert breaker(torch.ones(1, 2)) == "fallback" and breaker.state == "open"
    watch.detach()


def test_concurrent_calls_are_safe():
    _model, watch, breaker, _ = _setup(fallback=lambda x: None, cooldown=60)
    errors = []

    def serve(i: int) -> None:
        try:
            for j in range(50):
                x = torch.tensor([[NAN, 1.0]]) if (i, j) == (3, 25) else torch.ones(1, 2)
                breaker(x)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and breaker.state == "open" and breaker.fallback_calls >= 1
    watch.detach()


def test_bad_arguments():
    with pytest.raises(tw.ConfigError, match="needs a torchwatch Watch"):
        tw.CircuitBreaker(object())
    model = torch.nn.Linear(2, 2)
    with tw.attach(model) as watch:
        with pytest.raises(tw.ConfigError, match="fallback must be callable"):
            tw.CircuitBreaker(watch, fallback=3)
        for cooldown in (-1, "x", float("nan"), float("inf"), True):
            with pytest.raises(tw.ConfigError, match="cooldown must be a finite number >= 0"):
                tw.CircuitBreaker(watch, cooldown=cooldown)
        with pytest.raises(tw.ConfigError, match="clock must be callable"):
            tw.CircuitBreaker(watch, clock=0.0)
        with pytest.raises(tw.ConfigError, match="on_change must be callable"):
            tw.CircuitBreaker(watch, on_change="log")


def test_the_breaker_keeps_the_model_a_server_holds_only_through_it():
    # the serving shape that lost its model: build it in a function, keep only the watch and breaker
    def startup():
        model = torch.nn.Sequential(torch.nn.Linear(2, 2))
        watch = tw.attach(model, on_nonfinite="ignore", rules=[])
        return watch, tw.CircuitBreaker(watch, fallback=lambda x: "fallback")

    watch, breaker = startup()
    import gc

    gc.collect()
    assert watch.model is breaker.model  # the watch's weak reference still resolves
    assert breaker(torch.ones(1, 2)).shape == (1, 2)
    assert breaker(torch.tensor([[NAN, 1.0]])) == "fallback"
    watch.detach()
