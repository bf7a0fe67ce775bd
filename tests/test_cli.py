"""The command line: exit codes and the demo."""

from __future__ import annotations

import io
import json
import subprocess
import sys

from torchwatch import cli, demo


def test_demo_catches_its_silent_failure_and_names_the_origin(tmp_path):
    out = io.StringIO()
    outcome = demo.run(requests=40, logdir=str(tmp_path), out=out)
    text = out.getvalue()
    assert outcome.caught
    assert (outcome.origin, outcome.first_call, outcome.first_trace) == ("0", 20, "req-00020")
    assert outcome.accuracy["before"] > 0.9 > outcome.accuracy["after"]
    assert "origin    module '0' (Standardize) produced the first Inf/NaN" in text
    assert f"tensorboard --logdir {tmp_path / 'tensorboard'}" in text
    records = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    firsts = [r["nonfinite"] for r in records if r["nonfinite"]]
    assert len(firsts) == 1  # each position's first NaN/Inf is reported once, in its interval
    assert (firsts[0]["0"]["origin"], firsts[0]["0"]["call"]) == ("0", 20)
    assert sum(r["calls"] for r in records) == 40


def test_cli_exit_codes(tmp_path, capsys):
    assert cli.main(["demo", "--requests", "20", "--logdir", str(tmp_path)]) == 0
    assert cli.main([]) == 2
    assert "usage: torchwatch" in capsys.readouterr().err
    assert cli.main(["demo", "--requests", "0"]) == 2
    assert "argument --requests: must be a positive integer, got 0" in capsys.readouterr().err
    assert cli.main(["frobnicate"]) == 2
    assert cli.main(["--help"]) == 0


def test_python_dash_m_runs_the_same_cli():
    result = subprocess.run([sys.executable, "-m", "torchwatch"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "demo" in result.stderr
