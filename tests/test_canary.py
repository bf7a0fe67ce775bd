"""Canaries: record/verify round trips, comparison modes against numpy oracles, bad files."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from _models import classifier, classifier_inputs
from safetensors import safe_open
from safetensors.torch import save_file

import torchwatch as tw
from torchwatch._pytree import flatten_outputs

transformers = pytest.importorskip("transformers")


class TwoHeads(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(6, 6)

    def forward(self, a, b=None):
        h = self.body(a)
        out = {"logits": h, "labels": h.argmax(-1)}
        if b is not None:
            out["extra"] = (h * b, [h.sum(-1)])
        return out


def test_round_trip_with_tensor_tuple_and_dict_inputs(tmp_path):
    model = TwoHeads().eval()
    a, b = torch.randn(4, 6), torch.randn(4, 6)
    for inputs, kind in [(a, "tensor"), ((a, b), "tuple"), ({"a": a, "b": b}, "dict")]:
        canary = tw.Canary.record(model, inputs)
        path = tmp_path / f"{kind}.safetensors"
        canary.save(path)
        with safe_open(str(path), framework="pt") as f:  # read back with safetensors itself
            keys, meta = set(f.keys()), f.metadata()
        assert meta["format"] == "torchwatch.canary/1" and meta["input_kind"] == kind
        n_out = 2 if kind == "tensor" else 4
        assert keys == {f"input/{i}" for i in range(1 if kind == "tensor" else 2)} | {
            f"expected/{i}" for i in range(n_out)
        }
        loaded = tw.Canary.load(path)
        assert list(loaded.expected) == list(canary.expected)
        report = loaded.verify(model)
        assert report.ok and report.mode == "bitwise", report.summary()
    assert list(tw.Canary.load(tmp_path / "dict.safetensors").expected) == ["logits", "labels", "extra.0", "extra.1.0"]


def test_hf_model_with_keyword_inputs_names_its_outputs():
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  vocab_size=100, max_position_embeddings=32)  # fmt: skip
    model = transformers.BertModel(cfg).eval()
    inputs = {"input_ids": torch.randint(0, 100, (3, 16)), "attention_mask": torch.ones(3, 16, dtype=torch.long)}
    canary = tw.Canary.record(model, inputs)
    assert list(canary.expected) == ["last_hidden_state", "pooler_output"]
    assert canary.verify(model).ok
    with torch.no_grad():
        model.encoder.layer[1].output.dense.weight[0, 0] += 1e-4
    report = canary.verify(model)
    assert not report.ok and {o.name for o in report.failed} == {"last_hidden_state", "pooler_output"}


def test_bitwise_failure_reports_the_plain_differences():
    model = classifier()
    x = classifier_inputs()
    canary = tw.Canary.record(model, x)
    expected = model(x).detach()
    with torch.no_grad():
        model[3].bias[2] += 1e-6
    got = model(x).detach()
    (check,) = canary.verify(model).outputs
    assert not check.passed and check.name == "output"
    assert check.max_abs == pytest.approx(float((got.double() - expected.double()).abs().max()))
    assert check.mismatched == int((got != expected).sum())
    assert "values differ bitwise" in check.reason
    with pytest.raises(tw.CanaryError, match="'output': .* values differ bitwise") as err:
        canary.verify(model, raise_on_failure=True)
    assert err.value.report.failed[0].name == "output"


def _np_metrics(got: np.ndarray, exp: np.ndarray) -> tuple[float, float, float]:
    d = got - exp
    rel = np.linalg.norm(d) / np.linalg.norm(exp)
    cos = float((got * exp).sum() / (np.linalg.norm(got) * np.linalg.norm(exp)))
    top1 = float((got.argmax(-1) == exp.argmax(-1)).mean())
    return float(rel), cos, top1


@pytest.mark.parametrize("noise", [1e-4, 0.3])
def test_summary_mode_metrics_match_numpy(noise):
    model = classifier()
    x = classifier_inputs()
    canary = tw.Canary.record(model, x)
    exp = model(x).detach().double().numpy()
    with torch.no_grad():
        model[3].weight.add_(torch.randn_like(model[3].weight) * noise)
    got = model(x).detach().double().numpy()
    (check,) = canary.verify(model, mode="summary").outputs
    rel, cos, top1 = _np_metrics(got, exp)
    assert check.rel_l2 == pytest.approx(rel, rel=1e-9)
    assert check.cosine == pytest.approx(cos, rel=1e-9)
    assert check.top1_agree == pytest.approx(top1)
    assert check.passed == (rel <= 1e-2 and cos >= 0.999 and top1 >= 0.99)
    assert check.passed is (noise == 1e-4)


def test_tolerance_mode_counts_values_outside_the_torch_testing_defaults():
    model = classifier()
    x = classifier_inputs()
    canary = tw.Canary.record(model, x)
    exp = model(x).detach().numpy()
    with torch.no_grad():
        model[3].bias.add_(torch.tensor([0, 0, 3e-6, 0, 0, 0, 0, 0, 0, 5e-5]))
    got = model(x).detach().numpy()
    (check,) = canary.verify(model, mode="tolerance").outputs
    oracle_bad = int((~np.isclose(got.astype(np.float64), exp.astype(np.float64), rtol=1.3e-6, atol=1e-5)).sum())
    assert check.mismatched == oracle_bad == 64  # the 5e-5 column fails, the 3e-6 one does not
    assert not check.passed
    loose = canary.verify(model, mode="tolerance", tolerances=tw.Tolerances(atol=1e-4))
    assert loose.ok


def test_auto_mode_follows_the_metadata():
    model = classifier()
    canary = tw.Canary.record(model, classifier_inputs())
    assert canary.choose_mode(model)[0] == "bitwise"
    for key, value, mode in [("torch", "1.0", "tolerance"), ("threads", "999", "tolerance"),
                             ("device_name", "Other CPU", "tolerance"), ("device", "cuda", "summary"),
                             ("dtype", "bfloat16", "summary")]:  # fmt: skip
        other = tw.Canary(canary.inputs, canary.input_kind, canary.input_keys, canary.expected,
                          {**canary.metadata, key: value})  # fmt: skip
        chosen, why = other.choose_mode(model)
        assert chosen == mode and (value in why or mode == "summary"), why


def test_another_dtype_casts_inputs_and_compares_by_summary():
    model = classifier()
    canary = tw.Canary.record(model, classifier_inputs())
    report = canary.verify(model.to(torch.bfloat16))
    assert report.mode == "summary" and "recorded in float32, running in bfloat16" in report.mode_reason
    assert report.ok, report.summary()
    assert report.outputs[0].rel_l2 > 0


def test_nan_integer_missing_and_unexpected_outputs():
    model = TwoHeads().eval()
    a = torch.randn(4, 6)
    canary = tw.Canary.record(model, a)
    labels_before = model(a)["labels"]
    with torch.no_grad():
        model.body.bias[0] = float("nan")
    labels_after = model(a)["labels"]
    report = canary.verify(model, mode="summary")
    by_name = {o.name: o for o in report.outputs}
    assert "NaN/Inf in different places (4 NaN now, 0 recorded)" in by_name["logits"].reason
    assert by_name["labels"].passed == bool(torch.equal(labels_before, labels_after))
    if not by_name["labels"].passed:
        assert by_name["labels"].mismatched == int((labels_before != labels_after).sum())
        assert "compared exactly" in by_name["labels"].reason

    class Fewer(TwoHeads):
        def forward(self, a, b=None):
            h = self.body(a)
            return {"logits": h, "new": a}

    base = TwoHeads().eval()
    fewer = Fewer().eval()
    fewer.load_state_dict(base.state_dict())
    r = tw.Canary.record(base, a).verify(fewer)
    assert [(o.name, o.reason) for o in r.failed] == [("labels", "the model no longer returns this output")]
    assert r.unexpected_outputs == ["new"]


def test_bad_inputs_and_models_give_config_errors():
    model = classifier()
    with pytest.raises(tw.ConfigError, match="canary inputs must all be tensors; not tensors: 1"):
        tw.Canary.record(model, (torch.randn(2, 12), 3))
    with pytest.raises(tw.ConfigError, match="must be a tensor, a tuple/list or a dict"):
        tw.Canary.record(model, "text")
    with pytest.raises(tw.ConfigError, match=r"the model failed on the canary inputs \(0: float32\[2, 7\]\)"):
        tw.Canary.record(model, torch.randn(2, 7))

    class Text(torch.nn.Module):
        def forward(self, x):
            return "not a tensor"

    with pytest.raises(tw.ConfigError, match="returned no tensor"):
        tw.Canary.record(Text(), torch.ones(1))
    canary = tw.Canary.record(model, classifier_inputs())
    narrow = torch.nn.Sequential(torch.nn.Linear(10, 4))
    with pytest.raises(tw.ConfigError, match=r"float32\[64, 12\].*is this the model the canary was recorded for"):
        canary.verify(narrow)
    with pytest.raises(tw.ConfigError, match="mode='exact' is not valid"):
        canary.verify(model, mode="exact")
    with pytest.raises(tw.ConfigError, match="Tolerances: rtol must be a finite number"):
        tw.Tolerances(rtol=-1)


def test_corrupt_and_foreign_canary_files(tmp_path):
    model = classifier()
    path = tmp_path / "c.safetensors"
    tw.Canary.record(model, classifier_inputs()).save(path)
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[:-10])
    with pytest.raises(tw.FormatError, match="is truncated"):
        tw.Canary.load(tmp_path / "trunc.safetensors")
    save_file({"x": torch.ones(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(tw.FormatError, match="has format None; this torchwatch reads 'torchwatch.canary/1'"):
        tw.Canary.load(tmp_path / "plain.safetensors")
    with safe_open(str(path), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118
    del tensors["expected/0"]
    save_file(tensors, tmp_path / "partial.safetensors", metadata=meta)
    with pytest.raises(tw.FormatError, match="lacks tensor 'expected/0'"):
        tw.Canary.load(tmp_path / "partial.safetensors")
    save_file({"input/0": torch.ones(1)}, tmp_path / "meta.safetensors", metadata={**meta, "output_names": "{bad"})
    with pytest.raises(tw.FormatError, match="metadata field 'output_names' is not valid JSON"):
        tw.Canary.load(tmp_path / "meta.safetensors")
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"]["format"] = "torchwatch.canary/2"
    body = json.dumps(header).encode()
    (tmp_path / "v2.safetensors").write_bytes(struct.pack("<Q", len(body)) + body + data[8 + n :])
    with pytest.raises(tw.FormatError, match="'torchwatch.canary/2'"):
        tw.Canary.load(tmp_path / "v2.safetensors")


def test_flatten_outputs_names_nested_structures():
    t = torch.ones(1)
    assert list(flatten_outputs(t)) == ["output"]
    assert list(flatten_outputs((t, [t, {"k": t}], None))) == ["0", "1.0", "1.1.k"]


def test_a_bitwise_failure_from_a_changed_output_dtype_says_so():
    model = classifier()
    canary = tw.Canary.record(model, classifier_inputs())

    class Half(torch.nn.Module):
        def forward(self, x):
            return model(x).half()

    (check,) = canary.verify(Half(), mode="bitwise").outputs
    assert not check.passed
    assert check.reason.startswith("dtype float16, recorded float32: the output dtype changed")
    assert "0 of" not in check.reason
