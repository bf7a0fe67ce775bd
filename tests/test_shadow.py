"""Shadow comparison of two model versions: offline compare() and live shadow(), against plain
torch computations of the same agreement figures."""

from __future__ import annotations

import copy
import json
import math
import threading
import time

import pytest
import torch
from torch import nn

import torchwatch as tw
from torchwatch.cli import report


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5)).eval()


def _perturbed(model: nn.Module, scale: float) -> nn.Module:
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * scale)
    return other


def test_compare_identical_models_agree_completely():
    a = _model()
    b = copy.deepcopy(a)
    result = tw.compare(a, b, batches=[torch.randn(8, 16) for _ in range(4)])
    (out,) = result.outputs
    assert result.ok and result.calls == 4
    assert (out.name, out.rows, out.top1, out.rel_l2, out.cosine, out.max_abs) == ("output", 32, 1.0, 0.0, 1.0, 0.0)
    assert result.modules and all(m.score == 0 for m in result.modules)


def test_compare_of_a_perturbed_candidate_matches_plain_torch_figures():
    a = _model()
    b = _perturbed(a, 0.05)
    batches = [torch.randn(8, 16) for _ in range(5)]
    result = tw.compare(a, b, batches=batches)
    with torch.no_grad():
        ya = torch.cat([a(x) for x in batches]).double()
        yb = torch.cat([b(x) for x in batches]).double()
    (out,) = result.outputs
    assert out.top1 == pytest.approx(float((ya.argmax(-1) == yb.argmax(-1)).double().mean()))
    assert out.rel_l2 == pytest.approx(float((yb - ya).norm() / ya.norm()), rel=1e-9)
    assert out.cosine == pytest.approx(float((ya * yb).sum() / (ya.norm() * yb.norm())), rel=1e-9)
    assert out.max_abs == pytest.approx(float((yb - ya).abs().max()))
    assert out.top1 < 1.0 and not result.ok and "top-1 agreement" in result.failures[0]
    first = result.modules[0]  # largest score first, with the statistics of each side
    assert first.score == max(m.score for m in result.modules) > 0


def test_compare_refuses_bad_arguments_and_notes_watched_models():
    a, b = _model(), _model(1)
    x = torch.randn(2, 16)
    with pytest.raises(tw.ConfigError, match="not both or neither"):
        tw.compare(a, b)
    with pytest.raises(tw.ConfigError, match="two different models"):
        tw.compare(a, a, x)
    with tw.attach(a):
        result = tw.compare(a, b, x)
    assert result.modules == () and "already watched" in result.notes[0] and result.calls == 1


def test_shadow_of_an_identical_candidate_agrees_100_percent_and_leaves_answers_alone():
    primary = _model()
    candidate = copy.deepcopy(primary)
    xs = [torch.randn(4, 16) for _ in range(30)]
    with torch.no_grad():
        expected = [primary(x) for x in xs]
    with tw.attach(primary) as watch, tw.shadow(primary, candidate, sample=1.0, max_pending=100) as sh:
        with torch.no_grad():
            got = [primary(x) for x in xs]
        assert sh.wait()
        result = sh.report()
        assert watch.calls == 30  # the shadow's work is not a call of the primary
    assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))
    assert (result.calls, result.seen, result.sampled, result.dropped, result.errors) == (30, 30, 30, 0, 0)
    assert result.outputs[0].top1 == 1.0 and result.outputs[0].rel_l2 == 0.0 and result.ok
    assert sh.alerts == []
    # not compared live: the primary's statistics cover other calls than the candidate's (they showed
    # shifts for identical layers); the report says where to get them
    assert result.modules == () and "tw.compare" in result.notes[0]


def test_shadow_flags_a_perturbed_candidate_through_the_primary_watch(tmp_path):
    primary = _model()
    candidate = _perturbed(primary, 0.2)
    path = tmp_path / "shadow.jsonl"
    with tw.attach(primary, sinks=[tw.JsonlSink(tmp_path / "stats.jsonl")]) as watch:
        sh = tw.shadow(primary, candidate, sample=1.0, path=path, write_every=10, min_calls=10, max_pending=100)
        with torch.no_grad():
            for _ in range(40):
                primary(torch.randn(16, 16))
        sh.wait()
        final = sh.close()
        alerts = [a for a in watch.alerts if a.rule == "shadow"]
    assert len(alerts) == 1 and alerts[0].stat == "top1" and alerts[0].value < 0.99
    assert not final.ok and final.calls == 40
    lines = path.read_text().splitlines()
    assert len(lines) == 5  # every 10 comparisons, and at close
    loaded = tw.Comparison.load(path)
    assert loaded.calls == 40 and loaded.outputs[0].top1 == pytest.approx(final.outputs[0].top1)
    summary = report.summarize(report.load(tmp_path))
    assert summary["comparisons"][0]["calls"] == 40 and summary["comparisons"][0]["ok"] is False
    assert "shadow" in report.text(summary)


def test_shadow_samples_about_the_requested_share_and_never_blocks_the_primary():
    primary = _model()
    release = threading.Event()

    class Stuck(nn.Module):
        """A candidate that does not return until the primary has served every call."""

        def __init__(self) -> None:
            super().__init__()
            self.inner = copy.deepcopy(primary)

        def forward(self, x):
            release.wait(60)
            return self.inner(x)

    sh = tw.shadow(primary, Stuck(), sample=0.25, seed=7, max_pending=2)
    with torch.no_grad():
        for _ in range(400):
            primary(torch.randn(2, 16))  # would hang here if the primary waited for the candidate
    release.set()
    result = sh.close()
    assert result.seen == 400
    assert 60 <= result.sampled + result.dropped <= 140  # binomial(400, 0.25): mean 100, sd 8.7
    # the candidate held one sample and the queue two: every other sample was dropped, not waited for
    assert result.sampled <= 3
    assert result.calls == result.sampled


