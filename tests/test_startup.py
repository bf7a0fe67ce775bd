"""tw.selftest, and the readiness example that gates an HTTP server on it (queried over loopback)."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import urllib.error
import urllib.request

import pytest
import torch
from _models import classifier, classifier_inputs

import torchwatch as tw


@pytest.fixture
def files(tmp_path):
    model = classifier()
    manifest = tw.Manifest.from_model(model)
    manifest.save(tmp_path / "m.json")
    tw.Canary.record(model, classifier_inputs(), manifest=manifest).save(tmp_path / "c.safetensors")
    return str(tmp_path / "m.json"), str(tmp_path / "c.safetensors")


def test_selftest_passes_and_returns_a_fingerprint_baseline(files):
    manifest, canary = files
    model = classifier()
    report = tw.selftest(model, manifest=manifest, canary=canary)
    assert report.ok and report.weights.ok and report.canary.ok and report.canary.mode == "bitwise"
    assert report.fingerprint == tw.fingerprint(model)
    assert "self-test PASSED" in report.summary()
    assert json.loads(json.dumps(report.to_dict()))["ok"] is True


def test_wrong_weights_raise_integrity_error_before_the_canary_runs(files):
    manifest, canary = files
    model = classifier(seed=1)
    with pytest.raises(tw.IntegrityError, match="4 with different bytes") as err:
        tw.selftest(model, manifest=manifest, canary=canary)
    report = err.value.report
    assert not report.ok and report.canary is None and report.fingerprint is None
    quiet = tw.selftest(model, manifest=manifest, canary=canary, raise_on_failure=False)
    assert not quiet.ok and not quiet.weights.ok and not quiet.canary.ok and quiet.fingerprint is None


def test_a_model_that_computes_differently_fails_the_canary_only(files):
    manifest, canary = files
    model = classifier()
    model[1].approximate = "tanh"  # same weights, another GELU: the manifest cannot see it
    with pytest.raises(tw.CanaryError, match="canary FAILED") as err:
        tw.selftest(model, manifest=manifest, canary=canary)
    assert err.value.report.weights.ok and not err.value.report.canary.ok


def test_misconfigured_selftests(files, tmp_path):
    _manifest, canary = files
    with pytest.raises(tw.ConfigError, match="needs manifest= or canary="):
        tw.selftest(classifier())
    other = tw.Manifest.from_model(classifier(seed=3))
    with pytest.raises(tw.ConfigError, match="belong to different models"):
        tw.selftest(classifier(), manifest=other, canary=canary)
    with pytest.raises(tw.FormatError, match="does not exist"):
        tw.selftest(classifier(), canary=str(tmp_path / "none.safetensors"))


def _example():
    path = pathlib.Path(__file__).parents[1] / "examples" / "readiness_server.py"
    spec = importlib.util.spec_from_file_location("readiness_server", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _get(port: int, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("corrupt", [False, True])
def test_readiness_example_answers_503_until_the_selftest_passes(tmp_path, corrupt):
    example = _example()
    validated = example.model_factory()
    manifest, canary = str(tmp_path / "m.json"), str(tmp_path / "c.safetensors")
    tw.Manifest.from_model(validated).save(manifest)
    tw.Canary.record(validated, torch.randn(8, 12)).save(canary)
    model = example.model_factory()
    if corrupt:
        with torch.no_grad():
            model[2].weight[4, 4] *= -1
    server = example.ReadinessServer(model, manifest=manifest, canary=canary)
    server.start()
    try:
        assert _get(server.port, "/ready") == (503, {"ready": False, "reason": "self-test not run yet"})
        assert _get(server.port, "/live")[0] == 200
        server.run_selftest()
        code, body = _get(server.port, "/ready")
        if corrupt:
            assert code == 503 and "'2.weight'" in body["reason"]
        else:
            assert code == 200 and body["reason"].startswith("self-test passed")
    finally:
        server.stop()
