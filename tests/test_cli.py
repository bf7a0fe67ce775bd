"""The command line: exit codes and the demo."""

from __future__ import annotations

import io
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

import torchwatch as tw
from torchwatch import cli
from torchwatch.cli import demo

# The demo tests share one idle run (a run takes ~40 s on 2 cores) and one xdist worker
# (`make test` distributes by group), so the run is made once.
DEMO = pytest.mark.xdist_group("demo")


@pytest.fixture(scope="module")
def idle_demo(tmp_path_factory) -> tuple[pathlib.Path, demo.Outcome, str]:
    """One seeded demo run on an idle machine: its log directory, its outcome, what it printed.
    Tests read it and never write into it."""
    root = tmp_path_factory.mktemp("demo")
    out = io.StringIO()
    return root, demo.run(logdir=str(root), out=out), out.getvalue()


@DEMO
def test_demo_catches_every_phase_and_leaves_logs_the_report_reads(idle_demo, tmp_path, capsys):
    logs, outcome, text = idle_demo
    run_dir = pathlib.Path(outcome.logdir)
    assert run_dir.parent == logs and run_dir.name.startswith("run-")  # each run in its own directory
    assert outcome.caught, text
    assert outcome.startup_refused and outcome.startup_passed
    assert "replica B refused: 10 with different bytes" in text
    for phase, (rule, module) in demo.EXPECTED.items():
        caught = outcome.first(phase, rule, module)
        assert caught is not None and caught.request <= 32, (phase, rule)  # within 32 requests
    assert not [c for c in outcome.timeline if c.phase == "clean"]  # no false alarm on clean traffic
    assert outcome.accuracy["clean"] > 0.95
    assert outcome.fallback_answers["fp16 overflow"] > 0  # the breaker answered while unhealthy
    assert "Every failure was caught" in text and f"tensorboard --logdir {run_dir / 'tensorboard'}" in text
    incidents = tw.IncidentLog.read(run_dir / "incidents.jsonl")
    assert {"fingerprint", "drift", "cast_overflow", "baseline_absmax"} <= {i["rule"] for i in incidents}
    assert cli.main(["report", str(logs)]) == 1  # the logs hold alerts
    report = capsys.readouterr().out
    assert "Worst cast overflow:" in report and "fingerprint" in report and "alarm(s), first at call" in report
    assert cli.main(["report", str(logs), "--json", "--html", str(tmp_path / "r.html")]) == 1
    summary = json.loads(capsys.readouterr().out)
    assert summary["problems"] and summary["drift"][0]["module"] == "4" and summary["drift"][0]["alarms"] >= 1
    assert {"fingerprint", "drift", "cast_overflow"} <= {a["rule"] for a in summary["alerts"]}
    page = (tmp_path / "r.html").read_text()
    assert page.startswith("<!doctype html>") and page.count("<svg") >= 3
    # each phase's start (the root calls before it) is in the run marker and marked on the page
    phases = summary["phases"]
    assert [p["name"] for p in phases] == list(demo.PHASES) and phases[0]["call"] == 0
    starts = {p["name"]: p["call"] for p in phases}
    assert all(a <= b for a, b in zip(starts.values(), list(starts.values())[1:], strict=False))
    for c in outcome.timeline:  # every catch lies at or after its phase's start (an interval's alert: its last call)
        assert c.alert.call < 0 or c.alert.call >= starts[c.phase] - 1, (c.phase, c.alert)
    assert page.count("<title>phase: ") == len(demo.PHASES) * page.count("<svg")


def _timeline(outcome: demo.Outcome) -> tuple:
    return (
        [(c.phase, c.request, c.alert.rule, c.alert.module) for c in outcome.timeline],
        outcome.fallback_answers,
        outcome.accuracy,
    )


@DEMO
def test_demo_is_the_same_on_a_busy_machine(idle_demo, tmp_path):
    """What the demo catches, when, and what the breaker answers do not depend on thread timing:
    a second run while other processes keep every core busy gives the same timeline."""
    _, first, _ = idle_demo
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(max(2, os.cpu_count() or 2))]
    try:
        busy = demo.run(logdir=str(tmp_path / "busy"), out=io.StringIO())
    finally:
        for p in burners:
            p.kill()
            p.wait()
    assert _timeline(busy) == _timeline(first)


