"""Hostile files: every way in is a FormatError naming the file (exit 2 with one line on the
command line), never a traceback, a RecursionError or a process that blocks forever."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import torchwatch as tw
from torchwatch import _safetensors, cli
from torchwatch.cli import report

DEEP = "[" * 100_000 + "]" * 100_000
HUGE = "9" * 5000  # more digits than int() converts
FORMATS = {"stats": "torchwatch.jsonl/1", "incident": "torchwatch.incident/1", "comparison": "torchwatch.comparison/1"}


def _safetensors_with_header(path, header: bytes, data: bytes = b"") -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("torchwatch: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ---- nesting and huge integers ------------------------------------------------------------------


@pytest.mark.parametrize("payload", [DEEP, HUGE], ids=["deep", "huge-int"])
def test_json_everywhere_a_file_holds_it(tmp_path, payload):
    header = ('{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "__metadata__": ' + payload + "}").encode()
    _safetensors_with_header(tmp_path / "h.safetensors", header, b"\0\0\0\0")
    with pytest.raises(tw.FormatError, match="h.safetensors"):
        tw.Manifest.from_safetensors(tmp_path / "h.safetensors")
    (tmp_path / "m.json").write_text('{"format": "torchwatch.manifest/1", "tensors": ' + payload + "}")
    with pytest.raises(tw.FormatError, match="manifest .*m.json"):
        tw.Manifest.load(tmp_path / "m.json")
    (tmp_path / "x.index.json").write_text('{"weight_map": ' + payload + "}")
    with pytest.raises(tw.FormatError, match="x.index.json"):
        tw.Manifest.from_safetensors(tmp_path / "x.index.json")
    for kind, fmt in FORMATS.items():
        (tmp_path / f"{kind}.jsonl").write_text(json.dumps({"format": fmt})[:-1] + ', "x": ' + payload + "}\n")
    with pytest.raises(tw.FormatError, match="stats.jsonl' line 1"):
        report.load(tmp_path)
    with pytest.raises(tw.FormatError, match="incident.jsonl' line 1"):
        tw.IncidentLog.read(tmp_path / "incident.jsonl")
    with pytest.raises(tw.FormatError, match="comparison .*comparison.jsonl' line 1"):
        tw.Comparison.load(tmp_path / "comparison.jsonl")
    marker, skipped = tmp_path / tw.formats.RUN_MARKER, []
    marker.write_text('{"phases": ' + payload + "}")
    assert report._phases(str(marker), skipped) == [] and len(skipped) == 1  # skipped, said so; never raised


def test_metadata_fields_of_canaries_and_references(tmp_path):
    model = torch.nn.Linear(3, 2)
    tw.Canary.record(model, torch.ones(2, 3)).save(tmp_path / "c.safetensors")
    tensors, meta = _safetensors.load(tmp_path / "c.safetensors")
    for field, value in [("output_names", DEEP), ("input_keys", HUGE), ("tolerances", '{"min_top1": null}'),
                         ("tolerances", '{"rtol": "x"}'), ("tolerances", "[1]"), ("output_names", "[1, 2]")]:  # fmt: skip
        save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={**meta, field: value})
        with pytest.raises(tw.FormatError, match=f"bad.safetensors', metadata field '{field}'"):
            tw.Canary.load(tmp_path / "bad.safetensors")
    ref = tw.Reference.fit(torch.nn.Sequential(torch.nn.Linear(4, 4)), [torch.randn(64, 4) for _ in range(8)],
                           modules=["0"], window=8, resamples=100)  # fmt: skip
    ref.save(tmp_path / "r.safetensors")
    tensors, meta = _safetensors.load(tmp_path / "r.safetensors")
    for value in (DEEP, "[{}]", '[{"name": 1}]', '[{"name": "0", "resid_mean": "x", "resid_std": 1}]', "[]"):
        save_file(tensors, str(tmp_path / "bad_ref.safetensors"), metadata={**meta, "modules": value})
        with pytest.raises(tw.FormatError, match="bad_ref.safetensors"):
            tw.Reference.load(tmp_path / "bad_ref.safetensors")


def test_a_non_ascii_signature_or_a_bad_one_is_a_format_error(tmp_path):
    path = tmp_path / "m.json"
    tw.Manifest.from_model(torch.nn.Linear(2, 2)).save(path, key=b"k" * 32)
    doc = json.loads(path.read_text())
    for value in ("é" * 64, "x", 5, None):
        doc["signature"] = {"algorithm": "hmac-sha256", "value": value}
        path.write_text(json.dumps(doc))
        with pytest.raises(tw.FormatError, match="'signature' must be"):
            tw.Manifest.load(path, key=b"k" * 32)


# ---- files that are not files ----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_fifo_is_refused_without_blocking_wherever_a_file_is_read(tmp_path, capsys):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    readers = [
        lambda: tw.Manifest.from_safetensors(fifo),
        lambda: tw.verify_weights(fifo, tw.Manifest({})),
        lambda: tw.Manifest.load(fifo),
        lambda: tw.Canary.load(fifo),
        lambda: tw.Reference.load(fifo),
        lambda: tw.IncidentLog.read(fifo),
        lambda: tw.Comparison.load(fifo),
    ]
    for read in readers:
        with pytest.raises(tw.FormatError, match="pipe.safetensors' is a FIFO"):
            read()
    with pytest.raises(tw.ConfigError, match="is a FIFO"):
        tw.Manifest.from_model(torch.nn.Linear(2, 2)).save(tmp_path / "m.json", key=str(fifo))
    logs = tmp_path / "logs"
    logs.mkdir()
    os.mkfifo(logs / "stats.jsonl")
    os.symlink(logs / "gone.jsonl", logs / "dangling.jsonl")
    assert cli.main(["report", str(logs)]) == 2
    err = _one_line_error(capsys)
    assert "holds no torchwatch log" in err and "not a regular file" in err


# ---- the report command ------------------------------------------------------------------------------


def _stats_log(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with tw.attach(model, sinks=[tw.JsonlSink(tmp_path / "s.jsonl")], rules=[]):
        model(torch.randn(2, 4))
    return tmp_path / "s.jsonl"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: [r], "line 2 is not a torchwatch statistics record"),
        (lambda r: {**r, "modules": "x"}, "line 2: field 'modules' must be an object"),
        (lambda r: {**r, "step": "abc"}, "line 2: field 'step' must be an integer, got the string 'abc'"),
        (lambda r: {**r, "calls": -1}, "field 'calls' must be a non-negative integer"),
        (lambda r: {**r, "modules": {"0": {"nan": 1.5}}}, "modules.'0': field 'nan' must be an integer"),
        (lambda r: {**r, "alerts": [{"rule": 3}]}, "alerts[0]: field 'rule' must be a string"),
        (lambda r: {**r, "drift": {"m": {"alarm": "yes"}}}, "drift.'m': field 'alarm' must be true or false"),
        (lambda r: {**r, "latency": {"count": "1"}}, "latency: field 'count' must be an integer"),
        (lambda r: {**r, "outputs": {"rows": 1, "confidence": "high"}}, "outputs: field 'confidence' must be a number"),
        (lambda r: {**r, "inputs": {"<input>": {"kind": "ids", "ids": {"top": [1]}}}}, "field 'top' must hold"),
    ],
)
def test_a_malformed_record_is_named_by_file_line_and_field(tmp_path, capsys, edit, message):
    path = _stats_log(tmp_path)
    record = json.loads(path.read_text().splitlines()[0])
    with open(path, "a") as f:
        f.write(json.dumps(edit(record)) + "\n")
    assert cli.main(["report", str(tmp_path)]) == 2
    assert message in _one_line_error(capsys)


def test_html_into_a_missing_directory_and_a_corrupt_event_file(tmp_path, capsys):
    _stats_log(tmp_path)
    assert cli.main(["report", str(tmp_path), "--html", str(tmp_path / "missing" / "r.html")]) == 2
    assert (
        "cannot write '" in _one_line_error(capsys) and "missing/r.html" in capsys.readouterr().err + "missing/r.html"
    )
    events = tmp_path / "tb"
    events.mkdir()
    (events / "events.out.tfevents.1.host").write_bytes(os.urandom(300))
    assert cli.main(["report", str(events)]) == 2  # nothing readable: not "NaN/Inf: none"
    assert "holds no readable torchwatch log" in _one_line_error(capsys)


# ---- writing the command line's outputs ---------------------------------------------------------------


def test_manifest_into_a_missing_directory_or_past_the_file_size_limit_exits_2_with_one_line(tmp_path, capsys):
    save_file({"w": torch.ones(64)}, str(tmp_path / "c.safetensors"))
    assert cli.main(["manifest", str(tmp_path / "c.safetensors"), "-o", str(tmp_path / "no" / "m.json")]) == 2
    assert f"cannot write '{tmp_path / 'no' / 'm.json'}': No such file or directory" in _one_line_error(capsys)
    script = textwrap.dedent(
        f"""
        import resource, sys
        from torchwatch import cli
        resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))  # a write past 100 bytes fails with EFBIG
        sys.exit(cli.main(["manifest", {str(tmp_path / "c.safetensors")!r}, "-o", {str(tmp_path / "m.json")!r}]))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("torchwatch: error: cannot write") and "Traceback" not in done.stderr
    assert not (tmp_path / "m.json").exists() and not list(tmp_path.glob("m.json.tmp*"))  # nothing half-written


