"""The incident log survives a process killed mid-write: only whole lines, readable, appendable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import torchwatch as tw
from torchwatch.records import Record

WRITER = r"""
import sys, time
import torchwatch as tw
from torchwatch.records import Record
log = tw.IncidentLog(sys.argv[1])
i = 0
while True:
    alerts = tuple(tw.Alert("r", f"m{i}.{j}", "s", 1.0, 0.0, i, time.time(), None, None, "x" * 2000) for j in range(8))
    log.write(Record(step=i, time=time.time(), calls=1, sampled=1, stats={}, alerts=alerts))
    i += 1
    print(i, flush=True)
"""


def test_killed_writer_leaves_only_whole_lines_and_a_restart_continues(tmp_path):
    path = tmp_path / "incidents.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    for _ in range(20):  # let it write a few records, then kill it without warning
        proc.stdout.readline()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    before = tw.IncidentLog.read(path)
    assert len(before) >= 20 * 8 and len(before) % 8 == 0  # each flush's lines land together
    with open(path, "ab") as f:  # and a torn write, as a crash inside write() would leave
        f.write(b'{"format":"torchwatch.incident/1","step":99,"rule":"to')
    assert len(tw.IncidentLog.read(path)) == len(before)  # the reader skips the torn tail
    log = tw.IncidentLog(path)
    log.write(Record(step=1000, time=time.time(), calls=1, sampled=1, stats={},
                     alerts=(tw.Alert("after", "m", "s", 1.0, 0.0, 1000, 0.0, None, None, "restarted"),)))  # fmt: skip
    log.close()
    after = tw.IncidentLog.read(path)
    assert len(after) == len(before) + 1 and after[-1]["rule"] == "after" and after[-1]["step"] == 1000
    assert path.read_bytes().endswith(b"\n")


def test_reading_foreign_or_missing_files(tmp_path):
    with pytest.raises(tw.FormatError, match="incident log .*none.jsonl' does not exist"):
        tw.IncidentLog.read(tmp_path / "none.jsonl")
    (tmp_path / "other.jsonl").write_text('{"a": 1}\n')
    with pytest.raises(tw.FormatError, match="line 1 is not a torchwatch incident"):
        tw.IncidentLog.read(tmp_path / "other.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\n")
    with pytest.raises(tw.FormatError, match="line 1 is not UTF-8 text"):
        tw.IncidentLog.read(tmp_path / "bin.jsonl")


def test_unwritable_log_disables_the_sink_and_inference_goes_on(tmp_path, quiet):
    import torch

    blocker = tmp_path / "file"
    blocker.write_text("x")
    model = torch.nn.Linear(2, 2)
    with tw.attach(model, sinks=[tw.IncidentLog(blocker / "incidents.jsonl")], on_nonfinite=[].append) as watch:
        model(torch.tensor([[float("nan"), 0.0]]))
        watch.flush()
        assert model(torch.ones(1, 2)).shape == (1, 2)
    assert any(k.startswith("sink:") for k in watch.errors)
    assert os.path.isfile(blocker)


def _alert(rule: str, module: str, stat: str = "absmax", cohort: str | None = None) -> tw.Alert:
    return tw.Alert(rule, module, stat, 1.0, 0.0, 9, 0.0, cohort, None, f"{rule} on {module}")


def test_an_intervals_alerts_on_module_outputs_are_one_incident_led_by_the_first_module():
    from torchwatch import incidents

    order = ["<input>", "0", "1", "2"]
    alerts = [
        _alert("baseline_std", "2", "std"), _alert("cast_overflow", "1", "overflow.float16"),
        _alert("nonfinite", "2", "nan"), _alert("baseline_absmax", "1"), _alert("baseline_absmax", "<input>"),
        _alert("latency_slo", "", "latency.p99_ms"), _alert("baseline_std", "0", "std", cohort="eu"),
        _alert("output_shift", "<output>", "confidence"),
    ]  # fmt: skip
    found = incidents.group(alerts, order)
    leads = [(i.lead.rule, i.lead.module, i.lead.cohort) for i in found]
    # in the order their first alert came; the NaN origin, latency and the other cohort stand apart
    assert leads == [("baseline_absmax", "<input>", None), ("nonfinite", "2", None), ("latency_slo", "", None),
                     ("baseline_std", "0", "eu")]  # fmt: skip
    first = found[0]
    # related in execution order: the input's, then module 1's two (in arrival order), 2, the output
    assert [(a.module, a.rule) for a in first.related] == [
        ("1", "cast_overflow"),
        ("1", "baseline_absmax"),
        ("2", "baseline_std"),
        ("<output>", "output_shift"),
    ]
    assert "first of 5 alerts this interval on 3 later module(s): '1', '2', '<output>'" in first.summary()
    assert found[1].summary() == "nonfinite on 2"  # alone: its own message
    assert sum(1 + len(i.related) for i in found) == len(alerts)  # nothing dropped


def test_a_x255_input_is_one_incident_naming_the_input(tmp_path, quiet):
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8)).eval()
    path = tmp_path / "incidents.jsonl"
    everything = tw.rules.AlertPolicy(cooldown=0, max_per_minute=10_000)  # every alert reaches the log
    watch = tw.attach(model, flush_every=1, sinks=[tw.IncidentLog(path)], alert_policy=everything)
    with torch.no_grad():
        for _ in range(40):
            model(torch.randn(128, 64))
        for _ in range(3):
            model(torch.randn(128, 64) * 255)
        model[0].weight[0, 0] = float("nan")
        model(torch.randn(128, 64))
    watch.detach()
    logged = tw.IncidentLog.read(path)
    assert sum(1 + len(i["related"]) for i in logged) == len(watch.alerts)  # every alert on disk
    shifted = [i for i in logged if i["rule"] != "nonfinite"]
    assert shifted and all(i["module"] == "<input>" for i in shifted), [(i["rule"], i["module"]) for i in shifted]
    assert max(len(i["related"]) for i in shifted) >= 4  # the spread downstream is inside the incident
    assert "later module(s)" in shifted[0]["summary"]
    (nan,) = [i for i in logged if i["rule"] == "nonfinite"]
    assert nan["module"] == "0" and nan["related"] == []
