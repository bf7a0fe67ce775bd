"""Sinks: memory, JSONL, TensorBoard (read back by TensorBoard itself), failures, exit."""

from __future__ import annotations

import html
import json
import math
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
import urllib.parse
import urllib.request
import warnings

import pytest
import torch
from _models import Inject, mlp

import torchwatch as tw
from torchwatch import cli
from torchwatch.cli import report, report_tensorboard
from torchwatch.sinks._flagged import FLAGGED_STATS, MAX_FLAGGED, run_name
from torchwatch.sinks.tensorboard import layout


def _run(model, n: int, width: int = 16) -> None:
    for _ in range(n):
        model(torch.randn(2, width))


def test_memory_sink_gets_one_record_per_interval_and_a_last_one_on_detach():
    sink = tw.MemorySink()
    model = mlp()
    with tw.attach(model, sinks=[sink], flush_every=3):
        _run(model, 7)
    records = sink.records
    assert [(r.step, r.calls, r.sampled) for r in records] == [(3, 3, 3), (6, 3, 3), (7, 1, 1)]
    assert records[0].stats["0"].calls == 3 and records[2].stats["0"].calls == 1


def test_flush_waits_until_the_sinks_have_written():
    sink = tw.MemorySink()
    model = mlp()
    with tw.attach(model, sinks=[sink], flush_every=1000) as watch:
        _run(model, 2)
        watch.flush()
        assert len(sink.records) == 1 and sink.records[0].calls == 2
        watch.flush()  # nothing new: nothing is sent
        assert len(sink.records) == 1


def test_memory_sink_keeps_the_last_maxlen_records():
    sink = tw.MemorySink(maxlen=2)
    model = mlp()
    with tw.attach(model, sinks=[sink], flush_every=1000) as watch:
        for _ in range(5):
            _run(model, 1)
            watch.flush()  # one record per call (automatic flushes may merge when the writer is behind)
    assert [r.step for r in sink.records] == [4, 5]


def test_jsonl_lines_are_strict_json_with_nan_as_null(tmp_path):
    path = tmp_path / "logs" / "stats.jsonl"
    model = mlp(inject=Inject(at=(1,)))
    model[0].weight.data[0] = 0.0
    model[0].bias.data[0] = 0.0
    with tw.attach(model, sinks=[tw.JsonlSink(path)], flush_every=1, on_nonfinite="ignore"):
        _run(model, 2)
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    for line in lines:
        assert "NaN" not in line and "Infinity" not in line
    assert first["format"] == "torchwatch.jsonl/1"
    assert first["modules"]["0"]["zeros"] == 2  # the zeroed unit
    assert second["modules"]["1"]["nan"] == 2
    assert second["nonfinite"]["1"]["origin"] == "1"
    back = tw.ModuleStats.from_dict(second["modules"]["1"])
    assert back.nan == 2 and back.count == 32


def test_jsonl_appends_across_restarts(tmp_path):
    path = tmp_path / "s.jsonl"
    for _ in range(2):
        model = mlp()
        with tw.attach(model, sinks=[tw.JsonlSink(path)]):
            _run(model, 1)
    assert len(path.read_text().splitlines()) == 2


