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
