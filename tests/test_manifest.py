"""Weight manifests against independent oracles: hashlib over the bytes safetensors itself reads."""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import torchwatch as tw
from torchwatch._files import atomic_write
from torchwatch.integrity import _hashing
from torchwatch.integrity._progress import Progress

transformers = pytest.importorskip("transformers")
KEY = b"k" * 32


def _oracle(path: str) -> dict[str, str]:
    """sha256 of each tensor's bytes as the safetensors library reads them."""
    with safe_open(path, framework="pt") as f:
        return {
            k: hashlib.sha256(f.get_tensor(k).reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
            for k in f.keys()  # noqa: SIM118 - safe_open has no __iter__
        }


def _bert_mlm():
    cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=120,
        max_position_embeddings=64,
    )  # fmt: skip
    return transformers.BertForMaskedLM(cfg).eval()


def _gpt2():
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=120, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("make", [_bert_mlm, _gpt2], ids=["bert-mlm", "gpt2"])
def test_model_and_save_pretrained_file_give_the_same_manifest(make, tmp_path):
    model = make()
    model.save_pretrained(tmp_path)
    from_model = tw.Manifest.from_model(model)
    from_file = tw.Manifest.from_safetensors(tmp_path / "model.safetensors")
    assert from_model.tensors == from_file.tensors
    # the model's manifest also records its ties, which a file cannot: the digests cover them, so
    # they differ; seen as this model, the file's manifest is the model's
    assert from_model.digest != from_file.digest
    assert from_file.for_model(model).digest == from_model.digest
    assert {n: e.sha256 for n, e in from_file.tensors.items()} == _oracle(str(tmp_path / "model.safetensors"))
    # tied weights are hashed once and recorded as aliases of the name the file keeps
    tied = model._tied_weights_keys
    assert from_model.aliases == dict(tied)
    assert tw.verify_weights(model, from_file).ok
    assert tw.verify_weights(tmp_path, from_model).ok
    report = tw.verify_weights(model, from_file)
    assert set(report.aliased) == set(tied)


def test_sharded_checkpoint_by_directory_index_and_list(tmp_path):
    model = _gpt2()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    index = tmp_path / "model.safetensors.index.json"
    shards = sorted(str(p) for p in tmp_path.glob("*.safetensors"))
    assert index.exists() and len(shards) > 2
    digest = tw.Manifest.from_safetensors(tmp_path).digest
    assert tw.Manifest.from_safetensors(index).digest == digest
    assert tw.Manifest.from_safetensors(shards).digest == digest
    assert tw.Manifest.from_safetensors(index).for_model(model).digest == tw.Manifest.from_model(model).digest


def test_one_changed_byte_is_named(tmp_path):
    model = _bert_mlm()
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    manifest = tw.Manifest.from_safetensors(path)
    header = json.loads(path.read_bytes()[8 : 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]])
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    name = "bert.encoder.layer.1.attention.self.value.weight"
    offset = 8 + n + header[name]["data_offsets"][0] + 101
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    report = tw.verify_weights(path, manifest)
    assert not report.ok and report.mismatched == [name]
    assert not (report.missing or report.unexpected or report.shape_changed or report.dtype_changed)
    with pytest.raises(
        tw.IntegrityError, match="1 with different bytes: 'bert.encoder.layer.1.attention.self.value.weight'"
    ) as err:
        tw.verify_weights(path, manifest, raise_on_failure=True)
    assert err.value.report.mismatched == [name]


def test_strict_false_half_loaded_model_fails_with_the_unloaded_tensors_named(tmp_path):
    good = _bert_mlm()
    manifest = tw.Manifest.from_model(good)
    state = good.state_dict()
    half = {k: v for i, (k, v) in enumerate(state.items()) if i % 2 == 0}
    torch.manual_seed(123)
    loaded = _bert_mlm()
    loaded.load_state_dict(half, strict=False)
    report = tw.verify_weights(loaded, manifest)
    assert not report.ok
    randomly_initialised = {k for k in state if k not in half and k in manifest.tensors}
    # LayerNorm weights/biases start at 1/0 in both models, so they match even unloaded
    same_init = {k for k in randomly_initialised if torch.equal(state[k], loaded.state_dict()[k])}
    assert set(report.mismatched) == randomly_initialised - same_init
    assert report.mismatched