def test_a_line_torn_by_a_crash_is_cut_before_the_next_process_appends(tmp_path):
    path = tmp_path / "s.jsonl"
    model = mlp()
    with tw.attach(model, sinks=[tw.JsonlSink(path)]):
        _run(model, 1)
    whole = path.read_bytes()
    path.write_bytes(whole + whole[: len(whole) // 2])  # killed in the middle of its second record
    with tw.attach(model, sinks=[tw.JsonlSink(path)]):
        _run(model, 2)
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 3  # two whole records and the final newline
    assert [json.loads(line)["calls"] for line in lines[:-1]] == [1, 2]
    assert report.summarize(report.load(tmp_path))["calls"] == 3


@pytest.mark.parametrize("sink_type", [tw.JsonlSink, tw.IncidentLog])
def test_a_log_deleted_while_writing_is_started_again_with_a_warning(tmp_path, sink_type):
    import shutil

    logdir = tmp_path / "logs"
    path = logdir / "log.jsonl"
    model = mlp(inject=Inject(at=(0, 1)))
    policy = tw.rules.AlertPolicy(cooldown=0)  # the second NaN alert is written too
    with tw.attach(
        model, sinks=[sink_type(path)], on_nonfinite=[].append, alert_policy=policy, flush_every=1000
    ) as watch:
        _run(model, 1)
        watch.flush()
        assert path.exists()
        shutil.rmtree(logdir)  # a cleanup job removes the log directory under the running server
        _run(model, 1)
        with pytest.warns(tw.TorchwatchWarning, match="deleted or rotated away while it was being written"):
            watch.flush()
    assert len(path.read_text().splitlines()) >= 1  # the second interval, in a new file, not in an unlinked one
    assert watch.errors == {}


def _event_accumulator(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_events_read_back_with_tensorboards_own_reader(tmp_path):
    model = mlp(inject=Inject(at=(3,)))
    alerts = []
    with tw.attach(model, sinks=[tw.TensorBoardSink(tmp_path)], flush_every=2, on_nonfinite=alerts.append) as watch:
        _run(model, 4)
        snap = watch.snapshot()
    acc = _event_accumulator(tmp_path)
    tags = set(acc.Tags()["scalars"])
    for name in ("0", "1", "6"):
        for stat in ("mean", "std", "min", "max", "absmax", "nan", "posinf", "neginf", "zeros_frac", "subnormal_frac"):
            assert f"{name}/{stat}" in tags
        for dtype in tw.DEFAULT_CAST_DTYPES:
            assert f"{name}/underflow_frac_{dtype}" in tags and f"{name}/overflow_frac_{dtype}" in tags
    assert "torchwatch/alerts" in tags
    nan = acc.Scalars("1/nan")
    assert [(e.step, e.value) for e in nan] == [(2, 0.0), (4, 2.0)]
    assert acc.Scalars("torchwatch/alerts")[-1].value == 1.0  # the alert of call 3 (from the injector)
    # per rule, from the rule's first alert on; and the alert's text in the Text tab, with call and module
    assert [(e.step, e.value) for e in acc.Scalars("torchwatch/alerts/nonfinite")] == [(4, 1.0)]
    assert [(e.step, e.value) for e in acc.Scalars("torchwatch/alerts_total/nonfinite")] == [(4, 1.0)]
    (text,) = acc.Tensors("torchwatch/alerts/text_summary")
    table = text.tensor_proto.string_val[0].decode()
    (alert,) = alerts
    assert text.step == 4 and table.startswith(f"* **nonfinite** in `{alert.module}` at call {alert.call}")
    # the message, once Markdown's escapes and HTML's entities are undone
    assert html.unescape(table.replace("\\", "")).endswith(": " + alert.message.replace("\n", " "))
    mx = acc.Scalars("0/max")
    assert mx[-1].step == 4 and math.isclose(max(e.value for e in mx), snap["0"].max, rel_tol=1e-6)
    assert "custom_scalars__config__" in acc.Tags()["tensors"]


@pytest.mark.parametrize("prefix", ["", "r0/"])
def test_the_report_reads_every_alert_back_from_tensorboard_logs_alone(tmp_path, prefix):
    # the oracle: the alerts the sinks were given (a MemorySink beside the TensorBoard one)
    model = mlp(inject=Inject(at=(3,)))
    memory = tw.MemorySink()
    sinks = [tw.TensorBoardSink(tmp_path, prefix=prefix), memory]
    with tw.attach(model, sinks=sinks, flush_every=2, on_nonfinite=[].append) as watch:
        for i in range(6):
            with watch.context(trace_id=f"req-{i}"):
                _run(model, 1)
        odd = "x*y_z [a](b) #1 <b>&amp; `c` \\ end\nnext line"
        watch.publish(tw.Alert("my*rule_#1", "4", "absmax", 1.0, 0.0, -1, time.time(), None, None, odd))
        watch.flush()
    written = [a for r in memory.records for a in r.alerts]
    assert {a.rule for a in written} == {"nonfinite", "my*rule_#1"}
    read = report.load(tmp_path).alerts
    key = ("rule", "module", "stat", "value", "expected", "call", "time", "cohort", "trace_id", "message")
    expected = [{k: getattr(a, k) for k in key} for a in written]  # every field, the message's newline too
    assert sorted(({k: a[k] for k in key} for a in read), key=str) == sorted(expected, key=str)
    assert cli.main(["report", str(tmp_path)]) == 1  # alerts need attention: exit 1, as with JSONL logs


def test_a_tensorboard_log_alone_reports_what_the_same_runs_jsonl_does(tmp_path):
    # one watch, two sinks: the statistics JSONL is the oracle for what the TensorBoard log must tell
    model = mlp(inject=Inject(at=(0, 5)))  # call 0: the first interval, whose calls start at 0
    sinks = [tw.TensorBoardSink(tmp_path / "tb"), tw.JsonlSink(tmp_path / "js" / "stats.jsonl")]
    with tw.attach(model, sinks=sinks, flush_every=2, on_nonfinite=[].append, outputs=True) as watch:
        for i in range(8):
            with watch.context(trace_id=f"req-{i}"):
                _run(model, 1)
    tb, js = report.summarize(report.load(tmp_path / "tb")), report.summarize(report.load(tmp_path / "js"))
    keys = ("module", "nan", "posinf", "neginf", "first_step", "origin", "first_call", "first_trace")
    assert [{k: r[k] for k in keys} for r in tb["nonfinite"]] == [{k: r[k] for k in keys} for r in js["nonfinite"]]
    assert tb["nonfinite"][0]["first_trace"] == "req-0" and tb["nonfinite"][0]["first_call"] == 0

    def alerts(summary):
        return [{k: a[k] for k in ("rule", "module", "call", "trace_id", "message")} for a in summary["alerts"]]

    assert alerts(tb) == alerts(js)
    assert (tb["first_time"], tb["last_time"]) == (js["first_time"], js["last_time"])  # the records' own times
    # what the JSONL report summarises and TensorBoard's only charts is named, not left out silently
    summarised = {"latency": js["latency"], "output quality": js["outputs"], "inputs": js["inputs"]}
    assert set(tb["charted_only"]) == {k for k, v in summarised.items() if v} == set(summarised)
    assert js["charted_only"] == []
    assert "charted in TensorBoard, not summarised" in report.text(tb)


@pytest.mark.parametrize("payload", [b"not json", b'{"rule": "x"}', b'[{"rule": 3}]', b"[" * 100_000])
def test_an_alert_whose_record_cannot_be_read_is_still_counted(tmp_path, monkeypatch, payload):
    write_records = tw.TensorBoardSink._alert_records

    def corrupt(self, record):
        summary = write_records(self, record)
        summary.value[0].tensor.string_val[0] = payload
        return summary

    monkeypatch.setattr(tw.TensorBoardSink, "_alert_records", corrupt)
    model = mlp(inject=Inject(at=(1,)))
    with tw.attach(model, sinks=[tw.TensorBoardSink(tmp_path)], flush_every=2, on_nonfinite=[].append):
        _run(model, 2)
    data = report.load(tmp_path)
    (alert,) = data.alerts  # from the per-rule count, without its details
    assert alert["rule"] == "nonfinite" and alert["message"] == "(alert details not in the log)"
    assert any("step 2 alerts" in s for s in data.skipped)  # and the unreadable record is named


def test_alert_counts_that_are_not_counts_are_bounded(tmp_path):
    # a corrupt or hostile event file: NaN, negative and huge alert counts never raise or blow up
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    writer = EventFileWriter(str(tmp_path))
    for step, value in enumerate([math.nan, -3.0, 1e30, 2.0], start=1):
        values = [summary_pb2.Summary.Value(tag=t, simple_value=v) for t, v in
                  [("0/absmax", 1.0), ("torchwatch/alerts/x", value), ("drift/0/alarms", value)]]  # fmt: skip
        writer.add_event(event_pb2.Event(wall_time=float(step), step=step, summary=summary_pb2.Summary(value=values)))
    writer.close()
    counts = [a["call"] for a in report.load(tmp_path).alerts]
    assert (
        counts.count(2) == report_tensorboard.MAX_ALERTS_PER_INTERVAL
        and counts.count(3) == 2
        and len(counts) == 100_002
    )


def test_root_output_is_tagged_root(tmp_path):
    model = torch.nn.Linear(3, 3)
    with tw.attach(model, sinks=[tw.TensorBoardSink(tmp_path)]):
        model(torch.randn(1, 3))
    assert "<root>/mean" in _event_accumulator(tmp_path).Tags()["scalars"]


def test_baselines_still_learning_are_charted(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh())
    sink = tw.MemorySink()
    with tw.attach(model, sinks=[tw.TensorBoardSink(tmp_path), sink], flush_every=1):
        for _ in range(3):
            model(torch.randn(128, 64))  # 8,192 elements an interval: every output charted
    learning = [e.value for e in _event_accumulator(tmp_path).Scalars("torchwatch/baselines_learning")]
    assert learning == [r.baselines.learning for r in sink.records] and learning[0] >= 6


def test_layout_opens_on_what_changed_then_nonfinite_and_casts():
    lay = layout(["float16"])
    assert list(lay)[:3] == ["torchwatch: what changed", "torchwatch: NaN / Inf", "torchwatch: fp16 / bf16 / fp8 casts"]
    assert {"torchwatch: inputs", "torchwatch: outputs", "torchwatch: latency", "torchwatch: embedding drift"} <= set(
        lay
    )
    # every chart's pattern matches a tag the sink writes (with or without a prefix)
    written = ["torchwatch/alerts_total/drift", "flagged/log10-abs-max", "flagged/NaN+Inf",
               "flagged/zero-fraction", "drift/4/score", "torchwatch/latency_p99_ms", "0/nan", "0/posinf",
               "0/neginf", "0/underflow_frac_float16", "0/overflow_frac_float16", "inputs/<input>/channel_mean_3",
               "inputs/<input>.input_ids/top1_fraction", "inputs/<input>.input_ids/distinct", "<input>/absmax",
               "outputs/confidence", "outputs/abstention_rate", "outputs/ece", "torchwatch/latency_p50_ms",
               "0/zeros_frac", "0/absmax", "drift/4/p_value", "drift/4/alarms"]  # fmt: skip
    for category in lay.values():
        for title, (_, patterns) in category.items():
            assert any(re.fullmatch(p, tag) or re.fullmatch(p, "r0/" + tag) for p in patterns for tag in written), title
    assert lay["torchwatch: fp16 / bf16 / fp8 casts"]["would underflow in float16 (fraction)"] == [
        "Multiline", [r".*/underflow_frac_float16$"]
    ]  # fmt: skip


def test_flagged_tags_are_drawn_only_by_the_alerted_modules_charts():
    # each flagged tag (with or without a prefix) in exactly one chart, and no main-run tag in those
    lay = layout(["float16"])
    flagged_charts = {title for title in lay["torchwatch: what changed"] if title.startswith("alerted modules")}
    assert len(flagged_charts) == len(FLAGGED_STATS)
    main_tags = ["0/absmax", "0/nan", "0/zeros_frac", "<root>/absmax", "torchwatch/alerts/nonfinite"]
    for leaf, _, _ in FLAGGED_STATS:
        for tag in (f"flagged/{leaf}", f"r0/flagged/{leaf}"):
            hits = [t for c in lay.values() for t, (_, ps) in c.items() if any(re.fullmatch(p, tag) for p in ps)]
            assert len(hits) == 1 and hits[0] in flagged_charts, (tag, hits)
    for title in flagged_charts:
        (pattern,) = lay["torchwatch: what changed"][title][1]
        assert not any(re.fullmatch(pattern, t) for t in main_tags), title


def test_an_alerted_module_gets_a_run_of_its_own_starting_with_its_baseline(tmp_path):
    model = mlp(inject=Inject(at=(5,)))  # NaN from module "1" on call 5: flushed at step 6
    sink = tw.TensorBoardSink(tmp_path)
    with tw.attach(model, sinks=[sink], flush_every=2, on_nonfinite=[].append) as watch:
        _run(model, 10)
    flagged = sink.flagged  # kept after detach
    (alert,) = watch.alerts
    assert flagged == {alert.module: str(tmp_path / "flagged" / alert.module)}
    main, own = _event_accumulator(tmp_path), _event_accumulator(flagged[alert.module])
    assert set(own.Tags()["scalars"]) == {f"flagged/{leaf}" for leaf, _, _ in FLAGGED_STATS}
    name = alert.module

    def series(acc, tag):
        return [(e.step, e.value) for e in acc.Scalars(tag)]

    # the same numbers as the main run's tags for that module, from the first step on (its baseline)
    assert [step for step, _ in series(own, "flagged/log10-abs-max")] == [2, 4, 6, 8, 10]
    # both are float32 in the event file: log10 of the float32 abs-max, to float32's rounding
    decades = [(step, math.log10(v)) for step, v in series(main, f"{name}/absmax")]
    assert all(
        s == t and math.isclose(v, w, rel_tol=2**-23, abs_tol=2**-23 * 40)
        for (s, v), (t, w) in zip(series(own, "flagged/log10-abs-max"), decades, strict=True)
    )
    assert series(own, "flagged/zero-fraction") == series(main, f"{name}/zeros_frac")
    counts = ([e.value for e in main.Scalars(f"{name}/{t}")] for t in ("nan", "posinf", "neginf"))
    bad = [sum(v) for v in zip(*counts, strict=True)]
    assert [v for _, v in series(own, "flagged/NaN+Inf")] == bad and bad[2] > 0
    # no other module was alerted, so no other run; the report reads modules from the main run only
    assert os.listdir(tmp_path / "flagged") == [name]
    assert set(report.load(tmp_path).modules) == {k.removesuffix("/absmax") for k in main.Tags()["scalars"]
                                                  if k.endswith("/absmax")}  # fmt: skip


def test_only_the_first_modules_alerted_get_runs_the_rest_are_warned_once(tmp_path):
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(MAX_FLAGGED + 2)])
    sink = tw.TensorBoardSink(tmp_path, prefix="r0/")
    with tw.attach(model, sinks=[sink], flush_every=1000) as watch, warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model(torch.randn(1, 4))
        for i in range(MAX_FLAGGED + 2):
            watch.publish(tw.Alert("mine", str(i), "absmax", 1.0, 0.0, 0, time.time(), None, None, "odd"))
        # "" with a statistic that is not a module's: an alert about no module, so no run for the root
        watch.publish(tw.Alert("queue", "", "depth", 9.0, 1.0, -1, time.time(), None, None, "deep queue"))
        watch.flush()
    flagged = sink.flagged
    assert list(flagged) == [str(i) for i in range(MAX_FLAGGED)]
    assert sorted(os.listdir(tmp_path / "flagged")) == sorted(f"r0_{i}" for i in range(MAX_FLAGGED))
    too_many = [w for w in seen if "modules alerted" in str(w.message)]
    assert len(too_many) == 1 and f"more than {MAX_FLAGGED}" in str(too_many[0].message)
    # every module is still in the main run
    tags = set(_event_accumulator(tmp_path).Tags()["scalars"])
    assert {f"r0/{i}/absmax" for i in range(MAX_FLAGGED + 2)} <= tags
    assert {"r0/flagged/log10-abs-max"} == {t for t in _event_accumulator(flagged["0"]).Tags()["scalars"] if "abs" in t}


def test_flagged_runs_go_to_the_most_severe_alerts_not_the_first(tmp_path):
    """A fault that fans out raises many alerts before the one that matters is published: the
    NaN origin and a cast overflow get runs although eight modules were alerted before them, in
    the same interval and in a later one (where the least severe run gives its place up)."""
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(MAX_FLAGGED + 4)])
    sink = tw.TensorBoardSink(tmp_path)

    def alert(rule: str, module: int) -> tw.Alert:
        return tw.Alert(rule, str(module), "absmax", 1.0, 0.0, 0, time.time(), None, None, rule)

    with tw.attach(model, sinks=[sink], flush_every=1000) as watch, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(torch.randn(1, 4))
        for i in range(MAX_FLAGGED + 1):
            watch.publish(alert("baseline_absmax", i))
        watch.publish(alert("nonfinite", MAX_FLAGGED + 1))  # the same interval, published last
        watch.flush()
        assert str(MAX_FLAGGED + 1) in sink.flagged and str(MAX_FLAGGED) not in sink.flagged
        model(torch.randn(1, 4))
        watch.publish(alert("cast_overflow", MAX_FLAGGED + 2))  # a later interval, all runs taken
        watch.publish(alert("baseline_std", MAX_FLAGGED + 3))  # not more severe: no run
        watch.flush()
    flagged = sink.flagged
    assert str(MAX_FLAGGED + 2) in flagged and str(MAX_FLAGGED + 3) not in flagged
    # the NaN origin took one of the eight; modules 0-6 got the rest, and module 0's run (the least
    # severe, first in execution order) gave its place up: it keeps what it wrote
    assert sorted(int(m) for m in flagged if int(m) < MAX_FLAGGED) == list(range(MAX_FLAGGED - 1))
    assert os.listdir(flagged["0"])


