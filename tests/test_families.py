"""qk-norm (Qwen3, Gemma3) and sliding-window layers on tiny random models: what the cached key
scale and the rolling latent buffer must keep exact, and what is refused."""

from __future__ import annotations

import pytest
import torch
from conftest import attention_inputs, tiny_model, tokens
from transformers import AutoModelForCausalLM, DynamicCache

from mlaify import MLAConversionConfig, MlaifyError, convert_to_mla
from mlaify.convert.convert import convert_to_folder
from mlaify.export import to_deepseek_v3
from mlaify.geometry import kv_geometry
from mlaify.modeling import MlaifyConfig
from mlaify.modeling.cache_mlaify import Int8LatentCache, LatentCacheLayer, SlidingLatentCacheLayer


@pytest.fixture(scope="module", params=["qwen3-sliding", "gemma3"])
def mla(request):
    return convert_to_mla(tiny_model(request.param), MLAConversionConfig(kv_budget=24))


def test_the_budget_counts_the_key_scales(mla):
    """One key scale per KV head and token is part of the cache and of the budget."""
    n_kv = mla.config.text_config.num_key_value_heads
    attn = mla.model.layers[0].self_attn
    assert mla.config.num_key_scales == n_kv
    assert attn.kv_lora_rank + attn.n_rope_heads * attn.qk_rope_head_dim + n_kv == 24
    assert kv_geometry(mla.config)["kv_values_per_token_per_layer"] == 24


@pytest.mark.parametrize("S, padded", [(1, True), (3, True), (5, False), (17, False)])
def test_absorbed_decode_equals_expanded_attention_with_key_scales(mla, S, padded):
    attn = mla.model.layers[1].self_attn
    q_nope, q_rope, c_kv, k_rope, mask = attention_inputs(attn, S, padded)
    latent = c_kv[..., : attn.kv_lora_rank]
    with torch.no_grad():
        expanded = attn.attend_expanded(q_nope, q_rope, c_kv, k_rope, mask)
        absorbed = attn.attend_absorbed(q_nope, q_rope, c_kv, k_rope, mask)
        # the scales do act: all ones gives another result
        ones = attn.attend_expanded(
            q_nope,
            q_rope,
            torch.cat([latent, torch.ones_like(c_kv[..., attn.kv_lora_rank :])], -1),
            k_rope,
            mask,
        )
    assert (absorbed - expanded).abs().max() < 1e-5 * expanded.abs().max()
    assert (ones - expanded).abs().max() > 1e-2 * expanded.abs().max()


def test_sliding_layers_keep_only_their_window(mla):
    """After a 40-token prompt and 200 decoding steps (window 8), each sliding layer holds the last 7
    latents in a buffer that stopped growing, full layers hold all 240, and cached logits equal
    recomputing the whole sequence."""
    ids = tokens(batch=1, length=240, seed=3) % mla.config.vocab_size
    cache = DynamicCache(config=mla.config)
    with torch.no_grad():
        steps = [mla(ids[:, :40], cache=cache, use_cache=True).logits[:, -1]]
        allocated = []
        for t in range(40, 239):
            steps.append(mla(ids[:, t : t + 1], cache=cache, use_cache=True).logits[:, -1])
            allocated.append(cache.layers[0].nbytes()[1])
        steps.append(mla(ids[:, 239:], cache=cache, use_cache=True).logits[:, -1])
        full = mla(ids).logits[0, 39:]
    assert (torch.stack(steps, 1)[0] - full).abs().max() < 1e-4 * full.abs().max()
    types = mla.config.text_config.layer_types
    for layer, kind in zip(cache.layers, types, strict=True):
        sliding = kind == "sliding_attention"
        assert isinstance(layer, SlidingLatentCacheLayer if sliding else LatentCacheLayer)
        assert layer.keys.shape[-2] == (7 if sliding else 240)
        assert layer.get_seq_length() == 240
    assert max(allocated) == allocated[-1] == allocated[len(allocated) // 2]  # bounded, not growing
    row_bytes = cache.layers[0].stores[0].shape[-1] * 4
    assert allocated[-1] <= (40 + LatentCacheLayer.CHUNK) * row_bytes  # the prompt's first allocation


@pytest.mark.parametrize("name", ["qwen3-sliding", "gemma3"])
def test_beam_search_through_the_sliding_cache_equals_the_sources(name):
    """Beam search reorders the latent rows and drops them past the window: at full rank it finds
    the source's beams."""
    source = tiny_model(name)
    n_kv = source.config.num_key_value_heads
    mla = convert_to_mla(source, MLAConversionConfig(kv_lora_rank=n_kv * 16, rope_strategy="all"))
    ids = tokens(batch=1, length=12, seed=4)
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, num_beams=3, do_sample=False)
    with torch.no_grad():
        assert torch.equal(mla.generate(ids, **kwargs), source.generate(ids, **kwargs))


