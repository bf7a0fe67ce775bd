"""The example programs the README points to, run as a user runs them (the others have their own
tests: fastapi_server in test_fastapi_recipe, readiness_server in test_startup, shadow_rollout in
test_shadow, dead_rows_monitor in test_monitors; rollout_classifier is here)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_serve_with_watch_names_the_bad_request_and_writes_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    done = subprocess.run([sys.executable, str(ROOT / "examples" / "serve_with_watch.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, check=True)  # fmt: skip
    first, worst = done.stdout.splitlines()[:2]
    # the one +Inf it plants: in the input of call 321, request 'req-321'
    assert first.startswith("500 calls; first NaN/Inf: +Inf arrived with the model's input '<input>' on call 321")
    assert "(trace 'req-321')" in first
    assert worst.startswith("most fp8 (e4m3fn) underflow: ")
    acc = EventAccumulator(str(tmp_path / "runs" / "example"))
    acc.Reload()
    # 500 calls flushed every 50: ten points per series; the one +Inf sits in the interval of
    # calls 300-349 (step 350) of the input's posinf count, and in no other
    posinf = {e.step: e.value for e in acc.Scalars("<input>/posinf")}
    assert sorted(posinf) == list(range(50, 501, 50))
    assert {step for step, v in posinf.items() if v} == {350} and posinf[350] == 1
    absmax = [e.value for e in acc.Scalars("4/absmax")]  # the last Linear, every interval finite
    assert len(absmax) == 10 and all(0 < v < float("inf") for v in absmax)


def test_the_rollout_example_decides_each_candidate_and_rolls_back_by_itself(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "verdicts.json"
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "rollout_classifier.py"), "--json", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    got = json.loads(out.read_text())
    assert got["identical copy"]["decision"] == "promote"
    swapped = got["classes swapped on 5% of inputs"]
    assert swapped["decision"] == "rollback" and swapped["metric"] == "agreement"
    assert swapped["served_by_after"] == "primary"  # on_verdict switched the server back
    assert swapped["lower"] >= 0.01  # the interval excludes "within the 1% tolerance"
    slow = got["20% slower"]
    assert slow["decision"] == "rollback" and slow["metric"] == "latency_p99" and slow["lower"] > 0.1
    fixed = got["fixed version, labels fed back"]
    assert fixed["decision"] == "promote"
    # each verdict says how many requests it took, and the output names them
    for name, v in got.items():
        assert f"{name}: {v['decision']} on {v['metric']} after {v['requests']} requests" in done.stdout
