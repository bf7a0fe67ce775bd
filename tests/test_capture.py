"""Capture on the serving side: which call is captured, what its bundle holds, and the bounds.

Oracles: the call's own tensors (its inputs and each module's output, kept by plain forward hooks)
measured with numpy in float64 (``_oracle``); bundles are read back with the checked reader.
"""

from __future__ import annotations

import math
import os
import stat
import threading

import pytest
import torch
from _device import device_watch
from _models import Tagger, mlp
from _oracle import assert_matches, oracle
from torch import nn

import torchwatch as tw
from torchwatch.capture import writer as capture_writer
from torchwatch.rules import CastRange


def _serve(model, batches, watch, trace=True):
    with torch.no_grad():
        for i, x in enumerate(batches):
            with watch.context(trace_id=f"req-{i}" if trace else None):
                model(x)


def _outputs_of(model, x):
    """Each leaf module's output on ``x`` alone (plain hooks, the oracle's input)."""
    seen = {}
    handles = [m.register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, out.detach().clone()))
               for name, m in model.named_modules() if name and not list(m.children())]  # fmt: skip
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    return seen, out


def test_the_faulting_call_is_captured_with_its_inputs_outputs_and_its_own_statistics(tmp_path, quiet):
    torch.manual_seed(0)
    model = mlp(8).eval()
    batches = [torch.randn(4, 8) for _ in range(6)]
    batches[3][2, 5] = math.nan
    capture = tw.Capture(tmp_path / "inc", inputs=True)
    with tw.attach(model, capture=capture, on_nonfinite="ignore") as watch:
        _serve(model, batches, watch)
    paths = tw.Incident.list(capture.directory)
    assert len(paths) == 1
    incident = tw.Incident.load(paths[0])
    assert (incident.call, incident.trace_id, incident.trigger.rule, incident.trigger.module) == (
        3, "req-3", "nonfinite", "<input>")  # fmt: skip
    assert incident.meta["exact"] and incident.meta["stats_scope"] == "call"
    # the inputs bitwise (NaN included) and the output the call returned
    assert torch.equal(incident.args[0].view(torch.int32), batches[3].view(torch.int32)) and incident.kwargs == {}
    expected_modules, expected_out = _outputs_of(model, batches[3])
    assert torch.equal(incident.outputs.nan_to_num(), expected_out.nan_to_num())
    # statistics of that call alone (not of the six calls' window)
    assert_matches(incident.stats["<input>"], oracle(batches[3]))
    assert incident.meta["modules"] == ["0", "1", "3", "4", "5"]  # the watched ones (Dropout is not)
    for name in incident.meta["modules"]:
        assert incident.stats[name].calls == 1
        assert_matches(incident.stats[name], oracle(expected_modules[name]))
    assert incident.environment["threads"] == torch.get_num_threads()
    assert incident.meta["weights"]["fingerprint"]["digest"] == tw.fingerprint(model).digest


def test_healthy_calls_capture_nothing_and_the_window_is_unchanged_by_the_armed_capture(tmp_path, quiet):
    torch.manual_seed(1)
    model = mlp(8).eval()
    batches = [torch.randn(3, 8) for _ in range(5)]
    with tw.attach(model) as plain:
        _serve(model, batches, plain)
        want = plain.snapshot()
    capture = tw.Capture(tmp_path / "inc", inputs=True)
    with tw.attach(model, capture=capture) as armed:
        _serve(model, batches, armed)
        got = armed.snapshot()
        assert armed.errors == {}
    assert tw.Incident.list(capture.directory) == [] if os.path.isdir(capture.directory) else True
    assert list(got) == list(want)
    for name in want:
        a, b = want[name], got[name]
        assert (a.count, a.nan, a.zeros, a.min, a.max, a.overflow) == (
            b.count,
            b.nan,
            b.zeros,
            b.min,
            b.max,
            b.overflow,
        )
        # the same float64 moments merged in another grouping: equal to rounding of the merge
        assert b.mean == pytest.approx(a.mean, rel=1e-12, abs=1e-12) and b.std == pytest.approx(a.std, rel=1e-12)


