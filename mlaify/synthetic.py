"""Random checkpoints with a real model's exact geometry, written shard by shard (scale tests and
benchmarks: nothing that large can be downloaded here, and conversion cost depends on shapes only).

`LLAMA3_8B` is Llama-3-8B's config (32 layers, d 4096, 32 query / 8 KV heads of 128, MLP 14336,
vocabulary 128256, `llama3` RoPE scaling); `SMALL_1GB` keeps its head layout at d 2048 and 8 layers,
about 1 GB in bfloat16 (the CI memory test's model).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from .shards import ShardWriter

LLAMA3_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    tie_word_embeddings=False,
    bos_token_id=128000,
    eos_token_id=128001,
)


SMALL_1GB = dict(
    LLAMA3_8B,
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=4,
    max_position_embeddings=4096,
)


def write_synthetic_checkpoint(
    folder: str | Path, geometry: dict, seed: int = 0, dtype=torch.bfloat16, shard_bytes: int = 5 << 30
) -> int:
    """A Llama checkpoint of `geometry` with N(0, 0.02) weights (norms 1) from `seed`, written a tensor
    at a time into `folder`; returns its bytes. Memory: one shard's worth of tensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**geometry, dtype=dtype)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(seed)
    writer = ShardWriter(folder, shard_bytes)
    for name, meta in skeleton.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if "norm" in name:
            tensor = torch.ones(meta.shape, dtype=dtype)
        else:
            tensor = (torch.randn(meta.shape, generator=generator) * 0.02).to(dtype)
        writer.add(name, tensor)
    writer.close()
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    (folder / "README.md").write_text(
        f"---\nlicense: other\n---\n# synthetic\n\nRandom N(0, 0.02) weights (seed {seed}) with a Llama "
        "geometry, written by `mlaify.synthetic`.\n"
    )
    return writer.total_bytes
