"""MLA attention inside the source decoder, and the causal-LM wrapper that loads converted checkpoints.

Self-contained (imports torch and transformers only): `save_pretrained` copies this file next to
the weights for `trust_remote_code=True`. The source architecture's own decoder (norms, MLP,
embeddings, RoPE tables, masks) is built from `config.text_config`; only `self_attn` is replaced.

Notation (DESIGN.md): B batch, S new tokens, T cached tokens, H query heads, R rope heads,
r = kv_lora_rank, dn = qk_nope_head_dim, dr = qk_rope_head_dim, dv = v_head_dim.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .cache_mlaify import Int8LatentCacheLayer, use_latent_layer
from .configuration_mlaify import MlaifyConfig


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """HF RoPE layout: dims (i, i + d/2) form a pair, so `[a ; b] -> [-b ; a]` rotates every pair."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_dims(config: MlaifyConfig, layer_idx: int) -> torch.Tensor:
    """Dims of the source head (HF layout) that stay rotary in a layer, per rope head: [R, dr], in the
    rotate_half layout `[pairs ; pairs + head_dim/2]`."""
    pairs = torch.tensor(config.rope_pairs[layer_idx], dtype=torch.long).view(config.n_rope_heads, -1)
    return torch.cat([pairs, pairs + config.head_dim // 2], dim=-1)


class MLAAttention(nn.Module):
    """Multi-head Latent Attention with the forward signature of the source attention module.

    Caches only `c_kv` (one-head key `[B, 1, T, r]`, with a qk-norm source's key scales after it) and
    the rotated `k_rope` (`[B, R, T, dr]`), packed per token in one growing buffer (`LatentCacheLayer`,
    cache_mlaify.py; `SlidingLatentCacheLayer` on a sliding-window layer).
    Prefill expands K/V from the latent and runs SDPA (compute-bound); decode attends in the latent
    space with W_UK folded into the query and W_UV applied after the softmax (memory-bound). The
    two paths compute the same function; tests hold them to float32 round-off.
    """

    def __init__(self, config: MlaifyConfig, layer_idx: int):
        super().__init__()
        text = config.text_config
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = text.num_attention_heads
        self.n_rope_heads = config.n_rope_heads
        self.kv_lora_rank = config.layer_kv_lora_rank(layer_idx)
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.v_head_dim = config.v_head_dim
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        self.scaling = config.softmax_scale
        self.is_causal = True
        if self.num_heads % self.n_rope_heads:
            raise ValueError(f"num_attention_heads ({self.num_heads}) must be a multiple of n_rope_heads")

        self.n_key_scales = config.num_key_scales
        self.qk_norm_eps = config.qk_norm_eps
        self.sliding_window = config.layer_sliding_window(layer_idx)

        hidden = text.hidden_size
        if config.qk_norm:
            # The source's pre-norm query and key projections: each query head is normalised, then mapped
            # to its MLA query by q_head_proj; k_proj only measures each key head's RMS (its scale).
            d_h, n_kv = config.head_dim, text.num_key_value_heads or self.num_heads
            self.q_proj = nn.Linear(hidden, self.num_heads * d_h, bias=config.attention_bias)
            self.q_head_proj = nn.Parameter(torch.empty(self.num_heads, self.qk_head_dim, d_h))
            self.k_proj = nn.Linear(hidden, n_kv * d_h, bias=config.attention_bias)
        else:
            self.q_proj = nn.Linear(hidden, self.num_heads * self.qk_head_dim, bias=config.attention_bias)
        self.kv_a_proj_with_mqa = nn.Linear(
            hidden, self.kv_lora_rank + self.n_rope_heads * self.qk_rope_head_dim, bias=config.attention_bias
        )
        self.kv_b_proj = nn.Linear(
            self.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(self.num_heads * self.v_head_dim, hidden, bias=config.o_proj_bias)

        self.register_buffer("rope_dims", rope_dims(config, layer_idx))  # saved with its weights

    def _rope_tables(self, position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin at the kept pairs, [B, R, S, dr], from the source model's tables [B, S, head_dim]."""
        cos, sin = position_embeddings
        return cos[:, :, self.rope_dims].transpose(1, 2), sin[:, :, self.rope_dims].transpose(1, 2)

    def rotate_queries(self, q_rope: torch.Tensor, position_embeddings) -> torch.Tensor:
        """RoPE on the query rope parts [B, H, S, dr]; head h turns with rope head h // (H / R).
        `(cos, -sin)` turns them back (the rotation's transpose)."""
        cos, sin = (t.unsqueeze(2) for t in self._rope_tables(position_embeddings))  # [B, R, 1, S, dr]
        B, H, S, dr = q_rope.shape
        q = q_rope.reshape(B, self.n_rope_heads, H // self.n_rope_heads, S, dr)
        return (q * cos + rotate_half(q) * sin).reshape(B, H, S, dr)

    def _apply_rope(self, q_rope, k_rope, position_embeddings):
        """Rotate the kept pairs with the source model's own cos/sin tables."""
        cos, sin = self._rope_tables(position_embeddings)
        return self.rotate_queries(q_rope, position_embeddings), k_rope * cos + rotate_half(k_rope) * sin

    def project(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]):
        """Queries and the new cache entries: q_nope [B, H, S, dn], rotated q_rope [B, H, S, dr],
        c_kv [B, 1, S, r + n_s] (the latent as a one-head key, then the n_s key scales of a qk-norm
        model) and rotated k_rope [B, R, S, dr].

        qk-norm: the source's score `(g_q * q / rms(q)) . RoPE(g_k * k / rms(k))` is, with the norm
        weights g folded into the query map and the key rows, `(query of the unit-RMS q) . (linear
        MLA key) / rms(k)`: the key's RMS is one number per token and KV head, so it factors out of
        every score term of that head (rope and NoPE alike, whichever rope strategy mixed the keys)."""
        B, S, _ = hidden_states.shape
        if self.n_key_scales:
            q = torch.einsum("bshi,hoi->bsho", self.unit_queries(hidden_states), self.q_head_proj)
        else:
            q = self.q_proj(hidden_states).view(B, S, self.num_heads, -1)
        q_nope, q_rope = q.transpose(1, 2).split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_proj_with_mqa(hidden_states)  # [B, S, r + R * dr]
        c_kv, k_rope = latent.split([self.kv_lora_rank, self.n_rope_heads * self.qk_rope_head_dim], dim=-1)
        if self.n_key_scales:  # cached beside the latent: [c_kv ; 1 / RMS(k_g) for each KV head g]
            k = self.k_proj(hidden_states).view(B, S, self.n_key_scales, -1)
            c_kv = torch.cat([c_kv, inv_rms(k, self.qk_norm_eps).squeeze(-1)], dim=-1)
        k_rope = k_rope.view(B, S, self.n_rope_heads, self.qk_rope_head_dim).transpose(1, 2)
        q_rope, k_rope = self._apply_rope(q_rope, k_rope, position_embeddings)
        return q_nope, q_rope, c_kv.unsqueeze(1), k_rope

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache=None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        B, S, _ = hidden_states.shape
        q_nope, q_rope, c_kv, k_rope = self.project(hidden_states, position_embeddings)
        if cache is not None:
            int8 = self.config.latent_cache_dtype == "int8"
            use_latent_layer(cache, self.layer_idx, int8=int8, sliding_window=self.sliding_window)
            if self.n_key_scales and isinstance(cache.layers[self.layer_idx], Int8LatentCacheLayer):
                raise ValueError(
                    "an int8 latent cache does not hold a qk-norm model's key scales; use DynamicCache"
                )
            c_kv, k_rope = cache.update(c_kv, k_rope, self.layer_idx)  # [B, 1, T, r + n_s], [B, R, T, dr]
        mask = None if attention_mask is None else attention_mask[..., : c_kv.shape[-2]]  # [B, 1, S, T]
        attend = self.attend_absorbed if S == 1 else self.attend_expanded
        out = attend(q_nope, q_rope, c_kv, k_rope, mask)  # [B, H, S, dv]
        out = out.transpose(1, 2).reshape(B, S, self.num_heads * self.v_head_dim)
        return self.o_proj(out), None

    def _up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, dn, r] and W_UV [H, dv, r], views of kv_b_proj."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, -1)
        return w.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)

    def attend_expanded(self, q_nope, q_rope, c_kv, k_rope, mask):
        """Rebuild per-head K_nope and V from the latent, then one SDPA call (prefill).

        `mask` None means causal: SDPA's own causal kernel when the queries are the whole sequence.
        """
        B, H, S, _ = q_nope.shape
        T = c_kv.shape[-2]
        latent = c_kv[..., : self.kv_lora_rank].squeeze(1)  # [B, T, r]
        kv = self.kv_b_proj(latent).view(B, T, H, -1).transpose(1, 2)  # [B, H, T, dn + dv]
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k_rope = k_rope.repeat_interleave(H // self.n_rope_heads, dim=1)  # [B, H, T, dr]
        query = torch.cat([q_nope, q_rope], dim=-1)
        key = torch.cat([k_nope, k_rope], dim=-1)
        key = self.scale_by_key(key.transpose(-1, -2), c_kv).transpose(-1, -2)
        if mask is None and S != T:
            mask = _causal_mask(S, T, q_nope.device)
        is_causal = mask is None and S > 1
        # SDPA's fused CPU / flash kernels need one head size for q, k and v; with dv != dn + dr it
        # falls back to the math kernel (3x slower in training, and it materialises [B, H, S, T]).
        # Zero columns change neither the scores nor the kept output columns.
        width = max(self.qk_head_dim, self.v_head_dim)
        query, key, v = (_pad_last(t, width) for t in (query, key, v))
        out = F.scaled_dot_product_attention(
            query, key, v, attn_mask=mask, is_causal=is_causal, scale=self.scaling
        )
        return out[..., : self.v_head_dim]

    def attend_absorbed(self, q_nope, q_rope, c_kv, k_rope, mask):
        """Attention in the latent space (decode): `attend_latent`, then W_UV maps each head back."""
        w_uv = self._up_weights()[1]
        return self.attend_latent(q_nope, q_rope, c_kv, k_rope, mask) @ w_uv.transpose(1, 2)  # [B, H, S, dv]

    def attend_latent(self, q_nope, q_rope, c_kv, k_rope, mask):
        """Softmax-weighted latents `z_h = sum_n p_{h,n} c_n` [B, H, S, r], one SDPA call over the cache rows.

        score = (W_UK^T q_nope) . c_kv + q_rope . k_rope_g: the query is mapped into the latent
        (`q_lat`) and written next to its rope part in the slot of its rope head g (zeros in the
        other heads' slots), so keys are the packed rows `[c_kv ; k_rope_0 ; ...]` [B, T, E] as the
        LatentCacheLayer stores them, read once for all H heads (heads folded into query rows, MQA
        style). The values are the same rows (attention averages whole rows; the first r columns are
        the averaged latent). K and V are never materialised. With qk-norm the scores are formed
        explicitly: each is multiplied by its key head's cached scale.
        """
        B, H, S, _ = q_nope.shape
        R = self.n_rope_heads
        w_uk = self._up_weights()[0]
        q_lat = q_nope @ w_uk  # [B, H, S, r]
        slots = torch.eye(R, dtype=q_rope.dtype, device=q_rope.device).view(R, 1, 1, R, 1)
        q_rope = (q_rope.view(B, R, H // R, S, 1, -1) * slots).view(B, H, S, -1)  # [B, H, S, R * dr]
        parts = [q_lat, q_rope]
        if self.n_key_scales:  # the key scales score nothing
            parts.insert(1, q_lat.new_zeros(B, H, S, self.n_key_scales))
        query = torch.cat(parts, dim=-1)  # [B, H, S, E]
        rows = _packed_rows(c_kv, k_rope).unsqueeze(1)  # [B, 1, T, E]
        if self.n_key_scales:
            if mask is None:
                mask = _causal_mask(S, rows.shape[-2], q_nope.device)
            scores = self.scale_by_key(query @ rows.transpose(-1, -2), c_kv) * self.scaling
            if mask.dtype == torch.bool:  # True attends (a finite fill: a fully masked pad row stays finite)
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            else:
                scores = scores + mask
            probs = scores.float().softmax(-1).to(rows.dtype)  # [B, H, S, T]
            return probs @ rows[..., : self.kv_lora_rank]  # [B, H, S, r]
        if mask is None and S == rows.shape[-2] > 1:
            # A whole sequence (the refit): SDPA's causal kernel with the one key row shared by all H
            # heads; a [S * H, T] mask would send it to the math kernel (3x slower at 2048 tokens).
            out = F.scaled_dot_product_attention(
                query, rows, rows, is_causal=True, scale=self.scaling, enable_gqa=True
            )
            return out[..., : self.kv_lora_rank]  # [B, H, S, r]
        query = query.transpose(1, 2).reshape(B, 1, S * H, -1)  # rows (s, h)
        if mask is not None:
            mask = mask.unsqueeze(3).expand(-1, -1, -1, H, -1).flatten(2, 3)  # [B, 1, S * H, T]
        elif S > 1:
            mask = _causal_mask(S, rows.shape[-2], q_nope.device).repeat_interleave(H, dim=0)
        out = F.scaled_dot_product_attention(query, rows, rows, attn_mask=mask, scale=self.scaling)
        return out[..., : self.kv_lora_rank].view(B, S, H, -1).transpose(1, 2)  # [B, H, S, r]

    def unit_queries(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """qk-norm: each head of the source's pre-norm query at unit RMS, [B, S, H, d_h] (what
        `q_head_proj` maps; the norm's gain is folded into it)."""
        q = self.q_proj(hidden_states).view(*hidden_states.shape[:2], self.num_heads, -1)
        return q * inv_rms(q, self.qk_norm_eps)

    def scale_by_key(self, x: torch.Tensor, c_kv: torch.Tensor) -> torch.Tensor:
        """`x` [B, H, ..., T] times each key's cached `1 / RMS(k_g)` (from c_kv [B, 1, T, r + n_s]) for the
        KV head g of each query head, broadcast over the group (no per-head copy); `x` itself without
        qk-norm."""
        if not self.n_key_scales:
            return x
        scales = c_kv[..., self.kv_lora_rank :].squeeze(1).transpose(1, 2)  # [B, n_s, T]
        scales = scales.reshape(*scales.shape[:2], *[1] * (x.dim() - 2), scales.shape[-1])
        return (x.unflatten(1, (self.n_key_scales, -1)) * scales).flatten(1, 2)


def inv_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """`1 / sqrt(mean(x^2) + eps)` over the last dim, kept as a dim (in float32, as the source norms)."""
    return torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).to(x.dtype)


def _packed_rows(c_kv: torch.Tensor, k_rope: torch.Tensor) -> torch.Tensor:
    """Rows `[c_kv ; k_rope_0 ; ...]` [B, T, r + R * dr] from c_kv [B, 1, T, r] and k_rope [B, R, T, dr].

    A LatentCacheLayer hands out both as views of one buffer laid out exactly so: then this is a
    view of that buffer (no copy of the cache per step); other inputs are packed by a copy.
    """
    B, R, T, dr = k_rope.shape
    r = c_kv.shape[-1]
    latent = c_kv.squeeze(1)  # [B, T, r]
    width = r + R * dr
    same_buffer = (
        latent.stride()[1:] == (width, 1)
        and k_rope.stride()[1:] == (dr, width, 1)
        and k_rope.stride(0) == latent.stride(0)
        and k_rope.data_ptr() == latent.data_ptr() + r * latent.element_size()
    )
    if same_buffer:
        return latent.as_strided((B, T, width), latent.stride())
    return torch.cat([latent, k_rope.transpose(1, 2).reshape(B, T, R * dr)], dim=-1)


def _pad_last(x: torch.Tensor, width: int) -> torch.Tensor:
    """`x` with zero columns up to `width` in its last dim; `x` itself (no copy) when already that wide."""
    return x if x.shape[-1] == width else F.pad(x, (0, width - x.shape[-1]))


def _causal_mask(q_len: int, kv_len: int, device) -> torch.Tensor:
    """[S, T] bool: query i sits at position kv_len - q_len + i and sees every key up to it."""
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)


class MlaifyPreTrainedModel(PreTrainedModel):
    config_class = MlaifyConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MLAAttention"]
    _supports_sdpa = True
    _can_compile_fullgraph = False


class MlaifyForCausalLM(MlaifyPreTrainedModel, GenerationMixin):
    """The source causal LM with MLA attention; weights named as the source's, DeepSeek's for attention."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MlaifyConfig):
        super().__init__(config)
        text = config.text_config
        self.model = AutoModel.from_config(text)
        for i, layer in enumerate(self.model.layers):
            if config.is_mla_layer(i):
                layer.self_attn = MLAAttention(config, i)
        self.vocab_size = text.vocab_size
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        cache = kwargs.pop("past_key_values", cache)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        cap = getattr(self.config.text_config, "final_logit_softcapping", None)
        if cap is not None:  # Gemma's, as its own causal LM applies it
            logits = torch.tanh(logits / cap) * cap
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = ["MLAAttention", "MlaifyForCausalLM", "MlaifyPreTrainedModel"]