def test_a_failing_candidate_is_counted_and_reused_input_buffers_do_not_fool_the_comparison():
    primary = _model()

    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("candidate bug")

    with pytest.warns(tw.TorchwatchWarning, match="candidate raised"):
        with tw.shadow(primary, Broken(), sample=1.0) as sh:
            y = primary(torch.randn(2, 16))
            sh.wait()
    assert sh.errors == 1 and y.shape == (2, 5)

    candidate = copy.deepcopy(primary)
    buffer = torch.empty(4, 16)
    with tw.shadow(primary, candidate, sample=1.0, max_pending=100) as sh, torch.no_grad():
        for _ in range(10):
            buffer.normal_()
            primary(buffer)  # the server refills this buffer right after the call
        sh.wait()
        assert sh.report().outputs[0].top1 == 1.0


def test_shadow_from_several_serving_threads():
    primary = _model()
    candidate = copy.deepcopy(primary)
    with tw.shadow(primary, candidate, sample=1.0, max_pending=1000) as sh:

        def serve() -> None:
            with torch.no_grad():
                for _ in range(25):
                    primary(torch.randn(3, 16))

        threads = [threading.Thread(target=serve) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        sh.wait()
        result = sh.report()
    assert result.calls == 100 and result.outputs[0].top1 == 1.0


def test_comparison_files_round_trip_and_bad_ones_are_refused(tmp_path):
    a = _model()
    result = tw.compare(a, _perturbed(a, 0.01), torch.randn(8, 16))
    result.save(tmp_path / "cmp.jsonl")
    back = tw.Comparison.load(tmp_path / "cmp.jsonl")
    assert back.to_dict() == json.loads(json.dumps(result.to_dict()))
    (tmp_path / "bad.jsonl").write_text('{"format": "something else"}\n')
    with pytest.raises(tw.FormatError, match="not a torchwatch comparison"):
        tw.Comparison.load(tmp_path / "bad.jsonl")
    with pytest.raises(tw.FormatError, match="comparison .*missing.jsonl' does not exist"):
        tw.Comparison.load(tmp_path / "missing.jsonl")
    for bad in (0, 1.5, True):
        with pytest.raises(tw.ConfigError, match="sample"):
            tw.shadow(a, _model(1), sample=bad)
    assert math.isfinite(back.outputs[0].rel_l2)


def test_a_candidate_of_another_shape_is_counted_not_fatal():
    primary = _model()
    with tw.attach(primary), tw.shadow(primary, nn.Identity(), sample=1.0) as sh:
        primary(torch.randn(2, 16))
        sh.wait()
        result = sh.report()
    assert result.calls == 1 and result.outputs[0].mismatched_shapes == 1 and result.modules == ()


def test_the_rollout_example_runs_and_its_logs_report_the_comparison(tmp_path):
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "examples" / "shadow_rollout.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "DIFFERENT" in done.stdout and "accuracy" in done.stdout
    summary = report.summarize(report.load(tmp_path))
    assert summary["comparisons"][0]["ok"] is False and summary["outputs"]["labelled"] == 6400


def test_compare_takes_a_mapping_batch_that_is_not_a_dict():
    """A tokenizer's BatchEncoding is a Mapping, not a dict: it is passed as keyword arguments."""
    import collections

    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = _model()

        def forward(self, *, features):
            return self.inner(features)

    a = Keyword()
    result = tw.compare(a, copy.deepcopy(a), collections.UserDict(features=torch.randn(4, 16)))
    assert result.ok and result.outputs[0].rows == 4


def test_a_shadowed_primary_can_be_deep_copied_and_the_copy_is_not_shadowed():
    primary, candidate = _model(), _model()
    with tw.shadow(primary, candidate, sample=1.0, seed=0) as sh:
        clone = copy.deepcopy(primary)
        with torch.no_grad():
            clone(torch.randn(2, 16))
            primary(torch.randn(2, 16))
        sh.wait()
        assert sh.seen == 1


def test_a_shadow_dropped_without_close_frees_both_models_and_ends_its_thread():
    import gc
    import weakref

    def shadow_threads() -> int:
        return sum(t.name == "torchwatch-shadow" and t.is_alive() for t in threading.enumerate())

    before = shadow_threads()
    primary, candidate = _model(), _model(1)
    sh = tw.shadow(primary, candidate, sample=1.0, seed=0)
    with torch.no_grad():
        primary(torch.randn(2, 16))
    sh.wait()
    refs = [weakref.ref(primary), weakref.ref(candidate)]
    del sh, primary, candidate
    deadline = time.monotonic() + 30
    while (shadow_threads() > before or any(r() is not None for r in refs)) and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.01)
    assert all(r() is None for r in refs) and shadow_threads() == before


def test_the_shadow_thread_survives_a_raising_warnings_filter():
    # a process run with -W error turns the disagreement warning into an exception on the shadow thread
    import warnings

    primary = torch.nn.Linear(4, 3)
    candidate = torch.nn.Linear(4, 3)
    sh = tw.shadow(primary, candidate, sample=1.0, min_calls=2, max_pending=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", tw.TorchwatchWarning)
        with torch.no_grad():
            for _ in range(40):
                primary(torch.randn(2, 4))
                sh.wait(30)
        result = sh.close(timeout=30)
    assert result.calls == 40 and sh.errors >= 1  # every sample compared; the failed warning counted
