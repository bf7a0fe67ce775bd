"""Replay: real faults captured by a real watch with sinks, replayed in a fresh process, culprit named.

Each fault is injected the way it happens in production: a NaN pixel in the request (data), an
fp16 attention layer whose scores overflow on a long input (precision), a weight whose exponent
bit flipped after loading (weights), a one-off corruption of an activation that a healthy replay
does not show (suspected hardware). Then hostile bundles, which must be ``FormatError`` s.
"""

from __future__ import annotations

import html as html_lib
import json
import math
import os
import pathlib
import subprocess
import sys
import warnings

import pytest
import torch
from _models import small_cnn, tiny_bert, tiny_gpt2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchwatch as tw
from torchwatch.capture import bundle

TESTS = pathlib.Path(__file__).parent
transformers_or_skip = pytest.mark.skipif(
    __import__("importlib").util.find_spec("transformers") is None, reason="needs transformers"
)


def _save_weights(model: torch.nn.Module, path: pathlib.Path) -> str:
    from safetensors.torch import save_model

    save_model(model, str(path))  # tied weights (GPT-2) are written once
    return str(path)


def _serve(model, logdir: pathlib.Path, batches, *, hook=None) -> str:
    """Serve ``batches`` under a watch with sinks and a capture; the first bundle written."""
    capture = tw.Capture(logdir / "captures", inputs=True)
    sinks = [tw.JsonlSink(logdir / "stats.jsonl"), tw.IncidentLog(logdir / "incidents.jsonl")]
    with tw.attach(model, sinks=sinks, capture=capture, on_nonfinite="ignore") as watch:
        for i, batch in enumerate(batches):
            if hook is not None:
                hook(i)
            with torch.no_grad(), watch.context(trace_id=f"req-{i}"):
                model(**batch) if isinstance(batch, dict) else model(batch)
    return tw.Incident.list(capture.directory)[0]


