"""Streamed conversion: a safetensors checkpoint read and written a layer at a time (convert/source.py,
shards.py) gives the in-memory conversion's weights, within a bounded peak memory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model, tokens
from transformers import AutoModelForCausalLM

from mlaify import MLAConversionConfig, convert_to_mla
from mlaify.convert.convert import convert_to_folder
from mlaify.synthetic import write_synthetic_checkpoint


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-bias", "mistral"])
def test_streamed_conversion_of_a_sharded_source_equals_the_in_memory_one(name, tmp_path):
    source = tiny_model(name, num_hidden_layers=3)
    source.save_pretrained(tmp_path / "src", max_shard_size="60KB")  # several shards and an index
    assert (tmp_path / "src" / "model.safetensors.index.json").is_file()
    cfg = MLAConversionConfig(kv_budget=24, qk_rope_head_dim=4)
    (tmp_path / "out").mkdir()
    convert_to_folder(tmp_path / "src", tmp_path / "out", cfg, shard_bytes=40_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert (tmp_path / "out" / "modeling_mlaify.py").is_file()

    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    in_memory = convert_to_mla(source, cfg)
    for key in ("kv_lora_rank", "rope_pairs", "n_rope_heads", "attention_bias", "o_proj_bias", "conversion"):
        assert getattr(streamed.config, key) == getattr(in_memory.config, key), key
    mine, theirs = streamed.state_dict(), in_memory.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, in_memory(ids).logits)


def test_the_same_streamed_conversion_twice_writes_the_same_bytes(tmp_path):
    tiny_model("llama-gqa").save_pretrained(tmp_path / "src")
    for out in ("a", "b"):
        (tmp_path / out).mkdir()
        convert_to_folder(tmp_path / "src", tmp_path / out, MLAConversionConfig(kv_budget=24))
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model.safetensors"
    ).read_bytes()


# About 0.5 GB in bfloat16: 8 layers of d 1024 with Llama-3's head layout (8 query / 2 KV heads of 128).
GEOMETRY = dict(
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=3584,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=128,
    max_position_embeddings=4096,
)

PEAK = """
import resource, sys
from mlaify.cli import main
code = main(sys.argv[1:])
print("PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(code)
"""


def test_weight_only_conversion_peak_memory_is_a_fraction_of_the_checkpoint(tmp_path):
    """Issue 14's bound, measured in a subprocess: peak RSS <= 25% of the checkpoint's bytes + 1 GiB."""
    size = write_synthetic_checkpoint(tmp_path / "src", GEOMETRY, shard_bytes=128 << 20)
    argv = ["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--no-calib", "--kv-reduction", "0.75"]
    done = subprocess.run([sys.executable, "-c", PEAK, *argv], capture_output=True, text=True, check=True)
    peak = int(done.stdout.split("PEAK_KB")[-1]) * 1024
    assert peak <= 0.25 * size + (1 << 30), (peak / 2**30, size / 2**30)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["kv_lora_rank"] == 512 // 4 - 2 * 32  # a quarter of the cache, two rope keys of 32
