"""The in-memory fingerprint: torch twin and Triton kernel against a numpy uint64 oracle, and the
changes it must see (one bit, swapped chunks, cancelling edits) located to the right chunk."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchwatch as tw
from torchwatch.integrity import fingerprinting as fp_module
from torchwatch.kernels.fingerprint_ops import M1, M2, G, TorchMixer, as_words, position

CHUNK = 1 << 14
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _oracle_chunks(t: torch.Tensor, name: str, chunk_bytes: int) -> tuple[int, ...]:
    """Word mixing of the definition, in numpy uint64 (wrap-around is defined there)."""
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    raw += b"\0" * (-len(raw) % 8)
    w = np.frombuffer(raw, dtype="<u8")
    salt = fp_module._salt(name)
    out = []
    with np.errstate(over="ignore"):
        for c0 in range(0, len(w), chunk_bytes // 8):
            words = w[c0 : c0 + chunk_bytes // 8]
            p = np.uint64(position(salt, c0)) + np.arange(len(words), dtype=np.uint64)
            x = words ^ ((p + np.uint64(1)) * np.uint64(G))
            x = x * np.uint64(M1)
            x ^= x >> np.uint64(31)
            x = x * np.uint64(M2)
            x ^= x >> np.uint64(29)
            out.append(int(x.sum(dtype=np.uint64)))
    return tuple(out)


_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int64, torch.bool]


@settings(max_examples=30, deadline=None)
@given(
    dtype=st.sampled_from(_DTYPES),
    numel=st.one_of(st.integers(0, 40), st.integers(2040, 2060), st.integers(4090, 4110), st.integers(8100, 9000)),
    backend=st.sampled_from(["torch", "triton"]),
    seed=st.integers(0, 1000),
)
def test_both_backends_match_the_numpy_oracle(dtype, numel, backend, seed):
    gen = torch.Generator().manual_seed(seed)
    module = torch.nn.Module()
    module.register_buffer("x", torch.randint(0, 256, (numel,), generator=gen, dtype=torch.uint8).to(dtype).to(DEVICE))
    got = tw.fingerprint(module, chunk_bytes=CHUNK, backend=backend)
    assert got.tensors["x"].chunks == _oracle_chunks(module.x, "x", CHUNK)


def test_misaligned_views_are_read_from_their_own_bytes():
    base = torch.arange(1001, dtype=torch.int16, device=DEVICE)
    module = torch.nn.Module()
    module.register_buffer("v", base[3:])  # storage offset of 6 bytes: not word-aligned
    for backend in ("torch", "triton"):
        assert tw.fingerprint(module, chunk_bytes=CHUNK, backend=backend).tensors["v"].chunks == _oracle_chunks(
            base[3:], "v", CHUNK
        )


def _model() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(64, 200), torch.nn.LayerNorm(200), torch.nn.Linear(200, 64))
    model.register_buffer("table", torch.randn(5000), persistent=False)
    return model.eval()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_single_bit_flip_anywhere_is_located_to_its_chunk(backend):
    model = _model().to(DEVICE)
    base = tw.fingerprint(model, chunk_bytes=CHUNK, backend=backend)
    gen = torch.Generator().manual_seed(1)
    for name, t in [("0.weight", model[0].weight), ("1.bias", model[1].bias), ("table", model.table)]:
        raw = t.data.view(-1).view(torch.uint8)
        byte = int(torch.randint(0, raw.numel(), (1,), generator=gen))
        bit = int(torch.randint(0, 8, (1,), generator=gen))
        raw[byte] ^= 1 << bit
        changes = base.diff(tw.fingerprint(model, chunk_bytes=CHUNK, backend=backend))
        assert [(c.tensor, c.kind, c.chunk) for c in changes] == [(name, "bytes", byte // CHUNK)]
        assert changes[0].start <= byte < changes[0].end
        raw[byte] ^= 1 << bit
        assert tw.fingerprint(model, chunk_bytes=CHUNK, backend=backend) == base


def test_swapped_chunks_swapped_tensors_and_cancelling_edits_all_change_it():
    model = _model()
    base = tw.fingerprint(model, chunk_bytes=CHUNK)
    w = model[0].weight.data.view(-1)
    per_chunk = CHUNK // 4
    a, b = w[:per_chunk].clone(), w[per_chunk : 2 * per_chunk].clone()
    w[:per_chunk], w[per_chunk : 2 * per_chunk] = b, a
    assert sorted(c.chunk for c in base.diff(tw.fingerprint(model, chunk_bytes=CHUNK))) == [0, 1]
    w[:per_chunk], w[per_chunk : 2 * per_chunk] = a, b

    # swap two same-shaped tensors: every byte is still there, in the wrong place
    q, k = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    pair = torch.nn.ModuleDict({"q": q, "k": k})
    before = tw.fingerprint(pair, chunk_bytes=CHUNK)
    q.weight.data, k.weight.data = k.weight.data.clone(), q.weight.data.clone()
    assert {c.tensor for c in before.diff(tw.fingerprint(pair, chunk_bytes=CHUNK))} == {"q.weight", "k.weight"}

    # +d on one word and -d on another leaves a plain sum unchanged
    words = model.table.data.view(torch.int64)
    assert base == tw.fingerprint(model, chunk_bytes=CHUNK)
    plain_sum = int(words.sum())
    words[10] += 12345
    words[1000] -= 12345
    assert int(words.sum()) == plain_sum
    changes = base.diff(tw.fingerprint(model, chunk_bytes=CHUNK))
    assert [(c.tensor, c.chunk) for c in changes] == [("table", 0)]


def test_coverage_structure_changes_and_validation():
    model = _model()
    lm = torch.nn.Module()
    lm.emb = torch.nn.Embedding(10, 4)
    lm.head = torch.nn.Linear(4, 10, bias=False)
    lm.head.weight = lm.emb.weight  # tied: fingerprinted once
    assert list(tw.fingerprint(lm).tensors) == ["emb.weight"]
    base = tw.fingerprint(model)
    assert "table" in base.tensors  # non-persistent buffers are covered
    assert base.nbytes == sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    model[1] = torch.nn.LayerNorm(200).double()
    model.extra = torch.nn.Linear(2, 2)
    del model.table
    kinds = {(c.tensor, c.kind) for c in base.diff(tw.fingerprint(model))}
    assert kinds == {("1.weight", "dtype"), ("1.bias", "dtype"), ("table", "missing"), ("extra.weight", "added"),
                     ("extra.bias", "added")}  # fmt: skip
    with pytest.raises(tw.ConfigError, match="power of two >= 16384"):
        tw.fingerprint(model, chunk_bytes=1000)
    with pytest.raises(tw.ConfigError, match="backend='cuda' is not valid"):
        tw.fingerprint(model, backend="cuda")
    with pytest.raises(tw.ConfigError, match="different chunk sizes"):
        base.diff(tw.fingerprint(model, chunk_bytes=1 << 15))
    with torch.device("meta"):
        meta = torch.nn.Linear(2, 2)
    with pytest.raises(tw.ConfigError, match="without plain data"):
        tw.fingerprint(meta)
    assert tw.fingerprint(torch.nn.ReLU()).tensors == {}


def test_monitor_alerts_once_per_corruption_through_sinks_and_stops_on_detach(quiet):
    model = _model()
    sink = tw.MemorySink()
    watch = tw.attach(model, sinks=[sink])
    monitor = watch.verify_fingerprint_every(0.02)
    deadline = time.monotonic() + 30
    while monitor.checks == 0 and time.monotonic() < deadline:  # however busy the machine is
        time.sleep(0.01)
    assert monitor.checks > 0 and not monitor.changes and not watch.alerts
    with torch.no_grad():
        model[2].bias[3] += 1.0
    deadline = time.monotonic() + 30
    while not watch.alerts and time.monotonic() < deadline:
        time.sleep(0.02)
    alert = watch.alerts[0]
    assert (alert.rule, alert.module, alert.stat) == ("fingerprint", "2", "weights")
    assert "'2.bias' bytes 0-256 (chunk 0)" in alert.message
    checks = monitor.checks
    deadline = time.monotonic() + 30
    while monitor.checks < checks + 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len([a for a in watch.alerts if a.rule == "fingerprint"]) == 1  # not once per check
    model(torch.randn(2, 64))
    watch.flush()
    assert any(a.rule == "fingerprint" for r in sink.records for a in r.alerts)
    watch.detach()
    assert not monitor.running


def test_monitor_survives_failing_checks_and_validates(monkeypatch, quiet):
    model = _model()
    with tw.attach(model) as watch:
        with pytest.raises(tw.ConfigError, match="positive number of seconds"):
            watch.verify_fingerprint_every(0)
        baseline = tw.fingerprint(model)
        monitor = watch.verify_fingerprint_every(0.01, baseline=baseline)

        def broken(*args, **kwargs):
            raise RuntimeError("device lost")

        monkeypatch.setattr("torchwatch.monitors.fingerprint.fingerprint", broken)
        deadline = time.monotonic() + 30
        while monitor.errors < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert monitor.errors >= 2 and monitor.running
        assert model(torch.randn(1, 64)).shape == (1, 64)
    with pytest.raises(tw.ConfigError, match="needs an attached watch"):
        watch.verify_fingerprint_every(1)


def test_torch_mixer_blocks_do_not_change_the_sums():
    words = as_words(torch.randn(70001))
    a = TorchMixer(torch.device("cpu"), block=1 << 10).chunk_sums(words, 7, 1 << 13)
    b = TorchMixer(torch.device("cpu"), block=1 << 16).chunk_sums(words, 7, 1 << 13)
    assert a == b and len(a) == -(-words.numel() // (1 << 13))


def test_cached_chunk_table_follows_tensors_that_moved():
    model = _model().to(DEVICE)
    first = tw.fingerprint(model, chunk_bytes=CHUNK, backend="triton")
    assert tw.fingerprint(model, chunk_bytes=CHUNK, backend="triton") == first  # table reused
    model[0].weight.data = model[0].weight.data.clone()  # same bytes, another address
    assert tw.fingerprint(model, chunk_bytes=CHUNK, backend="triton") == first
    model[0].weight.data = model[0].weight.data.flip(0).contiguous()
    changed = {c.tensor for c in first.diff(tw.fingerprint(model, chunk_bytes=CHUNK, backend="triton"))}
    assert changed == {"0.weight"}


def test_a_fingerprint_read_back_from_its_dict_is_equal_and_a_malformed_one_is_a_format_error():
    model = torch.nn.Sequential(torch.nn.Linear(300, 200), torch.nn.LayerNorm(200))
    model.register_buffer("empty", torch.zeros(0))
    before = tw.fingerprint(model, chunk_bytes=1 << 14)
    again = tw.Fingerprint.from_dict(before.to_dict())
    assert again == before and again.diff(before) == []
    good = before.to_dict()
    bad_docs = [
        {**good, "chunk_bytes": 1000},  # not a power of two
        {**good, "tensors": {"0.weight": {**good["tensors"]["0.weight"], "dtype": "nn"}}},
        {**good, "tensors": {"0.weight": {**good["tensors"]["0.weight"], "shape": [200, -1]}}},
        {**good, "tensors": {"0.weight": {**good["tensors"]["0.weight"], "chunks": ["zz"] * 15}}},
        {**good, "tensors": {"0.weight": {**good["tensors"]["0.weight"], "chunks": ["0"] * 3}}},  # 240,000 B: 15
        {"tensors": {}},
    ]
    for doc in bad_docs:
        with pytest.raises(tw.FormatError):
            tw.Fingerprint.from_dict(doc)