def _replay(bundle_path: str, spec: str, weights: str, *extra: str) -> tuple[int, dict]:
    """``torchwatch replay`` in a fresh process (the models' factories live in tests/_models.py)."""
    done = subprocess.run(
        [sys.executable, "-m", "torchwatch", "replay", bundle_path, "--model", spec, "--weights", weights, "--json",
         *extra], cwd=TESTS, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


def _report(logdir: pathlib.Path) -> str:
    done = subprocess.run([sys.executable, "-m", "torchwatch", "report", str(logdir)], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    return done.stdout


def test_a_nan_pixel_in_the_request_is_a_data_fault(tmp_path, quiet):
    model = small_cnn()
    weights = _save_weights(model, tmp_path / "cnn.safetensors")
    batches = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    batches[2][1, 0, 7, 9] = math.nan
    path = _serve(model, tmp_path / "run", batches)
    code, verdict = _replay(path, "_models:small_cnn", weights)
    assert code == 1 and verdict["culprit"] == "data" and verdict["module"] == "<input>"
    assert verdict["reproduced"] is True and verdict["bitwise"] is True
    assert "replayed: DATA at '<input>'" in _report(tmp_path / "run")
    html = tmp_path / "report.html"
    done = subprocess.run([sys.executable, "-m", "torchwatch", "report", str(tmp_path / "run"), "--json", "--html",
                           str(html)], capture_output=True, text=True, timeout=120)  # fmt: skip
    (captured,) = json.loads(done.stdout)["captures"]
    assert done.returncode == 1 and captured["call"] == 2 and captured["trace_id"] == "req-2"
    assert captured["verdict"]["culprit"] == "data" and captured["path"] == path
    page = html.read_text()
    assert "Captured incidents" in page and f"{pathlib.Path(path).name}</a>" in page and ".replay.json'>" in page
    assert "call 2: replay says data at '<input>'" in html_lib.unescape(page)  # in the verdict box at the top


@transformers_or_skip
def test_an_fp16_attention_overflow_on_a_long_input_is_a_precision_fault_naming_the_layer(tmp_path, quiet):
    model = tiny_bert()
    attention = model.encoder.layer[1].attention.self
    with torch.no_grad():  # a fine-tune whose layer-1 query/key grew large: fine in float32, not in float16
        attention.query.weight.mul_(3000.0)
        attention.key.weight.mul_(3000.0)
    weights = _save_weights(model, tmp_path / "bert.safetensors")
    model = model.half()
    ids = torch.randint(0, 500, (2, 200), generator=torch.Generator().manual_seed(0))
    path = _serve(model, tmp_path / "run", [{"input_ids": ids}])
    code, verdict = _replay(path, "_models:tiny_bert", weights)
    assert code == 1 and verdict["culprit"] == "precision", verdict["reason"]
    assert verdict["module"] == "encoder.layer.1.attention.self"  # the first module whose output overflowed
    assert verdict["reproduced"] is True


@transformers_or_skip
def test_a_weight_corrupted_after_loading_is_a_weights_fault_naming_the_tensor(tmp_path, quiet):
    model = tiny_gpt2()
    weights = _save_weights(model, tmp_path / "gpt2.safetensors")
    ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(1))
    batches = [{"input_ids": ids}] * 4

    def flip(i: int) -> None:
        if i == 2:  # a bit flip in a weight's exponent while serving (bits of the float32, as int32)
            with torch.no_grad():
                model.transformer.h[1].mlp.c_fc.weight.view(torch.int32)[3, 7] ^= 0x40000000

    path = _serve(model, tmp_path / "run", batches, hook=flip)
    code, verdict = _replay(path, "_models:tiny_gpt2", weights)
    assert code == 1 and verdict["culprit"] == "weights", verdict["reason"]
    assert verdict["tensor"] == "transformer.h.1.mlp.c_fc.weight" and verdict["reproduced"] is False
    assert len(tw.Incident.list(tmp_path / "run" / "captures")) == 2  # every call after the flip faulted
    assert "replayed: WEIGHTS" in _report(tmp_path / "run")


@transformers_or_skip
def test_a_one_off_activation_corruption_is_a_suspected_hardware_fault(tmp_path, quiet):
    model = tiny_bert()
    weights = _save_weights(model, tmp_path / "bert.safetensors")
    state = {"call": -1}

    def flaky(module, args, output):  # a device that computed one wrong value on one call
        if state["call"] == 3:
            output = output.clone()
            output[0, 5, 17] = math.nan
            return output
        return None

    model.encoder.layer[0].intermediate.dense.register_forward_hook(flaky)
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(2))
    path = _serve(model, tmp_path / "run", [{"input_ids": ids}] * 5, hook=lambda i: state.update(call=i))
    code, verdict = _replay(path, "_models:tiny_bert", weights)
    assert code == 1 and verdict["culprit"] == "hardware", verdict["reason"]
    assert verdict["reproduced"] is False and verdict["module"] == "encoder.layer.0.intermediate.dense"
    assert verdict["bitwise"] is False  # the served outputs held the corruption's NaN; the replay's do not


def test_a_healthy_call_captured_by_hand_finds_nothing_and_exits_0(tmp_path, quiet):
    model = small_cnn()
    weights = _save_weights(model, tmp_path / "cnn.safetensors")
    capture = tw.Capture(tmp_path / "captures", inputs=True)
    with tw.attach(model, capture=capture) as watch:
        watch.capture("req-1")
        with torch.no_grad(), watch.context(trace_id="req-1"):
            model(torch.randn(2, 3, 16, 16))
    (path,) = tw.Incident.list(capture.directory)
    code, verdict = _replay(path, "_models:small_cnn", weights, "--no-save")
    assert code == 0 and verdict["culprit"] == "none" and verdict["bitwise"] is True
    assert not os.path.exists(path + ".replay.json")


def test_the_replay_notes_a_sandbox_whose_weights_are_not_the_validated_ones(tmp_path, quiet):
    model = small_cnn()
    manifest = tw.Manifest.from_model(model)
    x = torch.randn(2, 3, 16, 16)
    x[0, 0, 0, 0] = math.inf
    path = _serve(model, tmp_path / "run", [x])
    other = small_cnn()
    with torch.no_grad():
        other[0][0].weight.add_(1.0)
    report = tw.Incident.load(path).replay(other, manifest=manifest)
    assert report.culprit == "data" and any("do not match the manifest" in n for n in report.notes)
    assert "CULPRIT: DATA" in report.summary() and report.found