def test_a_run_that_cannot_be_created_leaves_the_main_run_writing(tmp_path):
    (tmp_path / "flagged").write_text("a file where the runs' directory would go")
    model = mlp(inject=Inject(at=(1, 5)))
    sink = tw.TensorBoardSink(tmp_path)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with tw.attach(model, sinks=[sink], flush_every=2, on_nonfinite=[].append) as watch:
            _run(model, 8)
    assert sink.flagged == {} and watch.errors == {}  # the sink was not disabled
    assert [e.step for e in _event_accumulator(tmp_path).Scalars("1/nan")] == [2, 4, 6, 8]
    assert sum("cannot write a run for the alerted module" in str(w.message) for w in seen) == 1


@pytest.mark.parametrize(
    ("label", "expected"),
    [("<root>", "root"), ("<input>.input_ids", "input.input_ids"), ("enc/layer.0", "enc_layer.0"),
     ("blocks[1]", "blocks[1]"), ("..", "_.."), ("r0/x y", "r0_x_y")],
)  # fmt: skip
def test_flagged_run_names_are_one_safe_directory(label, expected):
    assert run_name(label) == expected


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback URL we built
        return json.loads(response.read())


def test_a_real_tensorboard_server_serves_the_torchwatch_tags(tmp_path):
    run_dir = tmp_path / "serve"
    model = mlp(inject=Inject(at=(3,)))  # a NaN alert names module "1": it gets a run of its own
    with tw.attach(model, sinks=[tw.TensorBoardSink(run_dir)], flush_every=2, on_nonfinite=[].append):
        _run(model, 4)
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        tags: dict = {}
        while time.monotonic() < deadline:
            try:
                tags = _get_json(f"{base}/data/plugin/scalars/tags")
                if tags.get("serve") and tags.get("serve/flagged/1"):  # one reload may not hold every run
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert "0/mean" in tags["serve"] and "5/nan" in tags["serve"]
        values = _get_json(f"{base}/data/plugin/scalars/scalars?run=serve&tag=0/nan")
        assert [row[1] for row in values] == [2, 4]  # [wall_time, step, value] rows
        lay = _get_json(f"{base}/data/plugin/custom_scalars/layout")
        assert lay["category"][0]["title"] == "torchwatch: what changed"
        # the alerted module's own run, matched by the layout's "alerted modules" chart pattern
        assert "serve/flagged/1" in _get_json(f"{base}/data/runs")
        (chart,) = [c for c in lay["category"][0]["chart"] if c["title"].startswith("alerted modules: abs-max")]
        query = urllib.parse.urlencode({"run": "serve/flagged/1", "tag": chart["multiline"]["tag"][0]})
        found = _get_json(f"{base}/data/plugin/custom_scalars/scalars?{query}")
        assert found["regex_valid"] and [row[1] for row in found["tag_to_events"]["flagged/log10-abs-max"]] == [2, 4]
    finally:
        server.terminate()
        server.wait(timeout=30)


