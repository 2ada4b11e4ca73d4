"""Step 3a, the query fit to the source's attention probabilities (queryfit.py), on tiny random models."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, tokens
from test_calibration import char_tokenizer
from test_refit import WINDOWS, calib  # noqa: F401  (fixture)

from mlaify import MLAConversionConfig, convert_to_mla
from mlaify.convert.calibration import collect_statistics
from mlaify.convert.queryfit import AttentionKL, fit_queries, query_weights, source_attention_probs
from mlaify.convert.source import ModelLayers
from mlaify.errors import MlaifyError


def layer_inputs(model, mla, ids):
    """Layer 0's normed inputs in the source and the MLA model, and its RoPE tables."""
    hidden = model.model.embed_tokens(ids)
    pe = ModelLayers(model).position_embeddings(0, hidden, torch.arange(ids.shape[1])[None])
    return model.model.layers[0].input_layernorm(hidden), mla.model.layers[0].input_layernorm(hidden), pe


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-bias", "qwen3", "gemma3", "phi3"])
@torch.no_grad()
def test_gradient_matches_finite_differences(name, calib):  # noqa: F811
    """The hand-written gradient (p' - p mapped back through W_UK and the inverse rotation), in float64."""
    path, windows = calib
    model = tiny_model(name)
    stats = collect_statistics(model, char_tokenizer, path, WINDOWS)
    mla = convert_to_mla(model, MLAConversionConfig(kv_budget=24), stats).double()
    model.double()
    x_src, x_mla, pe = layer_inputs(model, mla, windows[:2])
    attn = mla.model.layers[0].self_attn
    p = source_attention_probs(model.model.layers[0].self_attn, x_src, pe, attn.sliding_window).double()
    p /= p.sum(-1, keepdim=True)  # the gradient p' - p assumes each row sums to one: exactly, in float64
    kl = AttentionKL(attn, [p], [x_mla], pe)
    w = query_weights(attn).clone()
    loss, grad = kl(w)
    assert loss > 1e-3  # a lossy conversion: the probabilities differ
    direction = torch.randn(w.shape, generator=torch.Generator().manual_seed(0), dtype=w.dtype)
    eps = 1e-6
    numeric = (kl(w + eps * direction)[0] - kl(w - eps * direction)[0]) / (2 * eps)
    assert float((grad * direction).sum()) == pytest.approx(numeric, rel=1e-6)


# With qk-norm the fit maps each head's normed source query (d_h = 16 inputs), not the layer input
# (d = 64): less freedom, a smaller (still convex, still certain) gain.
@pytest.mark.parametrize(
    "name, gain", [("llama-gqa", 0.8), ("llama-mqa", 0.8), ("qwen2-bias", 0.8), ("gemma3", 0.9)]
)
def test_query_fit_lowers_the_kl_and_changes_only_queries(name, gain, calib):  # noqa: F811
    path, windows = calib
    model = tiny_model(name)
    stats = collect_statistics(model, char_tokenizer, path, WINDOWS)
    cfg = MLAConversionConfig(kv_budget=16, qk_rope_head_dim=4)
    plain = convert_to_mla(model, cfg, stats)
    fitted = convert_to_mla(model, cfg, stats)
    with torch.no_grad():
        x_src, x_mla, pe = layer_inputs(model, fitted, windows[:8])
        before, after = fit_queries(
            model.model.layers[0].self_attn, fitted.model.layers[0].self_attn, x_src, x_mla, pe
        )
    assert after < gain * before, (before, after)
    a, b = plain.model.layers[0].self_attn, fitted.model.layers[0].self_attn
    assert not torch.equal(query_weights(a), query_weights(b))
    for proj in ("q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")[
        a.n_key_scales == 0 :
    ]:  # the cache and the read-out are untouched
        assert torch.equal(getattr(a, proj).weight, getattr(b, proj).weight)


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-bias", "qwen3-sliding", "gemma3"])
def test_query_fit_keeps_an_exact_conversion_exact(name, calib):  # noqa: F811
    """Every pair rotary and full rank: the source's probabilities are already matched (KL ~ 0)."""
    path, windows = calib
    model = tiny_model(name)
    stats = collect_statistics(model, char_tokenizer, path, WINDOWS)
    n_kv = model.config.num_key_value_heads
    cfg = MLAConversionConfig(kv_lora_rank=n_kv * 16, rope_strategy="all", lowrank="attention")
    mla = convert_to_mla(model, cfg, stats, refit_windows=windows, compute_dtype="float32", query_fit=8)
    ids = tokens()
    with torch.no_grad():
        ref, got = model(ids).logits, mla(ids).logits
    assert (got - ref).abs().max() < 1e-3 * ref.abs().max()


def test_query_fit_needs_refit_windows():
    with pytest.raises(MlaifyError, match="between 0 and the 0 refit windows"):
        convert_to_mla(tiny_model("llama-gqa"), MLAConversionConfig(kv_budget=24), query_fit=4)
