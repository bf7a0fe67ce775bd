"""Input and output-quality monitors against plain numpy/torch oracles, and the default rules
catching preprocessing faults on real small models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import torchwatch as tw
from torchwatch.monitors.ids import RING, IdAccumulator, hashed_bucket

# ---- integer frequency sketch -----------------------------------------------------------------


def _sketch(values: np.ndarray, exact: int = 64, hashed: int = 32, path: str | None = None) -> tw.IdStats:
    acc = IdAccumulator(torch.device("cpu"), exact, hashed, path=path)
    acc.add(torch.from_numpy(values))
    return tw.IdStats.from_state(acc.take().wait()[0].numpy(), exact, hashed)


def _oracle_counts(values: np.ndarray, exact: int, hashed: int) -> np.ndarray:
    counts = np.zeros(exact + hashed, dtype=np.int64)
    for v in values.tolist():
        counts[v if 0 <= v < exact else exact + hashed_bucket(v, hashed)] += 1
    return counts


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.integers(-3, 80), st.integers(-(2**63), 2**63 - 1)), min_size=1, max_size=300))
def test_id_sketch_counts_match_a_python_oracle(values):
    """Every path: the C pass, numpy (CPU without the extension) and torch ops (the device path)."""
    v = np.array(values, dtype=np.int64)
    for path in ("c", "numpy", "torch"):
        s = _sketch(v, path=path)
        assert s.count == len(v) and s.min == v.min() and s.max == v.max()
        np.testing.assert_array_equal(s.counts, _oracle_counts(v, 64, 32))
        assert s.top1_fraction == pytest.approx(_oracle_counts(v, 64, 32).max() / len(v))


def test_id_sketch_top_values_distinct_estimate_and_merge():
    rng = np.random.default_rng(0)
    v = np.concatenate([np.zeros(500, dtype=np.int64), rng.integers(100, 30000, 1500), np.full(300, 5000)])
    s = _sketch(rng.permutation(v), exact=1024, hashed=1024)
    top = s.top(3)
    assert top[0] == (0, 500, True)  # padding id, counted exactly
    assert top[1][0] in (5000, None) and top[1][1] >= 300 and top[1][2] is False  # hashed: an upper bound
    true_distinct = len(np.unique(v))
    assert abs(s.distinct - true_distinct) / true_distinct < 0.1
    a, b = _sketch(v[:900], 1024, 1024), _sketch(v[900:], 1024, 1024)
    merged = a.merge(b)
    np.testing.assert_array_equal(merged.counts, _sketch(v, 1024, 1024).counts)
    assert merged.count == len(v) and merged.min == v.min() and merged.max == v.max()


@pytest.mark.parametrize("path", ["c", "numpy", "torch"])
def test_id_sketch_ring_names_recent_values(path):
    acc = IdAccumulator(torch.device("cpu"), 4, 8, path=path)
    for i in range(40):
        acc.add(torch.full((3,), 1000 + i))
    s = tw.IdStats.from_state(acc.take().wait()[0].numpy(), 4, 8)
    assert len(s.recent) == min(40 * 3, RING) and set(s.recent) == set(range(1000, 1040))


# ---- input monitors through a watch -------------------------------------------------------------


class Tagger(nn.Module):
    """Token ids (and an optional float feature tensor) in, per-token logits out."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(3000, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, input_ids, attention_mask=None, features=None):
        h = self.emb(input_ids)
        if features is not None:
            h = h + features.mean()
        return {"logits": self.head(h)}