def test_missing_unexpected_shape_and_dtype_changes():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    manifest = tw.Manifest.from_model(model)
    other = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 2), torch.nn.Linear(2, 2))
    other[1].bias.data = model[1].bias.data.clone().double()
    report = tw.verify_weights(other, manifest)
    assert report.shape_changed == {"0.weight": ((3, 4), (5, 4)), "0.bias": ((3,), (5,)), "1.weight": ((2, 3), (2, 5))}
    assert report.dtype_changed == {"1.bias": ("float32", "float64")}
    assert report.unexpected == ["2.bias", "2.weight"]
    del other[2]
    other = torch.nn.Sequential(other[0])
    assert tw.verify_weights(other, manifest).missing == ["1.bias", "1.weight"]
    ignored = tw.verify_weights(torch.nn.Sequential(model[0]), manifest, ignore=r"^1\.")
    assert ignored.ok and ignored.checked == 2


def test_broken_tie_is_a_mismatch():
    model = _gpt2()
    manifest = tw.Manifest.from_model(model)
    model.lm_head.weight = torch.nn.Parameter(model.transformer.wte.weight.detach().clone())
    report = tw.verify_weights(model, manifest)
    assert report.mismatched == ["lm_head.weight"] and not report.unexpected


def test_pinned_digest_and_hmac_signature(tmp_path):
    model = torch.nn.Linear(8, 8)
    path = tmp_path / "m.json"
    tw.Manifest.from_model(model).save(path, key=KEY)
    m = tw.Manifest.load(path, key=KEY)
    assert tw.verify_weights(model, path, key=KEY, expected_digest=m.digest).ok

    # an attacker who changes the weights and rewrites the manifest consistently, without the key
    with torch.no_grad():
        model.weight[0, 0] = 3.0
    forged = tw.Manifest.from_model(model).to_dict()
    forged["signature"] = json.loads(path.read_text())["signature"]
    path.write_text(json.dumps(forged))
    with pytest.raises(tw.IntegrityError, match="failed signature verification"):
        tw.Manifest.load(path, key=KEY)
    report = tw.verify_weights(model, path, key=KEY)
    assert not report.ok and "failed signature verification" in report.manifest_error
    assert not tw.verify_weights(model, path, expected_digest=m.digest).ok
    with pytest.raises(tw.IntegrityError, match="not the manifest that was pinned"):
        tw.verify_weights(model, path, expected_digest=m.digest, raise_on_failure=True)
    with pytest.raises(tw.IntegrityError, match="failed signature verification"):
        tw.Manifest.load(path, key=b"another key of 32 bytes.........")

    unsigned = tmp_path / "u.json"
    tw.Manifest.from_model(model).save(unsigned)
    with pytest.raises(tw.IntegrityError, match="is not signed but a key was given"):
        tw.Manifest.load(unsigned, key=KEY)
    keyfile = tmp_path / "key"
    keyfile.write_bytes(KEY)
    tw.Manifest.from_model(model).save(unsigned, key=str(keyfile))
    assert tw.Manifest.load(unsigned, key=str(keyfile)).signature
    with pytest.raises(tw.ConfigError, match="use at least 16 random bytes"):
        tw.Manifest.from_model(model).save(unsigned, key=b"short")
    with pytest.raises(tw.ConfigError, match="key file .*nokey' does not exist"):
        tw.Manifest.load(unsigned, key=str(tmp_path / "nokey"))


