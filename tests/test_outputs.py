"""The output-quality monitor against plain softmax/numpy oracles: confidence, margin, entropy,
classes, abstentions, and accuracy/ECE from labels fed back."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _device import device_watch
from _models import Tagger
from torch import nn

import torchwatch as tw


def _quality_oracle(logits: np.ndarray, threshold: float) -> dict[str, float]:
    z = logits - logits.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    top2 = np.sort(p, -1)[:, ::-1][:, :2]
    ent = -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)).sum(-1)
    return {
        "confidence": top2[:, 0].mean(), "margin": (top2[:, 0] - top2[:, 1]).mean(), "entropy": ent.mean(),
        "normalized_entropy": (ent / np.log(p.shape[-1])).mean(), "abstention_rate": (top2[:, 0] < threshold).mean(),
    }  # fmt: skip


@pytest.mark.parametrize("abstain_below", [0.3, None])
@pytest.mark.parametrize("path", ["c", "torch"])
def test_output_quality_matches_plain_softmax_and_counts_classes(path, abstain_below):
    model = Tagger()
    ids = torch.randint(0, 2000, (6, 10))
    monitor = tw.OutputMonitor("logits", abstain_below=abstain_below)
    with device_watch(model, outputs=monitor, device_path=path == "torch") as watch:
        watch.engine.monitor("outputs").accumulator.path = path
        with torch.no_grad():
            out = model(ids)["logits"]
            model(ids[:2])
        q = watch.snapshot().outputs
    logits = torch.cat([out.reshape(-1, 5), out[:2].reshape(-1, 5)]).double().numpy()
    assert q.rows == 80 and q.nonfinite == 0
    threshold = 0.3 if abstain_below is not None else 1 / math.sqrt(5)  # the default: 1/sqrt(classes)
    for name, value in _quality_oracle(logits, threshold).items():
        assert getattr(q, name) == pytest.approx(value, rel=1e-5, abs=1e-7), name
    np.testing.assert_array_equal(q.classes.counts[:5], np.bincount(logits.argmax(-1), minlength=5))


class _PassThrough(nn.Module):
    """A head that returns the logits it is given."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 1.0


@pytest.mark.parametrize("path", ["c", "torch"])
def test_the_default_abstention_threshold_follows_the_class_count(path):
    """A healthy 1,000-class head whose confidence is spread over a few similar classes (top-1
    0.2-0.6) abstains on no row by default (1/sqrt(1000) = 0.032), while a fixed 0.5 would count
    most rows; a head that collapsed to near-uniform answers abstains on every row."""
    gen = torch.Generator().manual_seed(0)
    rows = 256
    healthy = torch.randn(rows, 1000, generator=gen)
    top = torch.randint(0, 1000, (rows, 4), generator=gen)
    healthy.scatter_(1, top, torch.tensor([9.0, 8.5, 8.0, 7.5]).expand(rows, 4))  # a few plausible classes
    uniform = torch.randn(rows, 1000, generator=gen) * 0.01
    for logits, expected in ((healthy, 0.0), (uniform, 1.0)):
        head = _PassThrough()
        with device_watch(head, outputs=True, device_path=path == "torch") as watch:
            watch.engine.monitor("outputs").accumulator.path = path
            head(logits)
            q = watch.snapshot().outputs
        oracle = _quality_oracle(logits.double().numpy(), 1 / math.sqrt(1000))
        assert q.abstention_rate == oracle["abstention_rate"] == expected
    assert _quality_oracle(healthy.double().numpy(), 0.5)["abstention_rate"] > 0.5  # what 0.5 would say


def test_lm_head_last_position_and_nonfinite_rows_are_left_out():
    model = Tagger()
    ids = torch.randint(0, 2000, (3, 7))
    monitor = tw.OutputMonitor("logits", positions="last")
    with device_watch(model, outputs=monitor, on_nonfinite="ignore", device_path=True) as watch:
        with torch.no_grad():
            out = model(ids)["logits"]
        q = watch.snapshot().outputs
    assert q.rows == 3
    assert q.confidence == pytest.approx(_quality_oracle(out[:, -1].double().numpy(), 0.5)["confidence"], rel=1e-6)

    head = nn.Linear(4, 3)
    x = torch.randn(5, 4)
    x[2, 0] = math.nan
    with tw.attach(head, outputs=True, on_nonfinite="ignore") as watch:
        with torch.no_grad():
            y = head(x)
        q = watch.snapshot().outputs
    keep = torch.isfinite(y).all(-1)
    assert q.rows == 5 and q.nonfinite == 1
    assert q.confidence == pytest.approx(_quality_oracle(y[keep].double().numpy(), 0.5)["confidence"], rel=1e-6)


def test_a_selector_that_finds_no_logits_is_counted_and_serving_goes_on():
    model = nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with tw.attach(model, outputs="logits") as watch:
        with pytest.warns(tw.TorchwatchWarning, match="output quality not measured"):
            y = model(x)
        model(x)
        assert watch.errors["outputs"] == 2 and watch.snapshot().outputs is None
    torch.testing.assert_close(y, nn.functional.linear(x, model.weight, model.bias))
    int_model = nn.Sequential(nn.Identity(), nn.ReLU())
    with tw.attach(int_model, outputs=True) as watch:
        with pytest.warns(tw.TorchwatchWarning, match="not a|floating point"):
            int_model(torch.arange(6).reshape(2, 3))
        assert watch.errors["outputs"] == 1


