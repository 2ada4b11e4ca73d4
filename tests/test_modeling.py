"""The MLA modeling class: cache contents, absorbed == expanded, cached == uncached, save/load round trips."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import attention_inputs, tiny_model, tokens
from transformers import AutoModelForCausalLM, DynamicCache

from mlaify import MLAConversionConfig, MlaifyForCausalLM, convert_to_mla


@pytest.fixture(scope="module")
def mla() -> MlaifyForCausalLM:
    return convert_to_mla(tiny_model("llama-gqa"), MLAConversionConfig(kv_lora_rank=12, qk_rope_head_dim=4))


def _greedy_without_cache(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        logits = model(ids, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=-1)
    return ids


@pytest.mark.parametrize(
    "name", ["llama-gqa", "llama-mqa", "qwen2-bias", "mistral-sliding", "qwen3-sliding", "gemma3", "phi3"]
)
def test_cached_generate_equals_recomputing_each_step(name):
    model = convert_to_mla(tiny_model(name), MLAConversionConfig(kv_lora_rank=12, qk_rope_head_dim=4))
    prompt = tokens(batch=1, length=8)
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=32, do_sample=False, min_new_tokens=32)
        uncached = _greedy_without_cache(model, prompt, 32)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("S, padded", [(3, True), (3, False), (17, False)])
def test_absorbed_decode_equals_expanded_attention(mla, S, padded):
    """Both paths, with a padding mask and with None (causal; S == T takes SDPA's causal kernel)."""
    attn = mla.model.layers[1].self_attn
    q_nope, q_rope, c_kv, k_rope, mask = attention_inputs(attn, S, padded)
    with torch.no_grad():
        expanded = attn.attend_expanded(q_nope, q_rope, c_kv, k_rope, mask)
        absorbed = attn.attend_absorbed(q_nope, q_rope, c_kv, k_rope, mask)
    assert ((absorbed - expanded).norm() / expanded.norm()) < 1e-5
    assert (absorbed - expanded).abs().max() < 1e-5 * expanded.abs().max()


def test_decode_step_through_the_model_matches_full_forward(mla):
    """One absorbed decode step after a cached prefill equals the last position of a full forward."""
    ids = tokens(batch=2, length=12)
    with torch.no_grad():
        full = mla(ids).logits[:, -1]
        cache = DynamicCache(config=mla.config)
        mla(ids[:, :-1], cache=cache, use_cache=True)
        step = mla(ids[:, -1:], cache=cache, use_cache=True).logits[:, -1]
    assert (step - full).abs().max() < 1e-5 * full.abs().max()


def test_cache_holds_only_the_latent_and_rope_key(mla):
    prompt = tokens(batch=2, length=8)
    with torch.no_grad():
        out = mla.generate(
            prompt, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, min_new_tokens=6
        )
    cfg = mla.config
    text = cfg.text_config
    per_token = cfg.kv_lora_rank + cfg.n_rope_heads * cfg.qk_rope_head_dim
    assert per_token == 12 + 2 * 4
    for layer in out.cache.layers:
        c_kv, k_rope = layer.keys, layer.values
        assert c_kv.shape == (2, 1, 8 + 5, cfg.kv_lora_rank)  # the last token is not cached yet
        assert k_rope.shape == (2, cfg.n_rope_heads, 8 + 5, cfg.qk_rope_head_dim)
        assert (c_kv[0].numel() + k_rope[0].numel()) // (8 + 5) == per_token
        assert per_token < text.num_key_value_heads * text.head_dim  # nothing of the source's size


def test_batched_left_padded_generate_equals_single(mla):
    short, long = tokens(batch=1, length=5, seed=3), tokens(batch=1, length=9, seed=4)
    pad = torch.zeros(1, 4, dtype=torch.long)
    ids = torch.cat([torch.cat([pad, short], 1), long])
    mask = torch.cat([torch.cat([pad, torch.ones_like(short)], 1), torch.ones_like(long)])
    with torch.no_grad():
        batched = mla.generate(
            ids, attention_mask=mask, max_new_tokens=10, do_sample=False, min_new_tokens=10
        )
        alone = [
            mla.generate(x, max_new_tokens=10, do_sample=False, min_new_tokens=10) for x in (short, long)
        ]
    assert torch.equal(batched[0, -10:], alone[0][0, -10:])
    assert torch.equal(batched[1, -10:], alone[1][0, -10:])


@pytest.mark.parametrize("name", ["llama-gqa", "gemma3", "phi3"])
def test_save_and_load_without_mlaify_installed(name, tmp_path):
    """trust_remote_code loads the copied modeling files in a process that cannot import mlaify (Gemma3:
    its qk-norm key scales and sliding layers too)."""
    mla = convert_to_mla(tiny_model(name), MLAConversionConfig(kv_budget=24))
    mla.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "mlaify" and "AutoModelForCausalLM" in config["auto_map"]
    ids = tokens()
    with torch.no_grad():
        expected = mla(ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.modules["mlaify"] = None  # any import of mlaify now fails
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
        assert "mlaify" not in type(model).__module__.split(".")[0], type(model).__module__
        with torch.no_grad():
            ids = torch.load({str(tmp_path / "ids.pt")!r})
            torch.save(model(ids).logits, {str(tmp_path / "out.pt")!r})
            # cached greedy decoding (the latent and sliding cache layers) equals recomputing
            out = model.generate(ids[:1, :6], max_new_tokens=12, min_new_tokens=12, do_sample=False)
            for t in range(6, 18):
                assert out[0, t] == model(out[:1, :t]).logits[0, -1].argmax(), t
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)


def test_from_pretrained_without_flag_after_import(mla, tmp_path):
    mla.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, MlaifyForCausalLM)
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, mla(ids).logits)
