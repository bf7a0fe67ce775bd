"""The input monitor against plain torch oracles, and the default rules catching preprocessing,
input and confidence faults on real small models (images, tabular, BERT tokens)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import transformers
from _models import Tagger
from _oracle import assert_matches, false_alarm_bound, gamma, id_counts, oracle
from torch import nn

import torchwatch as tw
from torchwatch.monitors.inputs import channel_layout


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
    np.testing.assert_array_equal(got.counts, id_counts(ids.numpy().ravel(), 1024, 1024))
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


def test_channels_last_images_are_measured_whole(quiet):
    """A CNN served channels_last (the fast layout on CPUs and tensor cores; its conv outputs are
    channels_last too): the input's channel means equal a plain per-channel mean, and every
    output's statistics equal the float64 oracle of the very tensors the model produced."""
    rng = np.random.default_rng(5)
    images = [_normalize(_images(8, rng)).contiguous(memory_format=torch.channels_last) for _ in range(4)]
    model = _cnn().to(memory_format=torch.channels_last)
    seen: dict[str, list[torch.Tensor]] = {}
    for name, module in model.named_children():
        module.register_forward_hook(lambda m, args, out, name=name: seen.setdefault(name, []).append(out.clone()))
    with tw.attach(model, flush_every=100) as watch, torch.no_grad():
        for x in images:
            model(x)
        snap = watch.snapshot()
    assert images[0].is_contiguous(memory_format=torch.channels_last) and not images[0].is_contiguous()
    assert seen["0"][0].is_contiguous(memory_format=torch.channels_last)  # the conv kept the layout
    # float64 sums of the same float32 values in another order: they differ by at most
    # gamma_n (float64) x the sum of |x| (Higham), n the values per channel
    every = torch.cat(images).double()
    n = every.numel() // every.shape[1]
    bound = gamma(n, 2.0**-53) * every.abs().mean(dim=(0, 2, 3)).numpy()
    expected = every.mean(dim=(0, 2, 3)).numpy()
    assert np.all(np.abs(np.array(snap.inputs["<input>"].channel_means) - expected) <= 2 * bound)
    assert_matches(snap["<input>"], oracle(torch.cat([x.reshape(-1) for x in images])))
    for name, outs in seen.items():
        assert_matches(snap[name], oracle(torch.cat([o.reshape(-1) for o in outs])))


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
    # a 4 sd shift (the swap on these photos) takes four intervals on the model-wide budget
    found = _run(model, watch, [_images(8, rng) for _ in range(5 * 5)], fault)
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
    # a ~5 sd shift on a model-wide budget of ~140 series takes four intervals (docs/concepts.md)
    found = call([_tokens(rng) for _ in range(5 * 5)], fault)
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
    assert alarms <= false_alarm_bound(charted, 1 / 1000), alarms  # the advertised rate's 99.9% binomial quantile
    found = []
    for t in range(1000, 1005):
        shifted = rng.normal(mu, 1.0, (100, 64))
        shifted[:, 5] += 0.5  # half an sd on one column
        stats = {"<input>": tw.tensor_stats(torch.from_numpy(shifted))}
        inputs = {"<input>": tw.InputStats("float", 100, tuple(shifted.sum(0)))}
        found += chart.evaluate(tw.rules.Interval(t, 0.0, None, stats, inputs=inputs))
    assert "channel_mean[5]" in [a.stat for a in found]


def test_report_shows_output_quality_latency_and_inputs(tmp_path):
    from torchwatch.cli import report, report_html

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
    page = report_html.html_page(summary, report.load(tmp_path))
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


def _channel_sums_oracle(x: torch.Tensor) -> np.ndarray:
    return x.double().sum(dim=[d for d in range(x.dim()) if d != 1]).numpy()


LAYOUTS = [  # (shape, memory format): long rows, short rows (< 16 per channel), outer not a multiple of 8
    ((8, 3, 224, 224), torch.contiguous_format),
    ((8, 3, 224, 224), torch.channels_last),
    ((5, 7, 3), torch.contiguous_format),
    ((11, 4), torch.contiguous_format),
    ((3, 5, 17, 3, 2), torch.contiguous_format),
    ((3, 5, 7, 3, 2), torch.channels_last_3d),
    ((13, 6, 3, 5), torch.channels_last),
    ((2, 9, 33), torch.contiguous_format),
]


@pytest.mark.skipif(not tw.kernels.cpu.available, reason="the C kernel was not built")
@pytest.mark.parametrize(("shape", "fmt"), LAYOUTS)
@pytest.mark.parametrize("level", range(tw.kernels.cpu.simd_levels()[1] + 1))
def test_channel_sums_of_the_c_kernel_match_the_oracle_in_every_layout(shape, fmt, level):
    """Integers times powers of two sum exactly in float64 whatever the order, so the C loops
    must equal the oracle bit for bit: an element skipped, doubled or put in the wrong channel
    shows. Random normals then stay within float64's summation bound (gamma_n x sum |x|)."""
    g = torch.Generator().manual_seed(len(shape))
    exact = (torch.randint(-1000, 1000, shape, generator=g) * 2.0 ** torch.randint(-8, 8, shape, generator=g)).float()
    normal = torch.randn(shape, generator=g) * 3 + 1
    for x, bound in ((exact, 0.0), (normal, 1.0)):
        x = x.contiguous(memory_format=fmt)
        layout = channel_layout(x)
        assert layout is not None and (x.is_contiguous() or layout[2] == 1)
        sums = torch.full((shape[1],), 0.5, dtype=torch.float64)  # added to, not overwritten
        with tw.kernels.cpu.simd_level(level):
            tw.kernels.cpu.channel_sums(x.data_ptr(), *layout, sums.data_ptr(), False)
        expected = _channel_sums_oracle(x) + 0.5
        n = x.numel() // shape[1]
        tol = (
            bound
            * 2
            * gamma(n, 2.0**-53)
            * (x.double().abs().sum(dim=[d for d in range(x.dim()) if d != 1]).numpy() + 0.5)
        )
        assert np.all(np.abs(sums.numpy() - expected) <= tol), (shape, fmt, level)


def test_channel_means_are_the_same_through_the_c_loops_and_torch(monkeypatch, quiet):
    """The input monitor's channel means with the C loops and with torch's reduction (the path
    for other dtypes, devices and layouts), for row-major, channels-last and permuted inputs."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(4, 3, 20, 18, generator=g) * 2 - 0.3 for _ in range(3)]
    inputs = {
        "rows": batches,
        "channels_last": [b.contiguous(memory_format=torch.channels_last) for b in batches],
        "permuted": [b.permute(0, 1, 3, 2) for b in batches],  # neither layout: torch sums it
    }
    for label, xs in inputs.items():
        means = []
        for kernel in (tw.kernels.cpu.channel_sums, None):
            monkeypatch.setattr(tw.kernels.cpu, "channel_sums", kernel)
            with tw.attach(model) as watch:
                for x in xs:
                    model(x)
                means.append(np.array(watch.snapshot().inputs["<input>"].channel_means))
        every = torch.cat(xs)
        expected = _channel_sums_oracle(every) / (every.numel() // 3)
        bound = 2 * gamma(every.numel() // 3, 2.0**-53) * every.double().abs().mean(dim=(0, 2, 3)).numpy()
        for got in means:
            assert np.all(np.abs(got - expected) <= bound), label
