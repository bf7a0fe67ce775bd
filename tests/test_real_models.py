"""Real architectures (transformers BERT and GPT-2 built from configs, no downloads)."""

from __future__ import annotations

import math

import pytest
import torch
from _oracle import assert_matches, oracle

import torchwatch as tw

transformers = pytest.importorskip("transformers")


def bert(**kw):
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                  vocab_size=500, max_position_embeddings=64, **kw)  # fmt: skip
    return transformers.BertModel(cfg).eval()


def gpt2(**kw):
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=500, n_positions=64, **kw)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _capture(model):
    """Plain forward hooks that keep each module's first float output: the oracle's input."""
    seen = {}

    def keep(name):
        def hook(module, args, out):
            t = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                seen[name] = t.detach().clone()

        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in model.named_modules() if n]
    return seen, handles


@pytest.mark.parametrize("build", [bert, gpt2], ids=["bert", "gpt2"])
@pytest.mark.parametrize("mode", ["eager", "inference_mode"])
def test_statistics_match_plain_hooks_and_outputs_are_untouched(build, mode):
    model = build()
    ids = torch.randint(0, 500, (2, 16))
    with torch.no_grad():
        want_out = model(ids)[0]
    seen, handles = _capture(model)
    with tw.attach(model) as watch:
        if mode == "inference_mode":
            with torch.inference_mode():
                out = model(ids)[0]
        else:
            with torch.no_grad():
                out = model(ids)[0]
        snap = watch.snapshot()
    for h in handles:
        h.remove()
    assert torch.equal(out, want_out)
    assert watch.errors == {}
    assert len(snap) >= len(watch.modules)
    for name in watch.modules:
        assert_matches(snap[name], oracle(seen[name]))


def test_gpt2_outputs_with_cache_objects_are_walked_without_errors():
    model = gpt2()
    with tw.attach(model, modules=lambda fqn, m: fqn in ("", "transformer", "transformer.h.0")) as watch, torch.no_grad():  # fmt: skip
        model(torch.randint(0, 500, (1, 8)), use_cache=True)
        snap = watch.snapshot()
    assert "transformer" in snap  # last_hidden_state, first field
    assert ".logits" in "".join(snap)  # the LM head output of the root ModelOutput
    assert watch.errors == {}


def test_nan_in_a_weight_is_traced_to_the_module_that_holds_it():
    model = gpt2()
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[0, 0] = math.nan
    with tw.attach(model, on_nonfinite="ignore") as watch, torch.no_grad():
        model(torch.randint(0, 500, (1, 8)))
        first = watch.snapshot().nonfinite
    assert {r.origin for r in first.values()} == {"transformer.h.1.mlp.c_fc"}
    assert "transformer.h.0.mlp.c_fc" not in first
    assert "lm_head" in first


def test_bfloat16_model_cast_counts_match_real_casts():
    model = bert().to(torch.bfloat16)
    seen, handles = _capture(model)
    with tw.attach(model, cast_dtypes=("float16", "float8_e4m3fn", "float8_e5m2")) as watch, torch.inference_mode():
        model(torch.randint(0, 500, (2, 16)))
        snap = watch.snapshot()
    for h in handles:
        h.remove()
    for name in ("encoder.layer.0.intermediate.dense", "encoder.layer.1.output.LayerNorm"):
        want = oracle(seen[name], cast_dtypes=("float16", "float8_e4m3fn", "float8_e5m2"))
        assert_matches(snap[name], want)
    assert sum(s.underflow["float8_e4m3fn"] for s in snap.values()) > 0  # real activations do hit fp8's floor