def test_root_inputs_are_measured_by_name_with_oracles(quiet):
    model = Tagger()
    ids = torch.randint(0, 2000, (4, 16))
    mask = torch.ones(4, 16, dtype=torch.long)
    feats = torch.randn(4, 3, 5) * 2 + torch.tensor([1.0, -1.0, 0.5])[None, :, None]
    with tw.attach(model) as watch:
        model(ids, attention_mask=mask, features=feats)
        snap = watch.snapshot()
    assert set(snap.inputs) == {"<input>", "<input>.attention_mask", "<input>.features"}
    got = snap.inputs["<input>"].ids
    assert got.count == ids.numel() and got.min == ids.min() and got.max == ids.max()
    np.testing.assert_array_equal(got.counts, _oracle_counts(ids.numpy().ravel(), 1024, 1024))
    assert snap.inputs["<input>.attention_mask"].ids.top1_fraction == 1.0
    means = snap.inputs["<input>.features"].channel_means
    np.testing.assert_allclose(means, feats.mean(dim=(0, 2)).double().numpy(), rtol=1e-6)
    s = snap["<input>.features"]  # float inputs also get the statistics of any output
    assert s.count == feats.numel() and s.max == pytest.approx(float(feats.max()))


def test_nan_in_the_input_is_reported_as_arriving_with_the_input():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    x = torch.randn(2, 4)
    x[0, 1] = math.nan
    with tw.attach(model, on_nonfinite="ignore") as watch:
        model(x)
        snap = watch.snapshot()
        alert = watch.last_trip
    assert snap.nonfinite["0"].origin == "<input>"
    assert snap["<input>"].nan == 1
    assert "arrived with the model's input" in alert.message


def test_inputs_false_measures_no_input_and_bad_config_is_refused():
    model = nn.Linear(4, 4)
    with tw.attach(model, inputs=False) as watch:
        model(torch.randn(2, 4))
        assert "<input>" not in watch.snapshot() and watch.snapshot().inputs == {}
    with pytest.raises(tw.ConfigError, match="inputs="):
        tw.attach(model, inputs="yes")
    with pytest.raises(tw.ConfigError, match="exact_ids"):
        tw.InputMonitor(exact_ids=0)


# ---- output quality ------------------------------------------------------------------------------


def _quality_oracle(logits: np.ndarray, threshold: float) -> dict[str, float]:
    z = logits - logits.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    top2 = np.sort(p, -1)[:, ::-1][:, :2]
    ent = -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)).sum(-1)
    return {
        "confidence": top2[:, 0].mean(), "margin": (top2[:, 0] - top2[:, 1]).mean(), "entropy": ent.mean(),
        "normalized_entropy": (ent / np.log(p.shape[-1])).mean(), "abstention_rate": (top2[:, 0] < threshold).mean(),
    }  # fmt: skip


@pytest.mark.parametrize("path", ["c", "numpy", "torch"])
def test_output_quality_matches_plain_softmax_and_counts_classes(path):
    model = Tagger()
    ids = torch.randint(0, 2000, (6, 10))
    monitor = tw.OutputMonitor("logits", abstain_below=0.3)
    with tw.Watch(model, outputs=monitor, _device_path=path == "torch") as watch:
        watch.engine.monitor("outputs").accumulator.path = path
        with torch.no_grad():
            out = model(ids)["logits"]
            model(ids[:2])
        q = watch.snapshot().outputs
    logits = torch.cat([out.reshape(-1, 5), out[:2].reshape(-1, 5)]).double().numpy()
    assert q.rows == 80 and q.nonfinite == 0
    for name, value in _quality_oracle(logits, 0.3).items():
        assert getattr(q, name) == pytest.approx(value, rel=1e-5, abs=1e-7), name
    np.testing.assert_array_equal(q.classes.counts[:5], np.bincount(logits.argmax(-1), minlength=5))


def test_lm_head_last_position_and_nonfinite_rows_are_left_out():
    model = Tagger()
    ids = torch.randint(0, 2000, (3, 7))
    monitor = tw.OutputMonitor("logits", positions="last")
    with tw.Watch(model, outputs=monitor, on_nonfinite="ignore", _device_path=True) as watch:
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
    with pytest.warns(tw.TorchwatchWarning, match="no kept prediction"):
        assert watch.record_labels(["a", "zzz"], [[0, 1], [2]]) == 2
    assert watch.errors["labels:unknown trace id"] == 1
    assert watch.record_labels("a", [0, 1]) == 0  # a trace's labels count once
    watch.detach()
    with tw.attach(model) as plain, pytest.raises(tw.ConfigError, match="needs output monitoring"):
        plain.record_labels("a", [0])