def test_edited_manifest_without_a_new_digest_is_rejected(tmp_path):
    path = tmp_path / "m.json"
    tw.Manifest.from_model(torch.nn.Linear(2, 2)).save(path)
    doc = json.loads(path.read_text())
    doc["tensors"]["weight"]["sha256"] = "0" * 64
    path.write_text(json.dumps(doc))
    with pytest.raises(tw.FormatError, match="was edited or damaged"):
        tw.Manifest.load(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(format="torchwatch.manifest/9"), "this torchwatch reads 'torchwatch.manifest/1'"),
        (lambda d: d.update(algorithm="md5"), "only 'sha256' is supported"),
        (lambda d: d.update(tensors=[]), "'tensors' must be an object"),
        (lambda d: d["tensors"]["weight"].update(dtype="float7"), "unknown dtype 'float7'"),
        (lambda d: d["tensors"]["weight"].update(shape=[-1]), "bad shape"),
        (lambda d: d["tensors"]["weight"].update(sha256="xyz"), "bad sha256"),
        (lambda d: d.update(digest=None), "'digest' must be 64 lowercase hex digits"),
        (lambda d: d.update(aliases={"a": "nowhere"}), "'aliases' must map names"),
    ],
)
def test_malformed_manifests(tmp_path, edit, message):
    path = tmp_path / "m.json"
    tw.Manifest.from_model(torch.nn.Linear(2, 2)).save(path)
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(tw.FormatError, match=message):
        tw.Manifest.load(path)


def test_unreadable_manifest_files(tmp_path):
    with pytest.raises(tw.FormatError, match="does not exist"):
        tw.Manifest.load(tmp_path / "none.json")
    (tmp_path / "bad.json").write_bytes(b"{\xff")
    with pytest.raises(tw.FormatError, match="manifest .*bad.json' is not UTF-8 text"):
        tw.Manifest.load(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(tw.FormatError, match="is not a JSON object"):
        tw.Manifest.load(tmp_path / "list.json")


def _write_raw(path, header: object, data: bytes, *, claimed: int | None = None) -> None:
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if claimed is None else claimed) + body + data)


@pytest.mark.parametrize(
    ("header", "data", "claimed", "message"),
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None, "is truncated: its tensors need"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12, None, "4 bytes after its last tensor"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 1 << 33, "header claims 8,589,934,592 bytes"),
        ({"a": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "unknown dtype 'F33'"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "needs 12 bytes but its data_offsets span 8"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "shape must be a list of non-negative"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, None, "data_offsets must be"),
        (
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
            b"\0" * 12, None, "overlaps the tensor before it",
        ),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, None, "4 bytes before tensor 'a' belong to no tensor"),
        ([1, 2], b"", None, "a JSON list, not an object"),
        ({"__metadata__": {"x": 1}}, b"", None, "__metadata__ must map strings to strings"),
    ],
)  # fmt: skip
def test_corrupt_safetensors_files(tmp_path, header, data, claimed, message):
    path = tmp_path / "bad.safetensors"
    _write_raw(path, header, data, claimed=claimed)
    with pytest.raises(tw.FormatError, match=message):
        tw.Manifest.from_safetensors(path)