# ---- any JSON at all ---------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
record_keys = st.sampled_from(["step", "time", "calls", "sampled", "modules", "alerts", "nonfinite", "errors", "drift",
                               "latency", "inputs", "outputs", "timing", "merged", "format"])  # fmt: skip


@given(doc=st.dictionaries(record_keys, json_values, max_size=8) | json_values)
def test_any_json_as_a_record_a_manifest_or_a_comparison_is_read_or_refused_with_a_format_error(doc):
    readers = [
        lambda d: tw.Record.from_json(d, "line"),
        lambda d: tw.Manifest.from_dict(d),
        lambda d: tw.Comparison.from_dict(d) if isinstance(d, dict) else tw.Comparison.from_dict({"x": d}),
        lambda d: tw.ModuleStats.from_dict(d if isinstance(d, dict) else {"nan": d}),
        lambda d: tw.Alert.from_dict(d if isinstance(d, dict) else {"rule": d}),
    ]
    for read in readers:
        try:
            read(doc)
        except tw.FormatError:
            pass


@given(header=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
@example(header=json.dumps({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}).encode())
@example(
    header=json.dumps({"b": {"dtype": "BF16", "shape": [8], "data_offsets": [0, 16]}, "__metadata__": {}}).encode()
)
def test_any_safetensors_header_is_read_or_refused_with_a_format_error(header, tmp_path_factory):
    path = tmp_path_factory.mktemp("h") / "x.safetensors"
    _safetensors_with_header(path, header, b"\0" * 16)
    try:
        header = _safetensors.read_header(path)
    except tw.FormatError as exc:
        refusal = str(exc)
    else:
        refusal = None
    if refusal is not None:
        assert "x.safetensors" in refusal  # a refusal names the file
        return
    # accepted: the safetensors library itself (the oracle) reads the same tensors from it
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        assert names == set(header.entries)
        for name in names:
            entry, tensor = header.entries[name], f.get_tensor(name)
            assert (str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape)) == (entry.dtype, entry.shape)
            assert entry.start + entry.nbytes <= header.file_size