def test_statistics_only_by_default_and_a_replay_says_it_cannot(tmp_path, quiet):
    model = mlp(4).eval()
    capture = tw.Capture(tmp_path / "inc")
    with tw.attach(model, capture=capture, on_nonfinite="ignore") as watch:
        _serve(model, [torch.full((2, 4), math.inf)], watch)
    incident = tw.Incident.load(tw.Incident.list(capture.directory)[0])
    assert incident.args is None and incident.outputs is None and incident.stats["<input>"].posinf == 8
    from safetensors import safe_open

    with safe_open(incident.path, "pt") as f:
        assert list(f.keys()) == []  # no tensor of the call is on disk
    with pytest.raises(tw.ConfigError, match="statistics only"):
        incident.replay(model)


def test_redact_runs_before_anything_is_written_and_a_failing_one_writes_nothing(tmp_path, quiet):
    model = mlp(4).eval()

    def zero_inputs(tree):
        if isinstance(tree, dict):  # the arguments; the outputs come as they are
            return {"args": tuple(torch.zeros_like(a) for a in tree["args"]), "kwargs": tree["kwargs"]}
        return tree

    capture = tw.Capture(tmp_path / "a", inputs=True, redact=zero_inputs)
    with tw.attach(model, capture=capture, on_nonfinite="ignore") as watch:
        _serve(model, [torch.tensor([[math.nan, 5.0, 6.0, 7.0]])], watch)
    incident = tw.Incident.load(tw.Incident.list(capture.directory)[0])
    assert incident.meta["redacted"] and torch.equal(incident.args[0], torch.zeros(1, 4))
    assert stat.S_IMODE(os.stat(incident.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(capture.directory).st_mode) == 0o700

    def broken(tree):
        raise RuntimeError("no")

    capture = tw.Capture(tmp_path / "b", inputs=True, redact=broken)
    with pytest.warns(tw.TorchwatchWarning, match="nothing of it was written"):
        with tw.attach(model, capture=capture, on_nonfinite="ignore") as watch:
            _serve(model, [torch.tensor([[math.nan, 5.0, 6.0, 7.0]])], watch)
            watch.engine.monitor("capture").close(10)
            assert watch.errors == {capture_writer.NOT_WRITTEN: 1}
    assert not os.path.exists(capture.directory) or not any(f.endswith(".safetensors") for f in os.listdir(
        capture.directory))  # fmt: skip


def test_bounds_per_hour_per_bundle_and_on_disk_are_counted(tmp_path, quiet):
    model = mlp(4).eval()
    bad = [torch.full((2, 4), math.nan) for _ in range(4)]
    capture = tw.Capture(tmp_path / "hour", inputs=True, max_per_hour=2)
    with tw.attach(model, capture=capture, on_nonfinite="ignore") as watch:
        _serve(model, bad, watch)
        watch.engine.monitor("capture").close(10)
        assert watch.errors == {capture_writer.OVER_LIMIT: 2}
    assert len(tw.Incident.list(capture.directory)) == 2

    capture = tw.Capture(tmp_path / "size", inputs=True, max_bundle_bytes=16)
    with tw.attach(model, capture=capture, on_nonfinite="ignore") as watch:
        _serve(model, bad[:1], watch)
        watch.engine.monitor("capture").close(10)
        assert watch.errors == {capture_writer.OVER_LIMIT: 1}
    incident = tw.Incident.load(tw.Incident.list(capture.directory)[0])
    assert incident.args is None and "max_bundle_bytes" in incident.meta["dropped"] and incident.stats

    capture = tw.Capture(tmp_path / "disk", inputs=True, max_total_bytes=1000)
    with tw.attach(model, capture=capture, on_nonfinite="ignore") as watch:
        _serve(model, bad[:2], watch)
        watch.engine.monitor("capture").close(10)
        assert watch.errors == {capture_writer.OVER_LIMIT: 2}
    assert tw.Incident.list(capture.directory) == []


def test_an_unwritable_directory_or_a_full_disk_costs_no_request(tmp_path, monkeypatch, quiet):
    model = mlp(4).eval()
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    capture = tw.Capture(blocker / "incidents", inputs=True)  # makedirs fails whoever runs the test
    x = torch.full((2, 4), math.nan)
    with tw.attach(model, capture=capture, on_nonfinite="ignore") as watch:
        with torch.no_grad():
            out = model(x)
        watch.engine.monitor("capture").close(10)
        assert watch.errors == {capture_writer.NOT_WRITTEN: 1}
    assert out.shape == (2, 4)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(capture_writer.bundle, "write", full)
    capture = tw.Capture(tmp_path / "full", inputs=True)
    with tw.attach(model, capture=capture, on_nonfinite="ignore") as watch:
        with torch.no_grad():
            model(x)
        watch.engine.monitor("capture").close(10)
        assert watch.errors == {capture_writer.NOT_WRITTEN: 1}


def test_any_pytree_of_arguments_round_trips_and_what_cannot_be_stored_is_named(tmp_path, quiet):
    model = Tagger().eval()
    ids = torch.randint(0, 3000, (2, 5))
    features = torch.randn(2, 5, 8)
    features[0, 0, 0] = math.inf
    capture = tw.Capture(tmp_path / "inc", inputs=True)
    with tw.attach(model, capture=capture, on_nonfinite="ignore"):
        with torch.no_grad():
            model(ids, attention_mask=[1, 2.5, "x", None, (True,)], features=features)
            model(ids, attention_mask=object(), features=features)
    first, second = (tw.Incident.load(p) for p in tw.Incident.list(capture.directory))
    assert torch.equal(first.args[0], ids) and torch.equal(first.kwargs["features"], features)
    assert first.kwargs["attention_mask"] == [1, 2.5, "x", None, (True,)]
    assert torch.equal(first.outputs["logits"].nan_to_num(), model(ids, features=features)["logits"].nan_to_num())
    with pytest.raises(tw.ConfigError, match="keyword argument 'attention_mask' was an instance of object"):
        second.replay(model)


def test_a_per_call_cast_limit_captures_the_call_that_breaks_it(tmp_path, quiet):
    model = nn.Identity()
    capture = tw.Capture(tmp_path / "inc", inputs=True)
    big = 1e6  # over float16's 65504
    calls = [torch.tensor([[1.0, 2.0, 3.0, 4.0]]),  # none over
             torch.tensor([[big, 2.0, 3.0, 4.0]]),  # 1 of 4 over: 0.25, within the limit of 0.3
             torch.tensor([[big, big, 3.0, 4.0]]),  # 2 of 4: 0.5 breaks it (and is within twice the limit)
             torch.tensor([[1.0, 2.0, 3.0, 4.0]])]  # fmt: skip
    rule = CastRange("float16", "overflow", 0.3, trips=True)
    with tw.attach(model, modules=[""], capture=capture, rules=[rule], on_nonfinite="ignore") as watch:
        _serve(model, calls, watch)
    (path,) = tw.Incident.list(capture.directory)
    incident = tw.Incident.load(path)
    assert incident.call == 2 and incident.trigger.rule == "cast_overflow" and incident.meta["exact"]
    assert incident.stats[incident.trigger.module].overflow["float16"] == 2


def test_the_bundle_holds_what_the_model_received_even_when_the_caller_reuses_its_buffer(tmp_path, quiet):
    model = mlp(4).eval()
    served = threading.Event()

    def after_serving(tree):  # holds the writer until the loop below has refilled its buffer
        served.wait(30)
        return tree

    capture = tw.Capture(tmp_path / "inc", inputs=True, redact=after_serving)
    buffer = torch.empty(2, 4)  # a serving loop's staging buffer, refilled for every request
    with tw.attach(model, capture=capture, on_nonfinite="ignore"):
        for i in range(3):
            buffer.copy_(torch.full((2, 4), math.nan if i == 1 else float(i)))
            with torch.no_grad():
                model(buffer)
        served.set()
    incident = tw.Incident.load(tw.Incident.list(capture.directory)[0])
    assert incident.call == 1 and incident.args[0].isnan().all()


def test_flush_time_rules_capture_from_the_kept_calls_and_a_call_not_kept_is_counted(tmp_path, quiet):
    model = mlp(4).eval()

    def spike(interval):
        s = interval.stats.get("0")
        return [interval.alert("spike", "0", "absmax", s.absmax, 10.0, "spike")] if s and s.absmax > 10 else []

    spike.name = "spike"
    for keep, written in ((2, 1), (0, 0)):
        capture = tw.Capture(tmp_path / f"k{keep}", inputs=True, on=("spike",), keep=keep)
        with tw.attach(model, capture=capture, rules=[spike], flush_every=3) as watch:
            _serve(model, [torch.ones(1, 4), torch.ones(1, 4) * 1e4, torch.ones(1, 4)], watch)
            watch.flush()
            watch.engine.monitor("capture").close(10)
            assert watch.errors == ({} if keep else {capture_writer.MISSED: 1})
        paths = tw.Incident.list(capture.directory) if os.path.isdir(capture.directory) else []
        assert len(paths) == written
    incident = tw.Incident.load(tw.Incident.list(tmp_path / "k2")[0])
    assert incident.trigger.rule == "spike" and not incident.meta["exact"]  # the latest kept call of the interval
    assert incident.call == 2 and incident.meta["stats_scope"] == "call"


def test_device_path_twin_captures_from_the_ring_at_the_flush(tmp_path, quiet):
    model = mlp(4).eval()
    capture = tw.Capture(tmp_path / "inc", inputs=True, keep=4)
    batches = [torch.randn(2, 4) for _ in range(3)]
    batches[1][0, 0] = math.nan
    watch = device_watch(model, capture=capture, on_nonfinite="ignore")
    try:
        _serve(model, batches, watch)
        assert not os.path.isdir(capture.directory)  # nothing is known before the device is read
        watch.flush()
        watch.engine.monitor("capture").close(10)
    finally:
        watch.detach()
    incident = tw.Incident.load(tw.Incident.list(capture.directory)[0])
    assert (incident.call, incident.trace_id, incident.meta["exact"]) == (1, "req-1", True)
    assert incident.meta["stats_scope"] == "interval" and incident.stats["<input>"].nan == 1
    assert torch.equal(incident.args[0].nan_to_num(), batches[1].nan_to_num())


def test_watch_capture_by_trace_id_now_or_on_the_next_call(tmp_path, quiet):
    model = mlp(4).eval()
    capture = tw.Capture(tmp_path / "inc", inputs=True, keep=2)
    with tw.attach(model, capture=capture) as watch:
        _serve(model, [torch.randn(1, 4) for _ in range(3)], watch)
        assert watch.capture("req-2") is True  # kept: written now
        assert watch.capture("req-9") is False  # armed for the next call with that label
        with torch.no_grad(), watch.context(trace_id="req-9"):
            model(torch.randn(1, 4))
    incidents = [tw.Incident.load(p) for p in tw.Incident.list(capture.directory)]
    assert [(i.trace_id, i.trigger.rule) for i in incidents] == [("req-2", "capture"), ("req-9", "capture")]
    with tw.attach(model) as watch, pytest.raises(tw.ConfigError, match="capture=tw.Capture"):
        watch.capture("req-1")


def test_threads_each_capture_their_own_call(tmp_path, quiet):
    model = mlp(16).eval()
    capture = tw.Capture(tmp_path / "inc", inputs=True)
    inputs = {t: torch.randn(8, 16) for t in range(4)}
    for t, x in inputs.items():
        x[t, t] = math.nan
    with tw.attach(model, capture=capture, on_nonfinite="ignore") as watch:

        def serve(t):
            for i in range(20):
                x = inputs[t] if i == 10 else torch.randn(8, 16)
                with torch.no_grad(), watch.context(trace_id=f"t{t}-{i}"):
                    model(x)

        threads = [threading.Thread(target=serve, args=(t,)) for t in inputs]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    incidents = {tw.Incident.load(p).trace_id: tw.Incident.load(p) for p in tw.Incident.list(capture.directory)}
    assert sorted(incidents) == [f"t{t}-10" for t in inputs]
    for t, x in inputs.items():
        got = incidents[f"t{t}-10"]
        assert torch.equal(got.args[0].nan_to_num(), x.nan_to_num()) and got.stats["<input>"].nan == 1


def test_raise_mode_still_captures(tmp_path):
    model = mlp(4).eval()
    capture = tw.Capture(tmp_path / "inc", inputs=True)
    with tw.attach(model, capture=capture, on_nonfinite="raise"):
        with pytest.raises(tw.NonFiniteError), torch.no_grad():
            model(torch.full((1, 4), math.nan))
    assert len(tw.Incident.list(capture.directory)) == 1


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"directory": 3}, "directory"),
        ({"directory": "d", "redact": print}, "inputs=True"),
        ({"directory": "d", "keep": -1}, "keep"),
        ({"directory": "d", "on": "trip"}, "on"),
        ({"directory": "d", "max_per_hour": 0}, "max_per_hour"),
        ({"directory": "d", "manifest": 5}, "manifest"),
    ],
)
def test_bad_options_are_config_errors(options, match):
    with pytest.raises(tw.ConfigError, match=match):
        tw.Capture(**options)
    with pytest.raises(tw.ConfigError, match="capture"):
        tw.attach(mlp(2), capture="dir")