def test_refusals_are_one_line():
    mla = convert_to_mla(tiny_model("gemma3"), MLAConversionConfig(kv_budget=24))
    with pytest.raises(ValueError, match="int8"):
        MlaifyConfig(text_config=mla.config.text_config.to_dict(), qk_norm=True, latent_cache_dtype="int8")
    with pytest.raises(ValueError, match="key scales"), torch.no_grad():
        mla(tokens(), cache=Int8LatentCache(), use_cache=True)
    with pytest.raises(MlaifyError, match="normalises each key head"):
        to_deepseek_v3(mla)
    with pytest.raises(MlaifyError, match="attention_bias is not supported"):
        convert_to_mla(tiny_model("qwen3", attention_bias=True), MLAConversionConfig(kv_budget=24))
    with pytest.raises(MlaifyError, match="leaves no room for the latent.*key scales"):
        convert_to_mla(tiny_model("qwen3"), MLAConversionConfig(kv_budget=10, qk_rope_head_dim=4))
    partial = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5,
    }  # Phi-4-mini's kind
    with pytest.raises(MlaifyError, match="rotates only 0.5 of each head's dims"):
        convert_to_mla(tiny_model("phi3", rope_parameters=partial), MLAConversionConfig(kv_budget=24))
    with pytest.raises(MlaifyError, match="decoder layers unlike DeepSeek-V3's"):
        to_deepseek_v3(convert_to_mla(tiny_model("phi3"), MLAConversionConfig(kv_budget=24)))


def test_the_text_part_of_a_multimodal_gemma3_checkpoint_converts(tmp_path):
    """A `gemma3` (vision + text) checkpoint: its decoder converts from the folder, streamed, under
    the text model's names; at full rank the MLA model gives the multimodal model's text logits."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = tiny_model("gemma3").config.to_dict()
    config = Gemma3Config(
        text_config=text,
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28
        ),
        mm_tokens_per_image=4,
        image_token_index=95,
        boi_token_index=93,
        eoi_token_index=94,
    )
    torch.manual_seed(0)
    multimodal = Gemma3ForConditionalGeneration(config).eval()
    multimodal.save_pretrained(tmp_path / "src")
    (tmp_path / "out").mkdir()
    full = MLAConversionConfig(kv_lora_rank=16, rope_strategy="all")
    mla_config = convert_to_folder(tmp_path / "src", tmp_path / "out", full)
    assert mla_config.text_config.model_type == "gemma3_text"
    mla = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = tokens()
    with torch.no_grad():
        assert (mla(ids).logits - multimodal(input_ids=ids).logits).abs().max() < 1e-4
    with pytest.raises(MlaifyError, match="multimodal: its text part converts from a local safetensors"):
        convert_to_mla(multimodal, full)


@pytest.mark.parametrize("name", ["qwen3-sliding", "gemma3"])
def test_keep_sliding_converts_only_the_full_attention_layers(name, tmp_path):
    """--keep-sliding: sliding layers keep the source's attention and its stock sliding cache; the budget
    applies to the full-attention layers. At full rank the hybrid model is the source; a lossy one
    decodes past the window as it recomputes, streamed from disk as in memory."""
    source = tiny_model(name)
    n_kv = source.config.num_key_value_heads
    every_value = MLAConversionConfig(kv_lora_rank=n_kv * 16, rope_strategy="all", keep_sliding=True)
    full = convert_to_mla(source, every_value)
    assert full.config.source_attention_layers == [0, 2]
    assert [type(layer.self_attn).__name__ for layer in full.model.layers][1] == "MLAAttention"
    ids = tokens()
    with torch.no_grad():
        assert (full(ids).logits - source(ids).logits).abs().max() < 1e-4
    cfg = MLAConversionConfig(kv_budget=24, keep_sliding=True)
    mla = convert_to_mla(source, cfg)
    geometry = kv_geometry(mla.config)
    assert geometry["kv_values_per_token"] == 2 * (2 * n_kv * 16) + 24
    # Per token and layer the saving is small (two of three layers keep the source's cache), but the
    # sliding layers hold only their 8 tokens: at 4k context almost the whole cache is layer 1's.
    source_values = 2 * n_kv * 16
    saved = 1 - (2 * 8 * source_values + 4096 * 24) / (source_values * (2 * 8 + 4096))
    assert geometry["kv_reduction_at_4096"] == pytest.approx(saved, abs=1e-4)
    assert geometry["kv_reduction_at_4096"] > 2 * geometry["kv_reduction"]
    cache = DynamicCache(config=mla.config)
    with torch.no_grad():
        steps = [mla(ids[:1, :10], cache=cache, use_cache=True).logits[:, -1]]
        steps += [mla(ids[:1, t : t + 1], cache=cache, use_cache=True).logits[:, -1] for t in range(10, 23)]
        recomputed = mla(ids[:1, :23]).logits[0, 9:]
    assert (torch.stack(steps, 1)[0] - recomputed).abs().max() < 1e-4 * recomputed.abs().max()
    assert [type(layer).__name__ for layer in cache.layers] == [
        "DynamicSlidingWindowLayer",
        "LatentCacheLayer",
        "DynamicSlidingWindowLayer",
    ]
    source.save_pretrained(tmp_path / "src")
    (tmp_path / "out").mkdir()
    convert_to_folder(tmp_path / "src", tmp_path / "out", cfg)
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    mine, theirs = streamed.state_dict(), mla.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    with pytest.raises(MlaifyError, match="have no DeepSeek-V3 form"):
        to_deepseek_v3(mla)
    with pytest.raises(MlaifyError, match="0 of this model's 2 layers slide"):
        convert_to_mla(tiny_model("qwen3"), cfg)