class Exploding(tw.Sink):
    def __init__(self) -> None:
        self.calls = 0

    def write(self, record):
        self.calls += 1
        raise OSError(28, "No space left on device")

    def __repr__(self) -> str:
        return "Exploding()"


def test_a_failing_sink_is_reported_once_and_disabled_while_the_others_go_on():
    bad, good = Exploding(), tw.MemorySink()
    model = mlp()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with tw.attach(model, sinks=[bad, good], flush_every=1) as watch:
            _run(model, 4)
            watch.flush()
            errors = watch.errors
    assert bad.calls == 1
    assert sum(r.calls for r in good.records) == 4  # every call, in 4 records or fewer merged ones
    assert errors == {"sink:Exploding()": 1}
    messages = [str(w.message) for w in caught if issubclass(w.category, tw.TorchwatchWarning)]
    assert messages == [
        "torchwatch: Exploding() failed with OSError(28, 'No space left on device') and is disabled; inference and "
        "the other sinks go on. Fix the destination (permissions, free space) and attach again to re-enable it."
    ]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_disables_the_jsonl_sink_without_touching_inference():
    model = mlp()
    x = torch.randn(2, 16)
    want = model(x)
    with pytest.warns(tw.TorchwatchWarning, match=r"JsonlSink\('/dev/full'\) failed with OSError\(28"), tw.attach(
        model, sinks=[tw.JsonlSink("/dev/full")], flush_every=1
    ) as watch:  # fmt: skip
        assert torch.equal(model(x), want)
        watch.flush()
        assert torch.equal(model(x), want)