# ---- hostile bundles ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_bundle(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("good")
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    capture = tw.Capture(tmp / "c", inputs=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tw.TorchwatchWarning)  # the bundle's announcement
        with tw.attach(model, capture=capture, on_nonfinite="ignore"):
            with torch.no_grad():
                model(torch.tensor([[math.nan, 1.0, 2.0]]))
    (path,) = tw.Incident.list(capture.directory)
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        meta = json.loads(f.metadata()["meta"])
    return path, tensors, meta


def _write(tmp_path, tensors, meta_text, fmt=bundle.FORMAT) -> str:
    from safetensors.torch import save_file

    path = str(tmp_path / "b.safetensors")
    save_file(tensors, path, metadata={"format": fmt, "meta": meta_text})
    return path


def _edited(meta, **changes):
    return json.dumps({**meta, **changes})


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t, m: (t, _edited(m, trigger=None)), "trigger"),
        (lambda t, m: (t, _edited(m, call="3")), "call"),
        (lambda t, m: (t, _edited(m, inputs={"tuple": [{"tensor": 7}]})), "does not hold"),
        (lambda t, m: ({**t, "input/9": torch.zeros(2)}, json.dumps(m)), "not in its story"),
        (lambda t, m: (t, "{not json"), "not valid JSON"),
        (lambda t, m: (t, json.dumps(m) + " " * (bundle.MAX_META_BYTES + 1)), "more than"),
        (lambda t, m: (t, _edited(m, inputs=_deep(40))), "too deep"),
        (lambda t, m: (t, _edited(m, inputs={"dict": [["args", {"float": "1e999"}]]})), "float"),
        (lambda t, m: (t, _edited(m, stats={"0": {"count": -1}})), "stats"),
    ],
)
def test_edited_bundles_are_format_errors(good_bundle, tmp_path, edit, match):
    _, tensors, meta = good_bundle
    t, text = edit(dict(tensors), meta)
    with pytest.raises(tw.FormatError, match=match):
        tw.Incident.load(_write(tmp_path, t, text))


def _deep(n: int) -> dict:
    node: dict = {"value": 1}
    for _ in range(n):
        node = {"list": [node]}
    return node


