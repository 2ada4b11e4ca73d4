"""KV-cache geometry of a source or converted model, from its config alone.

Source layer: `2 * n_kv * d_h` cached values per token. MLA layer: `r + n_rope_heads * d_r` (plus one
key scale per KV head for a qk-norm source). A sliding-window layer holds at most its window of
tokens, so whole-cache sizes are quoted per context length.
"""

from __future__ import annotations

import torch

CONTEXT = 4096  # the context length at which summaries quote whole-cache sizes
CONTEXTS = (CONTEXT, 32768)  # kv_bytes_at_{context} for each


def _bytes_per_value(dtype) -> int:
    if dtype is None:
        return 4
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."))
    return torch.empty((), dtype=dtype).element_size()


def _source_values(text) -> int:
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * (text.num_key_value_heads or text.num_attention_heads) * head_dim


def sliding_windows(text) -> list[int | None]:
    """Each layer's sliding window (None: full attention), as the source decoder masks it: by its
    `layer_types` where the config has them (Gemma3, Qwen2/3), else one `sliding_window` for every
    layer where it sets one (Mistral). (modeling_mlaify.py, which imports nothing of mlaify, repeats this.)"""
    window = getattr(text, "sliding_window", None)
    types = getattr(text, "layer_types", None)
    if types is None:
        return [window] * text.num_hidden_layers
    return [window if t == "sliding_attention" else None for t in types]


def _cached_tokens(text, context: int) -> list[int]:
    """Tokens each layer holds at `context`: a sliding-window layer at most its window."""
    return [context if w is None else min(context, w) for w in sliding_windows(text)]


def kv_geometry(config, num_parameters: int | None = None) -> dict:
    """Cache sizes per token per layer, per token, and at 4k and 32k context (with the saving there),
    for source and MLA configs."""
    is_mla = config.model_type == "mlaify"
    is_deepseek = getattr(config, "kv_lora_rank", None) is not None and not is_mla  # DeepSeek-V2/V3 layout
    text = config.get_text_config(decoder=True)
    layers = text.num_hidden_layers
    if is_deepseek:  # one latent and one rope key; the source's cache as the export recorded it
        exported = getattr(config, "mlaify_export", None) or {}
        heads = text.num_attention_heads
        full = heads * (text.qk_nope_head_dim + text.qk_rope_head_dim + text.v_head_dim)
        source_values = exported.get("source_kv_values_per_token_per_layer", full)
        per_layer = [config.kv_lora_rank + config.qk_rope_head_dim] * layers
    else:
        source_values = _source_values(text)
        per_layer = (
            [config.kv_values_per_token(i) for i in range(layers)] if is_mla else [source_values] * layers
        )
    nbytes = _bytes_per_value(getattr(config, "dtype", None))
    values = sum(per_layer)
    mean = values / layers
    geometry = {
        "model_type": config.model_type,
        "source_model_type": text.model_type,
        "num_layers": layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads or text.num_attention_heads,
        "head_dim": getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        "dtype": str(getattr(config, "dtype", None) or "float32").removeprefix("torch."),
        "kv_values_per_token_per_layer": int(mean) if mean.is_integer() else round(mean, 2),
        "kv_values_per_token": values,
        "kv_bytes_per_token": values * nbytes,
        "source_kv_values_per_token_per_layer": source_values,
        "kv_reduction": round(1 - values / (source_values * layers), 4),
    }
    for context in CONTEXTS:
        tokens = _cached_tokens(text, context)
        geometry[f"kv_bytes_at_{context}"] = nbytes * sum(
            v * t for v, t in zip(per_layer, tokens, strict=True)
        )
        geometry[f"source_kv_bytes_at_{context}"] = nbytes * source_values * sum(tokens)
        # The whole cache's saving at this context: differs from kv_reduction (per token and layer)
        # when sliding-window layers hold only their window, or keep the source's attention.
        geometry[f"kv_reduction_at_{context}"] = round(
            1 - geometry[f"kv_bytes_at_{context}"] / geometry[f"source_kv_bytes_at_{context}"], 4
        )
    if is_mla or is_deepseek:
        geometry.update(
            kv_lora_rank=config.kv_lora_rank,
            qk_rope_head_dim=config.qk_rope_head_dim,
            n_rope_heads=getattr(config, "n_rope_heads", 1),
        )
    if num_parameters is not None:
        geometry["num_parameters"] = num_parameters
    return geometry