def test_sampling_flushes_and_json_records_carry_inputs_outputs_and_timing(tmp_path):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    path = tmp_path / "stats.jsonl"
    with tw.attach(model, every=2, outputs=True, timing=True, flush_every=4, sinks=[tw.JsonlSink(path)]) as watch:
        for _ in range(8):
            model(torch.randn(5, 4))
        snap = watch.snapshot()
    assert snap.outputs.rows == 4 * 5  # sampled calls only
    assert set(snap.timing) == {"0", "1", "2"} and all(t.count == 4 and t.p50_ms > 0 for t in snap.timing.values())
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["outputs"]["rows"] for r in records] == [10, 10]
    assert records[0]["inputs"]["<input>"]["channel_means"]
    assert sum(r["timing"].get("2", {}).get("count", 0) for r in records) == 4  # read on the worker: may lag


def test_per_module_timing_sums_below_the_root_call_time():
    model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(4)])
    with tw.attach(model, timing=True) as watch:
        for _ in range(20):
            model(torch.randn(64, 256))
        snap = watch.snapshot()
    assert sum(t.mean_ms for t in snap.timing.values()) <= snap.latency.mean_ms * 1.05
    with pytest.raises(tw.ConfigError, match="timing"):
        tw.attach(nn.Linear(2, 2), timing="yes")


# ---- default rules on preprocessing faults -------------------------------------------------------


def _images(n: int, rng: np.random.Generator) -> torch.Tensor:
    """RGB images in [0, 1] with channel means like natural photos (R > G > B)."""
    base = np.array([0.48, 0.45, 0.40])[None, :, None, None] + rng.normal(0, 0.08, (n, 3, 1, 1))
    return torch.from_numpy(np.clip(base + rng.normal(0, 0.2, (n, 3, 16, 16)), 0, 1)).float()


def _normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406])[None, :, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[None, :, None, None]
    return (x - mean) / std


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 10)
    ).eval()


def _run(model, watch, batches, fault=None) -> list[tw.Alert]:
    before = len(watch.alerts)
    with torch.no_grad():
        for x in batches:
            model(fault(x) if fault else x)
    watch.flush()
    return watch.alerts[before:]


@pytest.mark.parametrize(
    ("fault", "rule", "stat"),
    [
        (lambda x: _normalize(x * 255), "baseline_absmax", "absmax"),  # forgot to divide by 255
        (lambda x: _normalize(x.flip(1)), "input_shift", "channel_mean"),  # BGR fed to an RGB model
    ],
    ids=["x255", "channel-swap"],
)
def test_default_rules_catch_image_preprocessing_faults(quiet, fault, rule, stat):
    rng = np.random.default_rng(0)
    model = _cnn()
    watch = tw.attach(model, flush_every=5)
    clean = [_normalize(_images(8, rng)) for _ in range(5 * 40)]
    assert _run(model, watch, clean) == []  # 40 intervals: warm-up, then no false alarm
    found = _run(model, watch, [_images(8, rng) for _ in range(5 * 3)], fault)
    hits = [a for a in found if a.rule == rule and a.module == "<input>" and a.stat.startswith(stat)]
    assert hits, [(a.rule, a.module, a.stat) for a in found]
    watch.detach()


def _bert() -> nn.Module:
    cfg = transformers.BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, num_labels=3)  # fmt: skip
    return transformers.BertForSequenceClassification(cfg).eval()


