"""Config of an MLA model converted by mlaify.

Self-contained (imports transformers only): `save_pretrained` copies this file next to the
weights so that `trust_remote_code=True` loads the model where mlaify is not installed.
"""

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


class MlaifyConfig(PreTrainedConfig):
    """The source decoder's config (`text_config`) plus the MLA geometry, named as in DeepSeek-V2/V3.

    `text_config` keeps the source architecture (norms, MLP, RoPE tables, layer types), so generation
    utilities that call `get_text_config()` see the source layout. Per layer `i`:

    - `kv_lora_rank` (r): size of the cached latent `c_kv`; an int, or one int per layer.
    - `qk_rope_head_dim` (d_r): rotary dims per rope head, an even number.
    - `qk_nope_head_dim` (dn): NoPE dims per query head; default `head_dim - d_r` (the other dims of
      the head), `head_dim` where the rope key is mixed across KV heads and every dim keeps a NoPE part.
    - `n_rope_heads`: rope keys cached per token (1, DeepSeek style, or one per source KV head); query
      head `h` uses rope head `h // (num_attention_heads // n_rope_heads)`.
    - `rope_pairs[i][g]`: the d_r / 2 frequency pairs `(p, p + head_dim / 2)` of the source head dim
      that stay rotary for rope head `g`; the other dims of each head are NoPE.
    - `softmax_scale`: the source's scale (1 / sqrt(head_dim), or Gemma's `query_pre_attn_scalar`);
      the MLA score has the same total width.
    - `qk_norm`: the source normalises each query and key head (RMSNorm before RoPE: Qwen3, Gemma3).
      Then `q_proj` is the source's pre-norm query, `q_head_proj` maps each unit-RMS head to its MLA
      query (the norm weight folded in), and each token also caches one key scale per KV head,
      `1 / RMS(k_proj h)` (`qk_norm_eps` as the source's), that multiplies that head's scores.
    - `source_attention_layers`: layers that keep the source's own attention and its cache (sliding-
      window layers, whose cache the window already bounds, with `--keep-sliding`); None: none.
    - `conversion`: how the checkpoint was made (method, calibration text digest and seed, refit and
      query-fit windows, mlaify version): provenance only, never read by the model.
    - `latent_cache_dtype`: "auto" caches the latent in the model's dtype; "int8" in int8 with per-token
      scales (cache_mlaify.Int8LatentCacheLayer), for every cache that `generate()` or a caller builds.

    Cache per token per layer: `r + n_rope_heads * d_r` values, plus `num_key_value_heads` key scales
    with `qk_norm`. Sliding-window layers of the source (`text_config.layer_types`) keep only their
    last `sliding_window` tokens.
    """

    model_type = "mlaify"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    kv_lora_rank: int | list[int] = 64
    qk_rope_head_dim: int = 16
    qk_nope_head_dim: int | None = None
    n_rope_heads: int = 1
    rope_pairs: list | None = None
    softmax_scale: float | None = None
    attention_bias: bool = False  # bias on q_proj and kv_a_proj_with_mqa (Qwen2's q/k biases)
    o_proj_bias: bool = False  # the source value bias folds into this one
    qk_norm: bool = False
    qk_norm_eps: float = 1e-6
    source_attention_layers: list[int] | None = None
    tie_word_embeddings: bool = False
    latent_cache_dtype: str = "auto"
    conversion: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.latent_cache_dtype not in ("auto", "int8"):
            raise ValueError(f"latent_cache_dtype must be 'auto' or 'int8', got {self.latent_cache_dtype!r}")
        if self.qk_norm and self.latent_cache_dtype == "int8":
            raise ValueError(
                "latent_cache_dtype 'int8' does not hold the key scales of a qk-norm model; use 'auto'"
            )
        text = self.text_config
        self.tie_word_embeddings = bool(getattr(text, "tie_word_embeddings", False))
        if self.qk_nope_head_dim is None:
            self.qk_nope_head_dim = self.head_dim - self.qk_rope_head_dim
        if self.softmax_scale is None:
            self.softmax_scale = self.head_dim**-0.5
        if self.rope_pairs is None:  # highest-frequency pairs for every layer and rope head
            kept = list(range(self.qk_rope_head_dim // 2))
            self.rope_pairs = [[kept] * self.n_rope_heads for _ in range(text.num_hidden_layers)]

    # The source sizes, read through for tools that look at the top-level config (lm-eval, generate).
    vocab_size = property(lambda self: self.text_config.vocab_size)
    hidden_size = property(lambda self: self.text_config.hidden_size)
    num_hidden_layers = property(lambda self: self.text_config.num_hidden_layers)
    num_attention_heads = property(lambda self: self.text_config.num_attention_heads)
    max_position_embeddings = property(lambda self: self.text_config.max_position_embeddings)

    @property
    def head_dim(self) -> int:
        text = self.text_config
        return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads

    @property
    def v_head_dim(self) -> int:
        return self.head_dim

    def layer_kv_lora_rank(self, layer_idx: int) -> int:
        rank = self.kv_lora_rank
        return rank[layer_idx] if isinstance(rank, list) else rank

    @property
    def num_key_scales(self) -> int:
        """Key scales cached per token: one per source KV head with `qk_norm`, else none."""
        text = self.text_config
        return (text.num_key_value_heads or text.num_attention_heads) if self.qk_norm else 0

    def layer_sliding_window(self, layer_idx: int) -> int | None:
        """The source's sliding window of a layer, None for full attention: by `layer_types` where the
        source has them, else its one `sliding_window` for every layer (Mistral), as its masks are."""
        text = self.text_config
        window = getattr(text, "sliding_window", None)
        types = getattr(text, "layer_types", None)
        if types is None:
            return window
        return window if types[layer_idx] == "sliding_attention" else None

    def is_mla_layer(self, layer_idx: int) -> bool:
        return layer_idx not in (self.source_attention_layers or ())

    def kv_values_per_token(self, layer_idx: int) -> int:
        if not self.is_mla_layer(layer_idx):  # the source's keys and values
            text = self.text_config
            return 2 * (text.num_key_value_heads or text.num_attention_heads) * self.head_dim
        rope = self.n_rope_heads * self.qk_rope_head_dim
        return self.layer_kv_lora_rank(layer_idx) + rope + self.num_key_scales


__all__ = ["MlaifyConfig"]
