"""Conversion invariants on tiny random models: exactness at full rank, GQA == MHA, error falls with rank."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_MODELS, tiny_model, tokens

from mlaify import MLAConversionConfig, MlaifyError, convert_to_mla
from mlaify.convert.convert import SourceGeometry, plan_geometry


def full_rank_config(model) -> MLAConversionConfig:
    src = SourceGeometry.of(model.config)
    return MLAConversionConfig(
        kv_lora_rank=min(src.num_kv_heads * src.head_dim, src.hidden_size), rope_strategy="all"
    )


@pytest.mark.parametrize("name", TINY_MODELS)
def test_full_rank_all_rope_reproduces_source(name):
    source = tiny_model(name)
    ids = tokens()
    with torch.no_grad():
        expected = source(ids).logits
        mla = convert_to_mla(source, full_rank_config(source))
        got = mla(ids).logits
    assert (got - expected).abs().max() < 1e-4


@pytest.mark.parametrize("name", ["llama-mha", "qwen2-bias"])
def test_full_rank_with_nope_dims_is_exact_in_the_latent(name):
    """With some dims NoPE, the full-rank SVD gives W_K_nope and W_V exactly (only RoPE removal differs)."""
    source = tiny_model(name)
    n_kv = source.config.num_key_value_heads
    mla = convert_to_mla(
        source, MLAConversionConfig(kv_lora_rank=min(64, n_kv * (12 + 16)), qk_rope_head_dim=4)
    )
    attn = mla.model.layers[0].self_attn
    w_uk, _ = attn._up_weights()
    w_dkv = attn.kv_a_proj_with_mqa.weight[: attn.kv_lora_rank]
    src_k = source.model.layers[0].self_attn.k_proj.weight.view(-1, 16, 64)
    nope = [d for d in range(16) if d not in (0, 1, 8, 9)]
    group = 4 // src_k.shape[0]
    for h in range(4):
        rebuilt = w_uk[h] @ w_dkv
        assert torch.allclose(rebuilt, src_k[h // group, nope], atol=1e-5)


def _mha_expansion(gqa):
    """The exact MHA model of a GQA one: each KV head repeated for its query group."""
    config = gqa.config
    group = config.num_attention_heads // config.num_key_value_heads
    mha = tiny_model("llama-gqa", num_key_value_heads=config.num_attention_heads)
    state = gqa.state_dict()
    for key, value in state.items():
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            state[key] = value.view(config.num_key_value_heads, -1, value.shape[-1]).repeat_interleave(
                group, 0
            )
            state[key] = state[key].reshape(-1, value.shape[-1])
    mha.load_state_dict(state)
    return mha


def test_gqa_and_its_mha_expansion_convert_to_the_same_model():
    gqa = tiny_model("llama-gqa")
    mha = _mha_expansion(gqa)
    ids = tokens()
    with torch.no_grad():
        assert (gqa(ids).logits - mha(ids).logits).abs().max() < 1e-5
        for rank in (8, 20):
            cfg = MLAConversionConfig(kv_lora_rank=rank, qk_rope_head_dim=4)
            a = convert_to_mla(gqa, cfg)(ids).logits
            b = convert_to_mla(mha, cfg)(ids).logits
            assert (a - b).abs().max() < 1e-4, rank


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-bias"])
def test_logit_error_falls_as_rank_grows(name):
    source = tiny_model(name)
    ids = tokens()
    with torch.no_grad():
        expected = source(ids).logits
        errors = [
            (
                convert_to_mla(source, MLAConversionConfig(kv_lora_rank=r, qk_rope_head_dim=8))(ids).logits
                - expected
            )
            .pow(2)
            .mean()
            .item()
            for r in (4, 12, 24, 40)
        ]
    assert errors == sorted(errors, reverse=True), errors
    assert errors[-1] < errors[0] / 4


def test_budget_and_reduction_pick_the_rank():
    src = SourceGeometry.of(tiny_model("llama-gqa").config)  # 2 kv heads x 16: 64 values per token per layer
    assert (
        plan_geometry(src, MLAConversionConfig(kv_budget=32, qk_rope_head_dim=4)).kv_lora_rank == 32 - 2 * 4
    )
    assert (
        plan_geometry(src, MLAConversionConfig(kv_reduction=0.75, qk_rope_head_dim=2)).kv_lora_rank
        == 16 - 2 * 2
    )
    plan = plan_geometry(src, MLAConversionConfig(kv_lora_rank=10))
    assert (plan.qk_rope_head_dim, plan.n_rope_heads) == (4, 2)  # default: a quarter of the head dim
    plan = plan_geometry(src, MLAConversionConfig(kv_budget=8))  # the default 2 x 4 would fill it
    assert (plan.qk_rope_head_dim, plan.kv_lora_rank) == (2, 4)  # rope capped at half the budget


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kv_lora_rank=500), "above the maximum"),
        (dict(kv_lora_rank=8, qk_rope_head_dim=3), "even number"),
        (dict(kv_lora_rank=8, qk_rope_head_dim=16), "too large"),
        (dict(kv_budget=8, qk_rope_head_dim=4), "no room for the latent"),
        (dict(kv_lora_rank=8, kv_budget=20), "only one of"),
        (dict(kv_reduction=1.5), "kv_reduction must be in"),
        (dict(rope_strategy="middle"), "unknown rope strategy"),
    ],
)
def test_bad_conversion_options_raise_one_clear_error(kwargs, message):
    with pytest.raises(MlaifyError, match=message):
        convert_to_mla(tiny_model("llama-gqa"), MLAConversionConfig(**kwargs))


def test_unsupported_model_type_lists_the_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(MlaifyError, match="not supported; supported: llama, mistral, qwen2"):
        convert_to_mla(gpt2)


def test_output_dtype():
    mla = convert_to_mla(tiny_model("llama-gqa"), MLAConversionConfig(kv_lora_rank=8, dtype="bfloat16"))
    assert next(mla.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(mla(tokens()).logits).all()