phase_keys = st.sampled_from(["name", "call", "time", "x"])


@given(
    doc=json_values
    | st.fixed_dictionaries({"phases": json_values})
    | st.fixed_dictionaries({"phases": st.lists(st.dictionaries(phase_keys, json_values, max_size=4), max_size=4)})
)
def test_any_json_as_a_run_marker_gives_well_formed_phases_or_a_skipped_note(doc, tmp_path_factory):
    path = tmp_path_factory.mktemp("marker") / tw.formats.RUN_MARKER
    path.write_text(json.dumps(doc))
    skipped: list[str] = []
    phases = report._phases(str(path), skipped)
    for p in phases:  # what the HTML axis relies on: a name, and a call or a finite time
        assert isinstance(p["name"], str) and (p["call"] is not None or p["time"] is not None)
        assert p["call"] is None or (type(p["call"]) is int and p["call"] >= 0)
        assert p["time"] is None or math.isfinite(p["time"])
    entries = doc.get("phases") if isinstance(doc, dict) else None
    assert len(phases) + len(skipped) >= (len(entries) if isinstance(entries, list) else 0)


@pytest.mark.parametrize(
    ("save", "kind"),
    [
        (lambda p: torch.save({"w": torch.ones(3)}, p), "a zip archive (torch.save's format"),
        (lambda p: torch.save({"w": torch.ones(3)}, p, _use_new_zipfile_serialization=False), "a Python pickle"),
        (lambda p: __import__("numpy").save(open(p, "wb"), __import__("numpy").ones(3)), "a NumPy .npy array"),
    ],
    ids=["torch.save", "legacy torch.save", "npy"],
)
def test_a_checkpoint_in_another_format_is_named_as_such_not_called_corrupt(tmp_path, capsys, save, kind):
    path = tmp_path / "model.pth"
    save(path)
    with pytest.raises(tw.FormatError, match="not a safetensors file") as err:
        tw.Manifest.from_safetensors(path)
    assert kind in str(err.value) and "corrupt" not in str(err.value)
    assert "safetensors.torch.save_file" in str(err.value) and "Manifest.from_model" in str(err.value)
    assert cli.main(["manifest", str(path), "-o", str(tmp_path / "m.json")]) == 2
    assert kind in _one_line_error(capsys)
    assert not (tmp_path / "m.json").exists()