def test_an_unwritable_log_directory_disables_the_tensorboard_sink(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    model = mlp()
    with pytest.warns(tw.TorchwatchWarning, match="TensorBoardSink.* failed with (NotADirectoryError|FileExistsError)"):
        with tw.attach(model, sinks=[tw.TensorBoardSink(blocker / "logs")], flush_every=1) as watch:
            _run(model, 2)
            watch.flush()
            assert list(watch.errors) == [f"sink:TensorBoardSink({str(blocker / 'logs')!r})"]


def test_statistics_are_flushed_at_interpreter_exit(tmp_path):
    path = tmp_path / "exit.jsonl"
    script = textwrap.dedent(
        f"""
        import torch, torchwatch as tw
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
        watch = tw.attach(model, sinks=[tw.JsonlSink({str(path)!r}), tw.TensorBoardSink({str(tmp_path / "tb")!r})])
        for _ in range(3):
            model(torch.randn(2, 4))
        # no detach, no flush: the exit handler must write the 3 calls
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    record = json.loads(path.read_text().splitlines()[-1])
    assert record["calls"] == 3 and record["modules"]["0"]["calls"] == 3
    assert _event_accumulator(tmp_path / "tb").Scalars("1/mean")[-1].step == 3


def test_tensorboard_sink_needs_tensorboard(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(
        ImportError,
        match=r"TensorBoardSink needs the tensorboard package: pip install 'torchwatch-monitor\[tensorboard\]'",
    ):
        tw.TensorBoardSink("runs")


def test_tensorboard_carries_input_output_and_timing_scalars(tmp_path):
    model = torch.nn.Sequential(torch.nn.Embedding(50, 4), torch.nn.Flatten(), torch.nn.Linear(12, 3))
    with tw.attach(model, sinks=[tw.TensorBoardSink(tmp_path)], outputs=True, timing=True, flush_every=4) as watch:
        for i in range(8):
            with watch.context(trace_id=str(i)), torch.no_grad():
                y = model(torch.randint(0, 50, (2, 3)))
            watch.record_labels(str(i), y.argmax(-1))
        watch.flush()
        snap = watch.snapshot()
    acc = _event_accumulator(tmp_path)
    tags = set(acc.Tags()["scalars"])
    assert {"inputs/<input>/top1_fraction", "outputs/confidence", "outputs/accuracy", "timing/2/p50_ms"} <= tags
    assert [e.value for e in acc.Scalars("outputs/accuracy")][-1] == 1.0
    confidence = acc.Scalars("outputs/confidence")
    assert len(confidence) == 2 and all(0 < e.value <= 1 for e in confidence)
    assert snap.outputs.rows == 16