def _ece_oracle(conf: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    which = np.minimum((conf * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            total += m.sum() / len(conf) * abs(correct[m].mean() - conf[m].mean())
    return total


def test_labels_give_accuracy_and_ece_that_match_a_plain_computation():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    watch = tw.attach(model, outputs=True, flush_every=1000)
    confs, preds, labels = [], [], []
    for i in range(30):
        x = torch.randn(8, 6)
        with watch.context(trace_id=f"req-{i}"), torch.no_grad():
            logits = model(x)
        p = logits.softmax(-1)
        y = torch.randint(0, 4, (8,))
        y[0] = -100  # ignored rows
        confs.append(p.max(-1).values[1:])
        preds.append(p.argmax(-1)[1:])
        labels.append(y[1:])
        assert watch.record_labels(f"req-{i}", y) == 7
    conf, correct = torch.cat(confs).double().numpy(), (torch.cat(preds) == torch.cat(labels)).double().numpy()
    q = watch.snapshot().outputs
    assert q.labelled == 210
    assert q.accuracy == pytest.approx(correct.mean())
    assert q.ece == pytest.approx(_ece_oracle(conf, correct), rel=1e-6)
    watch.detach()


def test_bad_labels_are_refused_whole_and_unknown_traces_are_counted():
    model = nn.Linear(4, 3)
    watch = tw.attach(model, outputs=True)
    for t in ("a", "b"):
        with watch.context(trace_id=t):
            model(torch.randn(2, 4))
    with pytest.raises(tw.ConfigError, match="2 prediction"):
        watch.record_labels(["a", "b"], [[0, 1], [0, 1, 2]])
    with pytest.raises(tw.ConfigError, match="integer class ids"):
        watch.record_labels("a", [0.5, 1.0])
    with pytest.raises(tw.ConfigError, match="2 trace ids but 1"):
        watch.record_labels(["a", "b"], [[0, 1]])
    assert watch.snapshot().outputs.labelled == 0  # nothing half-recorded
    with pytest.warns(tw.TorchwatchWarning, match="have no kept prediction"):
        assert watch.record_labels(["a", "zzz"], [[0, 1], [2]]) == 2
    assert watch.errors["labels:unknown trace id"] == 1
    with pytest.warns(tw.TorchwatchWarning, match="labelled already"):
        assert watch.record_labels("a", [0, 1]) == 0  # a trace's labels count once
    assert watch.errors["labels:already labelled"] == 1
    watch.detach()
    with tw.attach(model) as plain, pytest.raises(tw.ConfigError, match="needs output monitoring"):
        plain.record_labels("a", [0])


def _tiny_bert_config():
    from transformers import BertConfig

    return BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=37, max_position_embeddings=32, num_labels=3)  # fmt: skip


@pytest.mark.parametrize("outputs", [True, "auto"])
def test_auto_finds_the_logits_of_a_hugging_face_model_and_of_a_tuple(outputs):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(_tiny_bert_config()).eval()
    ids = torch.randint(0, 100, (4, 9))
    with tw.attach(model, outputs=outputs) as watch, torch.inference_mode():
        logits = model(input_ids=ids).logits  # a ModelOutput: dict-like with attributes
        as_tuple = model(input_ids=ids[:2], return_dict=False)  # a tuple, the logits first
        q = watch.snapshot().outputs
        assert not watch.errors
    oracle = _quality_oracle(torch.cat([logits, as_tuple[0]]).double().numpy(), 0.5)
    assert q.rows == 6
    assert q.confidence == pytest.approx(oracle["confidence"], rel=1e-5)
    assert q.entropy == pytest.approx(oracle["entropy"], rel=1e-5)


def test_auto_on_a_model_without_a_head_says_so_and_leaves_inference_alone():
    transformers = pytest.importorskip("transformers")
    model = transformers.BertModel(_tiny_bert_config()).eval()
    ids = torch.randint(0, 100, (2, 5))
    with torch.inference_mode():
        plain = model(input_ids=ids).last_hidden_state
    with tw.attach(model, outputs="auto") as watch, torch.inference_mode():
        with pytest.warns(tw.TorchwatchWarning, match=r"found no logits.*last_hidden_state, pooler_output"):
            out = model(input_ids=ids).last_hidden_state
        assert watch.errors["outputs"] == 1
    torch.testing.assert_close(out, plain, rtol=0, atol=0)


def test_a_second_label_for_a_trace_is_a_repeat_not_an_unknown_trace():
    model = nn.Linear(4, 3)
    with tw.attach(model, outputs=True) as watch, torch.no_grad():
        with watch.context(trace_id="a"):
            logits = model(torch.randn(2, 4))
        assert watch.record_labels("a", logits.argmax(-1)) == 2
        with pytest.warns(tw.TorchwatchWarning, match=r"\[.a.\] were labelled already"):
            assert watch.record_labels("a", [0, 1]) == 0
        with pytest.warns(tw.TorchwatchWarning, match="have no kept prediction"):
            assert watch.record_labels("never-seen", [0]) == 0
        assert watch.errors["labels:already labelled"] == 1 and watch.errors["labels:unknown trace id"] == 1
        q = watch.snapshot().outputs
        assert q.labelled == 2 and q.accuracy == 1.0  # the repeat counted nothing
        with watch.context(trace_id="a"):  # the id reused for a new call may be labelled again
            model(torch.randn(1, 4))
        assert watch.record_labels("a", [0]) == 1
