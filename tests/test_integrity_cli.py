"""`torchwatch manifest | verify | canary`: exit codes 0/1/2, named failures, --json, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from _models import classifier, classifier_inputs
from safetensors.torch import save_file

import torchwatch as tw
from torchwatch import cli


@pytest.fixture
def ckpt(tmp_path):
    model = classifier()
    path = tmp_path / "model.safetensors"
    save_file(model.state_dict(), path)
    return path


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_manifest_and_verify_a_checkpoint(ckpt, tmp_path, capsys):
    m = tmp_path / "m.json"
    code, out, _ = _run(capsys, "manifest", ckpt, "-o", m)
    assert code == 0 and f"wrote '{m}': 6 tensors" in out
    assert tw.Manifest.load(m) == tw.Manifest.from_safetensors(ckpt)
    code, out, _ = _run(capsys, "verify", ckpt, "--manifest", m)
    assert code == 0 and out.startswith("weights OK: 6 tensors")
    code, out, _ = _run(capsys, "verify", "--model", "_models:classifier", "--manifest", m, "--json")
    assert code == 0 and json.loads(out)["ok"] is True

    code, out, _ = _run(capsys, "verify", "--model", "_models:classifier", "--weights", ckpt, "--manifest", m)
    assert code == 0
    state = classifier(seed=9).state_dict()
    save_file({**classifier().state_dict(), "3.bias": state["3.bias"]}, ckpt)
    code, out, _ = _run(capsys, "verify", ckpt, "--manifest", m, "--json")
    assert code == 1 and json.loads(out)["mismatched"] == ["3.bias"]
    code, out, _ = _run(capsys, "verify", ckpt, "--manifest", m)
    assert code == 1 and "1 with different bytes: '3.bias'" in out


def test_manifest_from_a_model_spec_signed_and_pinned(tmp_path, capsys):
    m, key = tmp_path / "m.json", tmp_path / "key"
    key.write_bytes(os.urandom(32))
    code, out, _ = _run(capsys, "manifest", "--model", "_models:classifier", "-o", m, "--key", key, "--json")
    doc = json.loads(out)
    assert code == 0 and doc["signed"] and doc["tensors"] == 6
    args = ("verify", "--model", "_models:classifier", "--manifest", m)
    assert _run(capsys, *args, "--key", key, "--expected-digest", doc["digest"])[0] == 0
    code, out, _ = _run(capsys, *args, "--expected-digest", "0" * 64)
    assert code == 1 and "not the manifest that was pinned" in out
    other = tmp_path / "other-key"
    other.write_bytes(os.urandom(32))
    code, out, _ = _run(capsys, *args, "--key", other)
    assert code == 1 and "failed signature verification" in out


def test_canary_record_and_verify(tmp_path, capsys):
    inputs, c, m = tmp_path / "in.safetensors", tmp_path / "c.safetensors", tmp_path / "m.json"
    save_file({"x": classifier_inputs()}, inputs)
    assert _run(capsys, "manifest", "--model", "_models:classifier", "-o", m)[0] == 0
    code, out, _ = _run(capsys, "canary", "record", "--model", "_models:classifier", "--inputs", inputs, "-o", c,
                        "--manifest", m)  # fmt: skip
    assert code == 0 and "1 inputs, 1 outputs (output)" in out
    assert tw.Canary.load(c).manifest_digest == tw.Manifest.load(m).digest
    code, out, _ = _run(capsys, "canary", "verify", c, "--model", "_models:classifier")
    assert code == 0 and out.startswith("canary OK (bitwise")
    code, out, _ = _run(capsys, "canary", "verify", c, "--model", "_models:classifier", "--json", "--mode", "summary")
    assert code == 0 and json.loads(out)["outputs"][0]["cosine"] == pytest.approx(1.0)
    # same architecture, other weights: fails and names the output
    code, out, _ = _run(capsys, "canary", "verify", c, "--model", "_models:classifier", "--weights",
                        _save(tmp_path, classifier(seed=4)))  # fmt: skip
    assert code == 1 and "'output':" in out
    # inputs from a function spec
    code, _, _ = _run(capsys, "canary", "record", "--model", "_models:classifier", "--inputs",
                      "_models:classifier_inputs", "-o", c)  # fmt: skip
    assert code == 0 and torch.equal(tw.Canary.load(c).inputs[0], classifier_inputs())


def _save(tmp_path, model) -> str:
    path = tmp_path / "other.safetensors"
    save_file(model.state_dict(), path)
    return str(path)


def test_bad_input_exits_2_with_one_line_and_writes_nothing(ckpt, tmp_path, capsys):
    m = tmp_path / "m.json"
    cases = [
        (("manifest", tmp_path / "none.safetensors", "-o", m), "does not exist"),
        (("manifest", ckpt, "--model", "_models:classifier", "-o", m), "not both"),
        (("manifest", "--model", "nowhere_module:f", "-o", m), "cannot import 'nowhere_module'"),
        (("manifest", "--model", "_models", "-o", m), "must look like 'package.module:factory'"),
        (("manifest", "--model", "_models:missing", "-o", m), "has no attribute 'missing'"),
        (("manifest", "--model", "_models:classifier_inputs", "-o", m), "returned Tensor, not a torch.nn.Module"),
        (("verify", ckpt, "--manifest", tmp_path / "none.json"), "manifest '"),
        (("canary", "verify", ckpt, "--model", "_models:classifier"), "has format None"),
        (("manifest", ckpt, "-o", m, "--threads", "0"), "must be a positive integer"),
    ]
    for argv, message in cases:
        code, _out, err = _run(capsys, *argv)
        assert code == 2 and message in err, (argv, err)
        assert "Traceback" not in err
    assert not m.exists()
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(ckpt.read_bytes()[:-100])
    code, _, err = _run(capsys, "manifest", truncated, "-o", m)
    assert code == 2 and "is truncated" in err and not m.exists()
    wrong = tmp_path / "wrong.safetensors"
    save_file({"0.weight": torch.zeros(3, 3)}, wrong)
    code, _, err = _run(capsys, "verify", "--model", "_models:classifier", "--weights", wrong, "--manifest", m)
    assert code == 2 and "the weights do not fit the model" in err
    save_file({"x": torch.randn(2, 5)}, tmp_path / "in.safetensors")
    code, _, err = _run(capsys, "canary", "record", "--model", "_models:classifier", "--inputs",
                        tmp_path / "in.safetensors", "-o", tmp_path / "c.safetensors")  # fmt: skip
    assert code == 2 and "the model failed on the canary inputs (0: float32[2, 5])" in err
    assert not (tmp_path / "c.safetensors").exists()


def test_non_utf8_output_path_from_a_real_process(ckpt, tmp_path):
    out = os.fsencode(tmp_path) + b"/m-\xff.json"
    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__)}
    done = subprocess.run([sys.executable, "-m", "torchwatch", "manifest", os.fsencode(ckpt), "-o", out],
                          capture_output=True, env=env, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert b"m-\\xff.json" in done.stdout and os.path.exists(out)
    bad = os.fsencode(tmp_path) + b"/no-\xfe.safetensors"
    done = subprocess.run([sys.executable, "-m", "torchwatch", "verify", bad, "--manifest", out],
                          capture_output=True, env=env, timeout=120)  # fmt: skip
    assert done.returncode == 2 and b"no-\\xfe.safetensors' does not exist" in done.stderr


# ---- keygen ----------------------------------------------------------------------------------


def test_keygen_writes_a_fresh_owner_only_key_that_signs_and_verifies(tmp_path, capsys):
    key = tmp_path / "manifest.key"
    assert cli.main(["keygen", "-o", str(key)]) == 0
    assert "32-byte signing key" in capsys.readouterr().out
    assert oct(key.stat().st_mode & 0o777) == "0o600" and key.stat().st_size == 32
    other = tmp_path / "other.key"
    assert cli.main(["keygen", "-o", str(other)]) == 0
    assert key.read_bytes() != other.read_bytes()  # random, not a constant
    model = torch.nn.Linear(3, 2)
    manifest = tw.Manifest.from_model(model)
    manifest.save(tmp_path / "m.json", key=key)
    tw.Manifest.load(tmp_path / "m.json", key=key)  # the key it made signs and verifies
    with pytest.raises(tw.IntegrityError):
        tw.Manifest.load(tmp_path / "m.json", key=other)


def test_keygen_never_replaces_a_key_and_leaves_nothing_on_failure(tmp_path, capsys):
    key = tmp_path / "manifest.key"
    key.write_bytes(b"k" * 32)
    assert cli.main(["keygen", "-o", str(key)]) == 2
    assert "already exists" in capsys.readouterr().err and key.read_bytes() == b"k" * 32
    link = tmp_path / "link.key"
    link.symlink_to(tmp_path / "elsewhere.key")
    assert cli.main(["keygen", "-o", str(link)]) == 2  # a dangling link is not followed to create its target
    assert not (tmp_path / "elsewhere.key").exists()
    assert cli.main(["keygen", "-o", str(tmp_path / "missing" / "k.key")]) == 2
    assert "cannot write" in capsys.readouterr().err
    with pytest.raises(tw.ConfigError, match="size must be"):
        tw.write_key(tmp_path / "small.key", size=8)
    assert not (tmp_path / "small.key").exists()