def test_unreadable_checkpoints(tmp_path):
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(tw.FormatError, match="shorter than its 8-byte header length"):
        tw.Manifest.from_safetensors(tmp_path / "short.safetensors")
    with pytest.raises(tw.FormatError, match="does not exist"):
        tw.Manifest.from_safetensors(tmp_path / "none.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(tw.FormatError, match="holds no \\*.safetensors file"):
        tw.Manifest.from_safetensors(tmp_path / "empty")
    (tmp_path / "junk.safetensors").write_bytes(struct.pack("<Q", 2) + b"\xff\xfe")
    with pytest.raises(tw.FormatError, match="the safetensors header of .*junk.safetensors' is not UTF-8 text"):
        tw.Manifest.from_safetensors(tmp_path / "junk.safetensors")
    (tmp_path / "x.index.json").write_text('{"no": 1}')
    with pytest.raises(tw.FormatError, match="is not a safetensors index"):
        tw.Manifest.from_safetensors(tmp_path / "x.index.json")


def test_non_utf8_paths_are_named_in_messages(tmp_path):
    raw = os.fsencode(tmp_path) + b"/weights-\xff.safetensors"
    with pytest.raises(tw.FormatError) as err:
        tw.Manifest.from_safetensors(raw.decode("utf-8", "surrogateescape"))
    assert "weights-\\xff.safetensors" in str(err.value) and "does not exist" in str(err.value)
    save_file({"a": torch.ones(3)}, tmp_path / "plain.safetensors")
    os.rename(os.fsencode(tmp_path / "plain.safetensors"), raw)
    assert set(tw.Manifest.from_safetensors(os.fsdecode(raw)).tensors) == {"a"}


def test_duplicate_names_across_shards(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "1.safetensors")
    save_file({"a": torch.zeros(2)}, tmp_path / "2.safetensors")
    with pytest.raises(tw.FormatError, match="tensor 'a' is in both"):
        tw.Manifest.from_safetensors(tmp_path)


_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8, torch.uint8, torch.bool,
           torch.float8_e4m3fn, torch.int32]  # fmt: skip


@settings(max_examples=25, deadline=None)
@given(
    specs=st.lists(
        st.tuples(st.sampled_from(_DTYPES), st.lists(st.integers(0, 5), min_size=0, max_size=3)), min_size=1, max_size=6
    ),
    seed=st.integers(0, 2**16),
)
def test_file_and_memory_hashes_agree_with_hashlib_for_any_dtype_and_shape(specs, seed, tmp_path_factory):
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        f"t{i}": torch.randint(0, 255, shape, generator=gen, dtype=torch.uint8).to(dtype)
        for i, (dtype, shape) in enumerate(specs)
    }
    module = torch.nn.Module()
    for name, t in tensors.items():
        module.register_buffer(name, t)
    path = tmp_path_factory.mktemp("h") / "t.safetensors"
    save_file(tensors, path)
    from_file = tw.Manifest.from_safetensors(path, threads=3)
    assert {n: e.sha256 for n, e in from_file.tensors.items()} == _oracle(str(path))
    assert tw.Manifest.from_model(module, threads=1).digest == from_file.digest


def test_staged_path_used_for_accelerators_hashes_the_same_bytes(monkeypatch):
    """The piecewise copy through a staging buffer (the CUDA path) is exercised on CPU tensors."""
    monkeypatch.setattr(_hashing, "PIECE", 1000)
    items = [("a", torch.randn(3001)), ("b", torch.randn(7, 11).t()), ("c", torch.zeros(0))]
    expected = {n: hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest() for n, t in items}
    assert _hashing.hash_tensors(items, staged=True) == expected
    assert _hashing.hash_tensors(items) == expected


def test_meta_tensors_are_refused():
    with torch.device("meta"):
        model = torch.nn.Linear(3, 3)
    with pytest.raises(tw.ConfigError, match="load real weights first"):
        tw.Manifest.from_model(model)


def test_save_is_atomic(tmp_path):
    path = tmp_path / "m.json"
    path.write_text("previous")

    def half(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("{half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half)
    assert path.read_text() == "previous" and os.listdir(tmp_path) == ["m.json"]
    tw.Manifest.from_model(torch.nn.Linear(2, 2)).save(path)
    assert tw.Manifest.load(path).tensors.keys() == {"weight", "bias"}


def test_progress_is_drawn_on_a_terminal_only():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty, pipe = Tty(), io.StringIO()
    for stream in (tty, pipe):
        p = Progress("hashing", 2_000_000_000, stream=stream, min_total=0)
        p._last = -1.0
        p.update(1_000_000_000)
        p.close()
    assert "hashing: 1.0/2.0 GB  50%" in tty.getvalue() and pipe.getvalue() == ""