def _tokens(rng: np.random.Generator, batch: int = 4, length: int = 32) -> dict[str, torch.Tensor]:
    ids = np.zeros((batch, length), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row in range(batch):
        n = int(rng.integers(12, length))
        ids[row, 0], ids[row, 1 : n - 1], ids[row, n - 1] = 101, rng.zipf(1.3, n - 2) % 900 + 100, 102
        mask[row, :n] = 1
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}


def _unk_surge(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A tokenizer whose vocabulary file went missing: most words become [UNK] (id 100)."""
    ids = batch["input_ids"].clone()
    words = ids > 102
    ids[words & (torch.rand(ids.shape) < 0.7)] = 100
    return {**batch, "input_ids": ids}


@pytest.mark.parametrize(
    "fault",
    [lambda b: {k: torch.zeros_like(v) for k, v in b.items()}, _unk_surge],
    ids=["padding-only", "unk-surge"],
)
def test_default_rules_catch_token_input_faults_on_bert(quiet, fault):
    rng = np.random.default_rng(1)
    model = _bert()
    watch = tw.attach(model, outputs="logits", flush_every=5)

    def call(batches, change=None):
        before = len(watch.alerts)
        with torch.no_grad():
            for b in batches:
                model(**(change(b) if change else b))
        watch.flush()
        return watch.alerts[before:]

    assert call([_tokens(rng) for _ in range(5 * 40)]) == []
    found = call([_tokens(rng) for _ in range(5 * 3)], fault)
    assert any(a.rule == "input_shift" and a.module == "<input>.input_ids" for a in found), [
        (a.rule, a.module, a.stat) for a in found
    ]
    assert "outputs" not in watch.errors
    watch.detach()


def test_default_rules_flag_a_drop_in_confidence(quiet):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    with torch.no_grad():
        model[2].weight.mul_(6)  # a confident classifier
    watch = tw.attach(model, outputs=True, flush_every=5)
    assert _run(model, watch, [torch.randn(16, 8) for _ in range(5 * 40)]) == []
    found = _run(model, watch, [torch.randn(16, 8) * 0.05 for _ in range(5 * 3)])  # inputs squashed: unsure
    stats = {a.stat for a in found if a.rule == "output_shift"}
    assert {"confidence", "normalized_entropy"} <= stats, stats
    watch.detach()


def test_edge_chart_false_alarm_rate_on_clean_channels_is_near_its_nominal_rate():
    """64 feature columns, 100 rows an interval, ARL 1000: the inflated warm-up spread keeps the
    measured rate near 1/1000 per series-interval (it was 8.8x that with the raw MAD)."""
    rng = np.random.default_rng(3)
    chart = tw.rules.EdgeChart(arl=1000)
    mu = rng.normal(0, 1, 64)
    alarms = charted = 0
    for t in range(1000):
        x = rng.normal(mu, 1.0, (100, 64))
        stats = {"<input>": tw.tensor_stats(torch.from_numpy(x))}
        inputs = {"<input>": tw.InputStats("float", 100, tuple(x.sum(0)))}
        alarms += len(chart.evaluate(tw.rules.Interval(t, 0.0, None, stats, inputs=inputs)))
        charted += 64 if t >= chart.warmup else 0
    assert alarms / charted < 2e-3, alarms
    found = []
    for t in range(1000, 1005):
        shifted = rng.normal(mu, 1.0, (100, 64))
        shifted[:, 5] += 0.5  # half an sd on one column
        stats = {"<input>": tw.tensor_stats(torch.from_numpy(shifted))}
        inputs = {"<input>": tw.InputStats("float", 100, tuple(shifted.sum(0)))}
        found += chart.evaluate(tw.rules.Interval(t, 0.0, None, stats, inputs=inputs))
    assert "channel_mean[5]" in [a.stat for a in found]


def test_report_shows_output_quality_latency_and_inputs(tmp_path):
    from torchwatch.cli import report

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with tw.attach(model, outputs=True, flush_every=5, sinks=[tw.JsonlSink(tmp_path / "s.jsonl")]) as watch:
        for i in range(20):
            with watch.context(trace_id=str(i)), torch.no_grad():
                y = model(torch.randn(6, 4))
            watch.record_labels(str(i), y.argmax(-1))
        snap = watch.snapshot()
    summary = report.summarize(report.load(tmp_path))
    out = summary["outputs"]
    assert out["rows"] == 120 and out["labelled"] == 120 and out["accuracy"] == 1.0
    assert out["confidence"] == pytest.approx(snap.outputs.confidence, rel=1e-9)
    assert out["ece"] == pytest.approx(snap.outputs.ece, rel=1e-9)  # pooled from the bins, not averaged
    assert summary["latency"]["calls"] == 20 and summary["inputs"][0]["input"] == "<input>"
    shown = report.text(summary)
    assert "Output quality:" in shown and "accuracy 100.00%" in shown and "Latency: 20 calls" in shown
    assert "channel means" in shown
    page = report.html_page(summary, report.load(tmp_path))
    assert "<figcaption>output confidence" in page and "<figcaption>latency p99 (ms)" in page


def test_a_constant_image_from_a_stuck_camera_is_caught(quiet):
    rng = np.random.default_rng(2)
    model = _cnn()
    watch = tw.attach(model, flush_every=5)
    assert _run(model, watch, [_normalize(_images(8, rng)) for _ in range(5 * 40)]) == []
    found = _run(model, watch, [torch.full((8, 3, 16, 16), 0.5) for _ in range(5 * 3)], _normalize)
    assert any(a.rule == "baseline_std" and a.module == "<input>" for a in found), [(a.rule, a.module) for a in found]
    watch.detach()


def test_an_exactly_constant_input_is_charted_not_skipped(quiet):
    """std 0 has no logarithm: the log-scale charts place it far below any baseline."""
    rng = np.random.default_rng(4)
    model = _cnn()
    watch = tw.attach(model, flush_every=5, rules=[tw.rules.ControlChart("std")])
    assert _run(model, watch, [_normalize(_images(8, rng)) for _ in range(5 * 40)]) == []
    found = _run(model, watch, [torch.full((8, 3, 16, 16), 0.25) for _ in range(5 * 2)])
    hits = [a for a in found if a.module == "<input>"]
    assert hits and hits[0].value == pytest.approx(1e-30)
    watch.detach()


def test_x255_on_a_small_tabular_input_is_caught_by_the_input_scale_chart(quiet):
    """16 features, one row a call, flushes of 20 calls: 320 input values an interval, below
    ControlChart's 4096, so only the edge chart's scale signal can see a missing normalisation."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3)).eval()
    watch = tw.attach(model, flush_every=20)
    assert _run(model, watch, [torch.rand(1, 16) for _ in range(20 * 35)]) == []
    found = _run(model, watch, [torch.rand(1, 16) for _ in range(20 * 2)], lambda x: x * 255)
    assert any(a.rule == "input_shift" and a.stat == "log_rms" for a in found), [(a.rule, a.stat) for a in found]
    watch.detach()


def test_edge_chart_false_alarms_on_clean_classifier_traffic(quiet):
    """Inputs, outputs and class mix of a clean MLP classifier, 3000 intervals at ARL 1000: the
    rate over all series stays under the nominal 1/1000 per series-interval (measured 0.34x)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    chart = tw.rules.EdgeChart(arl=1000)
    policy = tw.rules.AlertPolicy(cooldown=0, max_per_minute=10**9)
    intervals = 3000
    with tw.attach(model, outputs=True, flush_every=5, rules=[chart], alert_policy=policy) as watch:
        with torch.no_grad():
            for _ in range(intervals * 5):
                model(torch.randn(16, 8))
        watch.flush()
        alarms = len(watch.alerts)
    series = len(chart._series)
    assert series == 8 + 1 + 4 + 1  # channel means, log RMS, four output signals, class mix
    assert alarms / (series * (intervals - chart.warmup)) < 1e-3