@DEMO
def test_demo_runs_never_mix_and_report_reads_the_latest(idle_demo, tmp_path, capsys):
    """A second run writes beside the first; the report of the directory reads the latest run and
    says so, and --all-runs merges them (twice the calls)."""
    _, first, _ = idle_demo
    first_dir = shutil.copytree(first.logdir, tmp_path / pathlib.Path(first.logdir).name)
    second = demo.run(logdir=str(tmp_path), out=io.StringIO())
    assert str(first_dir) != second.logdir and _timeline(first) == _timeline(second)  # seeded: the same catches
    assert cli.main(["report", str(tmp_path), "--json"]) == 1
    latest = json.loads(capsys.readouterr().out)
    assert latest["runs"] == {"count": 2, "reading": second.logdir, "all": False}
    assert latest["logdir"] == second.logdir
    assert cli.main(["report", str(tmp_path)]) == 1
    assert "the latest of 2 runs in this directory" in capsys.readouterr().out
    assert cli.main(["report", str(tmp_path), "--all-runs", "--json"]) == 1
    merged = json.loads(capsys.readouterr().out)
    assert merged["calls"] == 2 * latest["calls"] and merged["runs"]["all"]
    assert cli.main(["report", str(first_dir), "--json"]) == 1  # one run's own directory: just that run
    assert json.loads(capsys.readouterr().out)["runs"] is None


def test_cli_exit_codes(tmp_path, capsys):
    # the fewest requests the demo takes: every phase still caught (exit code 0)
    assert cli.main(["demo", "--logdir", str(tmp_path), "--requests", str(demo.MIN_REQUESTS)]) == 0
    assert cli.main([]) == 2
    assert "usage: torchwatch" in capsys.readouterr().err
    assert cli.main(["demo", "--requests", "0"]) == 2
    assert "argument --requests: must be a positive integer, got 0" in capsys.readouterr().err
    assert cli.main(["demo", "--requests", "5"]) == 2  # too few to learn the baselines: refused, with the minimum
    assert f"needs at least {demo.MIN_REQUESTS} requests per phase, got 5" in capsys.readouterr().err
    warmups = {getattr(rule, "warmup", None) for rule in tw.rules.defaults()} - {None}
    assert max(warmups) * demo.FLUSH_EVERY == demo.MIN_REQUESTS
    assert cli.main(["frobnicate"]) == 2
    assert cli.main(["--help"]) == 0


def test_python_dash_m_runs_the_same_cli():
    result = subprocess.run([sys.executable, "-m", "torchwatch"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "demo" in result.stderr


def test_report_exit_codes_and_tensorboard_only_logs(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["report", str(tmp_path / "empty")]) == 2
    assert "holds no torchwatch log" in capsys.readouterr().err
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    clean = tmp_path / "clean"
    with tw.attach(model, sinks=[tw.JsonlSink(clean / "s.jsonl"), tw.TensorBoardSink(clean / "tb")], rules=[]):
        for _ in range(5):
            model(torch.randn(2, 4))
    assert cli.main(["report", str(clean)]) == 0
    out = capsys.readouterr().out
    assert "5 calls" in out and "NaN/Inf: none" in out and "Alerts: none" in out
    broken = tmp_path / "broken"
    with tw.attach(model, sinks=[tw.TensorBoardSink(broken)], on_nonfinite="ignore", rules=[]):
        model(torch.full((1, 4), float("nan")))
    assert cli.main(["report", str(broken)]) == 1
    out = capsys.readouterr().out
    assert "no nonfinite alert names an origin" in out and "nan          4" in out  # on_nonfinite="ignore"


def test_version_and_a_one_line_description_for_every_command(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"torchwatch {tw.__version__} (torchwatch-monitor)"

    def commands(parser, path=()):
        for action in parser._actions:  # argparse keeps subcommands only here
            if action.__class__.__name__ == "_SubParsersAction":
                listed = {choice.dest for choice in action._choices_actions}
                for name, sub in action.choices.items():
                    assert name in listed, f"{' '.join((*path, name))} has no line in its parent's --help"
                    yield (*path, name), sub
                    yield from commands(sub, (*path, name))

    found = dict(commands(cli.parser()))
    assert {("keygen",), ("canary", "record"), ("canary", "verify"), ("verify",), ("demo",)} <= set(found)
    for path, sub in found.items():
        assert cli.main([*path, "--help"]) == 0
        text = capsys.readouterr().out
        # the description says what the command does before the exit codes
        first = (sub.description or "").split(". ")[0]
        assert first and not first.startswith("Exit"), (path, sub.description)
        assert " ".join(first.split()[:4]) in " ".join(text.split()), path