def test_a_compiled_graph_s_fault_is_counted_as_missed_not_lost(tmp_path):
    model = mlp(4).eval()
    capture = tw.Capture(tmp_path / "inc", inputs=True, keep=2)
    watch = tw.attach(model, capture=capture, on_nonfinite="ignore")
    compiled = torch.compile(model, backend="eager")  # dynamo traces the hooks; no inductor build
    try:
        with pytest.warns(tw.TorchwatchWarning, match="torch.compile'd graph"):
            for x in (torch.randn(2, 4), torch.full((2, 4), math.nan)):
                with torch.no_grad():
                    compiled(x)
            watch.flush()
        assert watch.errors == {capture_writer.MISSED: 1}
    finally:
        watch.detach()


def test_a_written_bundle_is_announced_where_the_alerts_go(tmp_path, quiet):
    model = mlp(4).eval()
    capture = tw.Capture(tmp_path / "inc", inputs=True)
    memory = tw.MemorySink()
    with tw.attach(model, capture=capture, sinks=[memory, tw.IncidentLog(tmp_path / "incidents.jsonl")],
                   on_nonfinite="ignore") as watch:  # fmt: skip
        with torch.no_grad(), watch.context(trace_id="req-9"):
            model(torch.full((1, 4), math.nan))
        watch.engine.monitor("capture").close(10)
        watch.flush()
        (path,) = tw.Incident.list(capture.directory)
        (announced,) = [a for a in watch.alerts if a.rule == capture_writer.CAPTURED]
    assert (announced.call, announced.trace_id, announced.stat) == (0, "req-9", "nonfinite")
    assert path in announced.message and "torchwatch replay" in announced.message
    assert any(a.rule == capture_writer.CAPTURED for r in memory.records for a in r.alerts)  # TensorBoard's text too
    logged = [i for i in tw.IncidentLog.read(tmp_path / "incidents.jsonl") if i["rule"] == capture_writer.CAPTURED]
    assert len(logged) == 1 and logged[0]["related"] == []  # a line of its own
    assert watch.errors == {}
