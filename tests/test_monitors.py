"""The Monitor protocol: a monitor written outside torchwatch plugs in with one line, and its
values reach snapshots, records, JSON logs and rules the way the built-in ones do."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest
import torch

import torchwatch as tw

ROOT = pathlib.Path(__file__).parents[1]


def _example():
    spec = importlib.util.spec_from_file_location("dead_rows_monitor", ROOT / "examples" / "dead_rows_monitor.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DeadRows


DeadRows = _example()


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


def _oracle(model: torch.nn.Module, batches: list[torch.Tensor]) -> dict[str, dict[str, int]]:
    """Zero rows per module from plain forward hooks on a copy of nothing but the same model."""
    counts: dict[str, dict[str, int]] = {}

    def hook(name):
        def fn(module, args, out):
            rows = out.reshape(-1, out.shape[-1])
            c = counts.setdefault(name, {"rows": 0, "zero": 0})
            c["rows"] += rows.shape[0]
            c["zero"] += int((rows == 0).all(dim=1).sum())

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_children()]
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in handles:
        h.remove()
    return counts


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(8, 6, generator=g) for _ in range(6)]
    xs[2][:4] = -50.0  # rows that die in the ReLU
    return xs


def test_a_monitor_from_one_file_reaches_snapshots_records_logs_and_rules(tmp_path):
    model, batches = _model(), _batches()
    want = _oracle(model, batches)
    assert want["1"]["zero"] > 0  # the oracle sees dead rows: the comparison below can fail
    seen_by_rules = []
    sink = tw.MemorySink()
    path = tmp_path / "stats.jsonl"
    with tw.attach(model, monitors=[DeadRows()], sinks=[sink, tw.JsonlSink(path)], flush_every=2,
                   rules=[lambda interval: seen_by_rules.append(interval.extra.get("dead_rows")) or ()]) as watch:  # fmt: skip
        with torch.no_grad():
            for x in batches:
                model(x)
        assert watch.snapshot().extra["dead_rows"] == want
    per_record = [r.extra["dead_rows"] for r in sink.records]
    assert (
        len(per_record) == 3 and DeadRows().merge(DeadRows().merge(per_record[0], per_record[1]), per_record[2]) == want
    )
    assert seen_by_rules == per_record  # the rules saw each interval's value
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [tw.Record.from_json(line).extra["dead_rows"] for line in lines] == per_record


def test_a_monitors_numbers_reach_tensorboard_under_extra(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, batches = _model(), _batches()
    sink = tw.MemorySink()
    with tw.attach(model, monitors=[DeadRows(["1"])], sinks=[sink, tw.TensorBoardSink(tmp_path)], flush_every=3):
        with torch.no_grad():
            for x in batches:
                model(x)
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    got = {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"] if tag.startswith("extra/")}
    want = [r.extra["dead_rows"]["1"] for r in sink.records]
    assert got == {
        "extra/dead_rows/1/rows": [w["rows"] for w in want],
        "extra/dead_rows/1/zero": [w["zero"] for w in want],
    }


def test_a_monitor_resets_with_the_watch_and_is_left_out_of_cohort_snapshots():
    model, batches = _model(), _batches()
    with tw.attach(model, monitors=[DeadRows(["1"])]) as watch, torch.no_grad():
        model(batches[2])
        assert watch.snapshot().extra["dead_rows"] == {"1": _oracle(model, batches[2:3])["1"]}
        assert watch.snapshot(cohort="eu").extra == {}
        watch.reset()
        assert watch.snapshot().extra["dead_rows"] == {"1": {"rows": 0, "zero": 0}}
        model(batches[0])
        assert watch.snapshot().extra["dead_rows"]["1"] == _oracle(model, batches[:1])["1"]
    assert watch.engine.monitor("dead_rows").name == "dead_rows"


class Broken(tw.Monitor):
    name = "broken"
    error_key = "broken monitor"

    def after_call(self, call, output):
        raise RuntimeError("monitor bug")


def test_a_failing_monitor_never_breaks_inference_and_is_counted():
    model, x = _model(), torch.randn(4, 6)
    want = model(x)
    with tw.attach(model, monitors=[Broken()]) as watch:
        with pytest.warns(tw.TorchwatchWarning, match="the torchwatch hook of 'broken monitor' failed"):
            got = model(x)
        assert torch.equal(got, want)
        model(x)
        assert watch.errors["broken monitor"] == 2
        assert watch.snapshot()["2"].count == 2 * 4 * 3  # the statistics went on


@pytest.mark.parametrize(
    ("monitors", "match"),
    [
        ([object()], "is not a monitor"),
        ([Broken(), Broken()], "share a name"),
        ([type("Latency", (tw.Monitor,), {"name": "latency"})()], "other than the built-in names"),
        ([type("Old", (tw.Monitor,), {"name": "old", "publish": lambda self, v: v})()], "rename it view"),
        (Broken(), "must be a list"),
    ],
)
def test_bad_monitors_are_refused_at_attach(monitors, match):
    with pytest.raises(tw.ConfigError, match=match):
        tw.attach(_model(), monitors=monitors)


@pytest.mark.parametrize("sampling", ["python", "device"])
def test_on_output_callbacks_run_on_sampled_calls_only(sampling):
    """``binding.on_output`` is gated by the engine: with every=2 only calls 0, 2, 4 are counted,
    whether the hooks come and go with the sampled calls (python) or stay installed (device)."""
    model, batches = _model(), _batches()
    with tw.attach(model, monitors=[DeadRows(["1"])], every=2, sampling=sampling, rules=[]) as watch:
        with torch.no_grad():
            for x in batches:
                model(x)
        got = watch.snapshot().extra["dead_rows"]
    assert got == {"1": _oracle(model, batches[0::2])["1"]}


def test_an_unregistered_monitors_numbers_reach_prometheus():
    pytest.importorskip("prometheus_client")
    import urllib.request

    model, batches = _model(), _batches()
    sink = tw.PrometheusSink(port=0, model_name="dead-rows")
    with tw.attach(model, monitors=[DeadRows(["1"])], sinks=[sink], rules=[], flush_every=100) as watch:
        with torch.no_grad():
            for x in batches:
                model(x)
        watch.flush()
        body = urllib.request.urlopen(f"http://127.0.0.1:{sink.port}/metrics").read().decode()
    want = _oracle(model, batches)["1"]
    assert f'torchwatch_extra{{key="1/zero",model="dead-rows",monitor="dead_rows"}} {float(want["zero"])}' in body
    assert f'torchwatch_extra{{key="1/rows",model="dead-rows",monitor="dead_rows"}} {float(want["rows"])}' in body


class PerCall(tw.Monitor):
    """A monitor whose exported series would grow a label value per call: the sink bounds it."""

    name = "per_call"

    def __init__(self):
        self.calls = []

    def after_call(self, call, output):
        self.calls.append(call.index)

    def take(self, *, keep):
        calls = list(self.calls)
        if not keep:
            self.calls.clear()
        return calls or None


def _per_call_export(value, record):
    for index in value:
        yield tw.values.Series("torchwatch_test_per_call", "gauge", "One series per call (unbounded).", 1.0,
                               (("call", str(index)),))  # fmt: skip


def test_prometheus_bounds_the_label_sets_of_an_exported_family(monkeypatch):
    pytest.importorskip("prometheus_client")
    from torchwatch.sinks import prometheus

    monkeypatch.setattr(prometheus, "MAX_SERIES", 5)
    tw.values.register("per_call", export=_per_call_export)
    registry = __import__("prometheus_client").CollectorRegistry()
    sink = tw.PrometheusSink(registry=registry, model_name="bounded")
    model = _model()
    with tw.attach(model, monitors=[PerCall()], sinks=[sink], rules=[], flush_every=100) as watch:
        for _ in range(8):
            model(torch.randn(2, 6))
        watch.flush()
        get = registry.get_sample_value  # read while attached: detaching removes the model's series
        kept = [i for i in range(8) if get("torchwatch_test_per_call", {"model": "bounded", "call": str(i)}) == 1.0]
        dropped = get("torchwatch_series_dropped_total", {"model": "bounded", "metric": "torchwatch_test_per_call"})
    assert kept == [0, 1, 2, 3, 4]  # the first five label sets, then dropped, and counted
    assert dropped == 3.0