def test_truncated_foreign_and_wrong_format_files_are_format_errors(good_bundle, tmp_path):
    path, tensors, meta = good_bundle
    data = pathlib.Path(path).read_bytes()
    for i, blob in enumerate((data[: len(data) // 2], data[:7], b"PK\x03\x04 a zip", b"")):
        p = tmp_path / f"t{i}.safetensors"
        p.write_bytes(blob)
        with pytest.raises(tw.FormatError):
            tw.Incident.load(p)
    with pytest.raises(tw.FormatError, match="not an incident bundle"):
        tw.Incident.load(_write(tmp_path, tensors, json.dumps(meta), fmt="torchwatch.canary/1"))
    with pytest.raises(tw.FormatError, match="does not exist"):
        tw.Incident.load(tmp_path / "missing.safetensors")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 10_000), junk=st.text(max_size=8), at=st.integers(0, 10_000))
def test_any_mangled_story_reads_or_is_a_format_error(good_bundle, tmp_path, cut, junk, at):
    _, tensors, meta = good_bundle
    text = json.dumps(meta)
    text = text[: at % (len(text) + 1)] + junk + text[at % (len(text) + 1) + cut % 7 :]
    try:
        incident = tw.Incident.load(_write(tmp_path, dict(tensors), text))
    except tw.FormatError:
        return
    assert incident.trigger.rule  # it read: its fields are the checked types
    repr(incident)


def test_the_command_line_answers_a_hostile_bundle_with_exit_2_and_one_line(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    done = subprocess.run([sys.executable, "-m", "torchwatch", "replay", str(bad), "--model", "_models:small_cnn"],
                          cwd=TESTS, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and done.stderr.startswith("torchwatch: error:")


def test_an_autocast_float16_overflow_replays_under_autocast_and_is_a_precision_fault(tmp_path, quiet):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    with torch.no_grad():
        model[0].weight.mul_(3e5)  # fine in float32; over float16's 65504 under autocast
    capture = tw.Capture(tmp_path / "c", inputs=True)
    with tw.attach(model, capture=capture, on_nonfinite="ignore"):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
            model(torch.ones(2, 8))
    incident = tw.Incident.load(tw.Incident.list(capture.directory)[0])
    assert incident.environment["autocast"] == "float16"
    report = incident.replay(model)  # no autocast block here: the replay sets the captured one
    assert report.culprit == "precision" and report.module == "0" and report.reproduced
    assert report.bitwise is True


class _WithCache(torch.nn.Module):
    """Returns its logits and an object a capture cannot store (as a KV cache is)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 3)

    def forward(self, x):
        return {"logits": self.linear(x), "cache": object()}


def test_outputs_the_capture_could_not_store_are_left_out_of_the_bitwise_comparison(tmp_path, quiet):
    model = _WithCache().eval()
    capture = tw.Capture(tmp_path / "c", inputs=True)
    with tw.attach(model, capture=capture) as watch:
        watch.capture("r")
        with torch.no_grad(), watch.context(trace_id="r"):
            model(torch.ones(1, 3))
    incident = tw.Incident.load(tw.Incident.list(capture.directory)[0])
    assert incident.meta["outputs"]["dict"][1] == ["cache", {"opaque": "object"}]
    report = incident.replay(model)
    assert report.bitwise is True and report.culprit == "none"


def test_inputs_far_outside_the_recent_healthy_range_are_a_data_fault_not_precision(tmp_path, quiet):
    """A preprocessing change that scales features by 255 x 100 overflows float16 in the first layer:
    finite inputs, a cast-overflow trigger; held against the last healthy calls' range, it is data."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    with torch.no_grad():
        model[0].weight.mul_(20.0)
    capture = tw.Capture(tmp_path / "c", inputs=True)
    g = torch.Generator().manual_seed(0)
    with tw.attach(model, capture=capture, on_nonfinite="ignore"):
        for i in range(41):
            x = torch.rand(2, 16, generator=g)  # features in [0, 1)
            if i == 40:
                x = x * 255 * 100  # the new preprocessing (within float16 itself: < 25,500)
            with torch.no_grad():
                model(x)
    incident = tw.Incident.load(tw.Incident.list(capture.directory)[0])
    assert incident.trigger.rule == "cast_overflow" and incident.call == 40  # judged when the call ended
    reference = incident.meta["input_reference"]["<input>"]
    assert reference["calls"] == 40 and reference["absmax_p99"] < 1.0
    report = incident.replay(model)
    assert report.culprit == "data" and report.module == "<input>" and "99th percentile" in report.reason
    short = incident.meta | {"input_reference": {"<input>": {**reference, "calls": 31}}}  # too few calls to say
    incident.meta = short
    assert incident.replay(model).culprit == "precision"


def test_the_report_reads_a_hostile_capture_index_and_verdict_without_a_traceback(good_bundle, tmp_path, capsys):
    from torchwatch import cli

    path, _, _ = good_bundle
    logdir = tmp_path / "logs"
    logdir.mkdir()
    (logdir / "b.safetensors").write_bytes(pathlib.Path(path).read_bytes())
    (logdir / "b.safetensors.replay.json").write_text(json.dumps({"format": "torchwatch.replay/1", "culprit": [1]}))
    lines = [
        {"format": "torchwatch.capture/1", "file": "b.safetensors", "rule": None, "module": 5, "call": "x"},
        {"format": "torchwatch.capture/1", "file": "../outside.safetensors"},
        {"format": "torchwatch.capture/1", "file": "gone.safetensors", "rule": "nonfinite", "module": "0"},
    ]
    (logdir / "captures.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert cli.main(["report", str(logdir)]) == 1
    out = capsys.readouterr().out
    assert "Captured incidents (2;" in out and "not replayed yet" in out and "(file gone)" in out
    assert cli.main(["report", str(logdir), "--json"]) == 1
    summary = json.loads(capsys.readouterr().out)
    assert any("not a replay verdict" in s for s in summary["skipped"])
