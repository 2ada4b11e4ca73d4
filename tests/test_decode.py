"""The latent cache and the absorbed decode path: equal to the expanded reference, sized by the formula."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, tokens
from transformers import AutoConfig, DynamicCache

from mlaify import MLAConversionConfig, convert_to_mla
from mlaify.modeling.cache_mlaify import Int8LatentCache, Int8LatentCacheLayer, LatentCacheLayer

# name -> conversion: per-KV-head rope keys (R = n_kv) and one shared rope key (R = 1, MQA source)
CASES = {
    "llama-gqa": MLAConversionConfig(kv_lora_rank=12, qk_rope_head_dim=4),
    "llama-mqa": MLAConversionConfig(kv_lora_rank=12, qk_rope_head_dim=4),
    "qwen2-bias": MLAConversionConfig(kv_lora_rank=10, qk_rope_head_dim=6),
}


@pytest.fixture(scope="module", params=list(CASES))
def mla(request):
    return convert_to_mla(tiny_model(request.param), CASES[request.param])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts, the first left-padded by 5."""
    ids = tokens(batch=2, length=14, seed=5)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    return ids, mask


def _decode_logits(model, ids, mask, steps: int, cache) -> list[torch.Tensor]:
    """Greedy logits of `steps` one-token steps after a cached prefill."""
    out = model(ids, attention_mask=mask, cache=cache, use_cache=True)
    logits = [out.logits[:, -1]]
    for _ in range(steps):
        ids = logits[-1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(ids)], dim=-1)
        logits.append(model(ids, attention_mask=mask, cache=cache, use_cache=True).logits[:, -1])
    return logits


def _recomputed_logits(model, ids, mask, steps: int) -> list[torch.Tensor]:
    """The same greedy steps, each a full forward without cache (attend_expanded only)."""
    logits = []
    for _ in range(steps + 1):
        logits.append(model(ids, attention_mask=mask, use_cache=False).logits[:, -1])
        nxt = logits[-1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], -1), torch.cat([mask, torch.ones_like(nxt)], -1)
    return logits


@pytest.mark.parametrize("batched", [False, True])
def test_absorbed_decode_equals_expanded_reference(mla, batched):
    ids, mask = _padded_batch()
    if not batched:
        ids, mask = ids[1:], mask[1:]
    with torch.no_grad():
        fast = _decode_logits(mla, ids, mask, 6, DynamicCache(config=mla.config))
        reference = _recomputed_logits(mla, ids, mask, 6)
    for step, (a, b) in enumerate(zip(fast, reference, strict=True)):
        assert _rel(a, b) < 1e-5, f"step {step}"


def test_absorbed_reads_the_cache_buffer_in_place(mla):
    """The packed rows handed to SDPA are the cache's own memory, not a per-step copy."""
    from mlaify.modeling.modeling_mlaify import _packed_rows

    cache = DynamicCache(config=mla.config)
    with torch.no_grad():
        mla(tokens(batch=2, length=5), cache=cache, use_cache=True)
    layer = cache.layers[0]
    assert isinstance(layer, LatentCacheLayer)
    rows = _packed_rows(layer.keys, layer.values)
    assert rows.data_ptr() == layer.stores[0].data_ptr()
    assert torch.equal(rows[..., : layer.rank], layer.keys.squeeze(1))


def test_cache_size_follows_the_formula_at_every_step(mla):
    cfg = mla.config
    per_token = cfg.kv_lora_rank + cfg.n_rope_heads * cfg.qk_rope_head_dim
    ids = tokens(batch=2, length=6)
    cache = DynamicCache(config=mla.config)
    with torch.no_grad():
        mla(ids, cache=cache, use_cache=True)
        for step in range(LatentCacheLayer.CHUNK + 4):  # past the first reallocation
            length = 6 + step
            for layer in cache.layers:
                used, allocated = layer.nbytes()
                assert used == 2 * length * per_token * 4  # float32
                assert allocated >= used
                assert layer.keys.shape == (2, 1, length, cfg.kv_lora_rank)
                assert layer.values.shape == (2, cfg.n_rope_heads, length, cfg.qk_rope_head_dim)
            mla(ids[:, -1:], cache=cache, use_cache=True)


def test_cache_grows_by_chunks_not_per_step(mla):
    cache = DynamicCache(config=mla.config)
    buffers = set()
    with torch.no_grad():
        mla(tokens(batch=1, length=4), cache=cache, use_cache=True)
        for _ in range(300):
            mla(tokens(batch=1, length=1), cache=cache, use_cache=True)
            buffers.add(cache.layers[0].stores[0].data_ptr())
    assert len(buffers) <= 4  # 4 + 300 tokens: the first allocation and a few 25% growths


def test_generate_uses_the_latent_cache_with_left_padding(mla):
    ids, mask = _padded_batch()
    with torch.no_grad():
        out = mla.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=5,
            min_new_tokens=5,
            do_sample=False,
            return_dict_in_generate=True,
        )
        alone = mla.generate(ids[1:], max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert all(isinstance(layer, LatentCacheLayer) for layer in out.cache.layers)
    assert torch.equal(out.sequences[1:], alone)


def test_int8_cache_logits_stay_close(mla):
    """int8 with per-token scales: logits within 3% (relative norm) of the float cache's.

    Measured on these tiny models (sharp attention): 0.6-1.8%.
    """
    ids, mask = _padded_batch()
    cfg = mla.config
    with torch.no_grad():
        reference = _decode_logits(mla, ids, mask, 6, DynamicCache(config=mla.config))
        cache = Int8LatentCache()
        quantized = _decode_logits(mla, ids, mask, 6, cache)
    for a, b in zip(quantized, reference, strict=True):
        assert _rel(a, b) < 3e-2
    per_token = cfg.kv_lora_rank + cfg.n_rope_heads * cfg.qk_rope_head_dim
    used, _ = cache.layers[0].nbytes()
    assert used == 2 * (14 + 6) * (per_token + 4 * (1 + cfg.n_rope_heads))  # int8 rows + float32 scales
    assert cache.layers[0].keys.dtype == torch.int8


def test_int8_switch_in_the_config_reaches_generate(tmp_path):
    """`latent_cache_dtype="int8"` makes generate() build int8 layers, the same as passing the cache."""
    model = convert_to_mla(tiny_model("llama-gqa"), CASES["llama-gqa"])
    ids = tokens(batch=2, length=8)
    with torch.no_grad():
        explicit = model.generate(ids, cache=Int8LatentCache(), max_new_tokens=6, do_sample=False)
        model.config.latent_cache_dtype = "int8"
        model.save_pretrained(tmp_path)
        out = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert all(isinstance(layer, Int8LatentCacheLayer) for layer in out.cache.layers)
    assert torch.equal(out.sequences, explicit)
    assert AutoConfig.from_pretrained(tmp_path).latent_cache_dtype == "int8"


def test_saved_model_carries_the_cache_file(tmp_path):
    model = convert_to_mla(tiny_model("llama-gqa"), CASES["llama-gqa"])
    model.save_pretrained(tmp_path)
    assert (tmp_path / "cache_mlaify.py").is_file()
    assert (tmp_path / "modeling_mlaify.py").is_file()
