"""Export an mlaify checkpoint to the stock DeepSeek-V3 layout (`model_type: deepseek_v3`), exactly.

`transformers`' own `DeepseekV3ForCausalLM` then loads it with no remote code and computes our
model's function. What that layout fixes, and how each difference is made exact (H query heads,
r_l our latent rank in layer l, dn / dr / dv our head widths, R our rope heads):

1. **The latent norm.** DeepSeek-V3 applies `kv_a_layernorm` to `c_kv` before `kv_b_proj` reads it
   (and caches the normed latent); ours has no norm. An RMSNorm is linear on inputs far below the
   square root of its `eps`: with `kv_a_proj_with_mqa`'s latent rows scaled by `alpha` (a power of
   two: exact in every binary float format) and the norm weight `w = sqrt(eps) / alpha`, over the
   `r'` latent slots

       RMSNorm(alpha c)_i = w alpha c_i / sqrt(alpha^2 |c|^2 / r' + eps)
                          = c_i / sqrt(1 + alpha^2 |c|^2 / (r' eps))

   The relative error `alpha^2 |c|^2 / (2 r' eps)` is bounded through `|c| <= ||W_DKV||_2 |h| + |b|`
   with `|h| <= sqrt(d) max|gamma|` (h is the RMS-normed input): `alpha` makes it <= 2^-21 for every
   possible input. No slot and no bias is added, so the export caches what ours does and needs a
   bias only where the source has one. The scaled rows lie far below 1 (alpha about 4e-8 on
   SmolLM2), inside float32's and bfloat16's normal range but not float16's: float16 is refused.
2. **One rope key and one table.** DeepSeek-V3 caches one rope key of `qk_rope_head_dim` dims,
   rotated in interleaved pairs `(2s, 2s + 1)` by one frequency table shared by all layers. Ours keeps
   per layer R rope keys of dr / 2 source frequency pairs each (any pairs, repeats allowed). The
   export's slots are the union over layers of those frequency multisets; every layer writes its
   rope rows into slots of the same frequency and leaves the others zero (their key and query rows
   are zero, so they add nothing to any score). Query head h reads only its rope head's slots.
   When every layer keeps the same R = 1 frequencies, nothing is added. The table is plain RoPE
   (`rope_theta`) when the slot frequencies are `theta^(-2s / dr')`; otherwise `longrope` with
   `rope_theta` 1, `attention_factor` 1 and per-slot factors `1 / frequency` (transformers computes
   `1 / factor`). vLLM's and SGLang's DeepSeek attention read only plain RoPE or YaRN (vLLM maps any
   other `rope_type` to its `deepseek_yarn`) and build their projections without biases:
   `vllm_obstacles` says whether an export meets both (and their kernels' head sizes).
   The source table's `attention_scaling` (llama3, yarn) multiplies cos and sin, so the rope score
   term by its square: it is folded into the query rope rows.
3. **The softmax scale** is `(dn + dr')^-0.5` there; ours is the source's. Their ratio is folded into
   `q_proj` (every row of a query scales its score).
4. **Biases.** `q_proj` has none without `q_lora_rank`: a source query bias (Qwen2) is refused
   there. With `q_lora_rank` (the truncated SVD W_UQ W_DQ of the query rows, through
   `q_a_layernorm` made linear as in 1) one more `q_a_proj` slot holds the constant 1 (its bias) and
   `q_b_proj`'s column for it is the query bias: at full rank (the hidden size) exact. A key bias and
   our `o_proj` bias go to `kv_a_proj_with_mqa` / `o_proj`. `attention_bias` is set only when one of
   these exists (missing ones are then written as zeros).
5. **One `kv_lora_rank`.** Adaptive per-layer ranks are zero-padded to the largest: exact, and the
   export caches the largest in every layer (`kv_geometry` reports it).
6. **Dense layers.** `first_k_dense_replace = num_hidden_layers` (no experts), the source's MLP
   width and activation; `lm_head` is written even where the source ties it.
7. **One eps.** Section 1 depends on the latent norm's `eps`, and transformers builds `kv_a_layernorm`
   (and `q_a_layernorm`) with 1e-6 whatever the config says, while vLLM and SGLang read the config's
   `rms_norm_eps`. So the export's `rms_norm_eps` is 1e-6 too, and the source's own `eps_s` is kept
   for the decoder norms by scaling the residual stream by `s = sqrt(1e-6 / eps_s)`: RMSNorm is
   scale-invariant but for its eps, `RMSNorm(s h; s^2 eps_s) = RMSNorm(h; eps_s)`. The embeddings and
   every layer's `o_proj` and `down_proj` (what writes into the stream) are multiplied by `s`;
   `lm_head` reads the final norm's output and is not (s = 1 where the source's eps is 1e-6).
"""

from __future__ import annotations

import math
from collections import Counter

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, PreTrainedModel

from .convert.config import VLLM_GEOMETRIES
from .convert.convert import deepseek_v3_problem
from .errors import MlaifyError

# Relative error bound of the latent norm made linear (section 1 above), as a power of two.
NORM_ERROR_BITS = 21
# The eps of every norm of the export (section 7): what transformers' DeepseekV3 gives its latent norms.
NORM_EPS = 1e-6
# Tensors that write into the residual stream, scaled by sqrt(NORM_EPS / the source's eps) (section 7).
_RESIDUAL_WRITERS = (
    "self_attn.o_proj.weight",
    "self_attn.o_proj.bias",
    "mlp.down_proj.weight",
    "mlp.down_proj.bias",
)


def vllm_obstacles(config) -> list[str]:
    """Why vLLM's and SGLang's DeepSeek attention could not serve a DeepSeek-V3 export exactly (none:
    it could): their MLA kernels' head sizes, projections without biases, plain RoPE or YaRN tables."""
    obstacles = []
    geometry = (config.kv_lora_rank, config.qk_rope_head_dim)
    if geometry not in VLLM_GEOMETRIES:
        kernels = " or ".join(f"{r} + {dr}" for r, dr in VLLM_GEOMETRIES)
        obstacles.append(
            f"their MLA kernels take a latent + rope key of {kernels}, not {geometry[0]} + {geometry[1]} "
            "(`mlaify convert --target vllm` picks one)"
        )
    if config.attention_bias:
        obstacles.append("their DeepSeek projections have no biases, and this one carries the source's")
    rope = config.rope_parameters["rope_type"]
    if rope not in ("default", "yarn"):
        obstacles.append(
            f"they read plain RoPE or YaRN, not `{rope}` (rope frequencies that are not one plain table)"
        )
    return obstacles


def shared_rope_slots(rope_pairs: list[list[list[int]]]) -> tuple[list[int], list[list[list[int]]]]:
    """The export's rope slots (source frequency indices, ascending) and, per layer, rope head and kept
    pair, the slot it is written to: each frequency gets as many slots as the layer that keeps it
    most often needs."""
    need = Counter()
    for layer in rope_pairs:
        for freq, count in Counter(p for head in layer for p in head).items():
            need[freq] = max(need[freq], count)
    slots = sorted(need.elements())
    placed = []
    for layer in rope_pairs:
        free = {f: [s for s, g in enumerate(slots) if g == f] for f in need}
        placed.append([[free[p].pop(0) for p in head] for head in layer])
    return slots, placed


def rope_parameters(inv_freq: torch.Tensor, max_positions: int, theta: float | None = None) -> dict:
    """`rope_parameters` whose table has exactly these per-slot frequencies (float64 in): plain RoPE
    where they are `base^(-s / m)`, the base tried being the source's `theta` (the exact one, where
    the frequencies are a plain subset of its table), then the one the second frequency implies."""
    m = len(inv_freq)
    if m > 1 and abs(float(inv_freq[0]) - 1) < 1e-12:
        for base in (theta, float(inv_freq[1]) ** -m):
            plain = base ** (-torch.arange(m, dtype=torch.float64) / m) if base else None
            if plain is not None and torch.allclose(plain, inv_freq, rtol=1e-6, atol=0):
                return {"rope_type": "default", "rope_theta": base}
    return {
        "rope_type": "longrope",
        "rope_theta": 1.0,  # base**x == 1: the table is 1 / factor
        "short_factor": (1 / inv_freq).tolist(),
        "long_factor": (1 / inv_freq).tolist(),
        "attention_factor": 1.0,
        "factor": 1.0,
        "original_max_position_embeddings": max_positions,  # never exceeded: one table at every length
    }


def _refuse_unsupported(mla: PreTrainedModel, q_lora_rank: int | None) -> None:
    config, text = mla.config, mla.config.text_config
    if q_lora_rank is None and any(layer.self_attn.q_proj.bias is not None for layer in mla.model.layers):
        bias = torch.cat([layer.self_attn.q_proj.bias for layer in mla.model.layers])
        if bias.abs().max() > 0:
            raise MlaifyError(
                "this model has query biases (Qwen2) and DeepSeek-V3's q_proj has none; pass --q-lora-rank "
                f"{config.text_config.hidden_size} (the hidden size: exact) to carry them through q_b_proj"
            )
    if config.source_attention_layers:
        raise MlaifyError(
            "layers that kept the source's attention (--keep-sliding) have no DeepSeek-V3 form; convert "
            "without --keep-sliding to export"
        )
    problem = deepseek_v3_problem(text)
    if problem:
        raise MlaifyError(
            f"this {text.model_type} source {problem}, so it has no exact DeepSeek-V3 form; serve it with "
            "mlaify's own class"
        )


def _linear_norm(w: torch.Tensor, b: torch.Tensor, slots: int, input_norm: torch.Tensor, eps: float):
    """`alpha [w ; 0]`, `alpha [b ; 0]` zero-padded to `slots` rows and the norm weight `sqrt(eps) / alpha`
    that make an RMSNorm of them give back `w h + b` to a relative 2^-NORM_ERROR_BITS for every input h,
    |h| bounded by sqrt(d) max|gamma| (h is the output of the layer's input RMSNorm with weight gamma;
    section 1 of the module docstring)."""
    h_bound = math.sqrt(w.shape[1]) * input_norm.double().abs().max()
    bound = float(torch.linalg.matrix_norm(w, ord=2) * h_bound + b.norm())
    # alpha^2 bound^2 / (2 slots eps) <= 2^-bits, alpha a power of two
    limit = math.sqrt(slots * eps * 2.0 ** (1 - NORM_ERROR_BITS)) / max(bound, 1e-30)
    alpha = 2.0 ** math.floor(math.log2(limit))
    n = w.shape[0]
    w_out, b_out = w.new_zeros(slots, w.shape[1]), w.new_zeros(slots)
    w_out[:n], b_out[:n] = alpha * w, alpha * b
    return w_out, b_out, w.new_full((slots,), math.sqrt(eps) / alpha)


def check_dtype(dtype: torch.dtype | None) -> None:
    """An export's dtype, checked before any work: float16 would flush the scaled latent rows to zero."""
    if dtype == torch.float16:
        raise MlaifyError(
            "the exact latent norm scales kv_a_proj_with_mqa below float16's normal range; convert or "
            "export in bfloat16 or float32 (--dtype bfloat16)"
        )


def to_deepseek_v3(mla: PreTrainedModel, q_lora_rank: int | None = None) -> DeepseekV3ForCausalLM:
    """The stock DeepSeek-V3 model that computes `mla`'s function (module docstring), in `mla`'s dtype.

    `q_lora_rank` compresses the queries (W_DQ, W_UQ: the truncated SVD of each layer's query rows,
    through `q_a_layernorm` made linear as the latent's): fewer parameters and FLOPs, no change in the
    cache, exact only at full rank (the hidden size)."""
    _refuse_unsupported(mla, q_lora_rank)
    hidden = mla.config.text_config.hidden_size
    if q_lora_rank is not None and not 1 <= q_lora_rank <= hidden:
        raise MlaifyError(f"--q-lora-rank must be between 1 and the hidden size {hidden}, got {q_lora_rank}")
    check_dtype(next(mla.parameters()).dtype)
    config, text = mla.config, mla.config.text_config
    H, L, d = text.num_attention_heads, text.num_hidden_layers, text.hidden_size
    R, dn, dv = config.n_rope_heads, config.qk_nope_head_dim, config.v_head_dim
    r_out = max(config.layer_kv_lora_rank(i) for i in range(L))
    attns = [layer.self_attn for layer in mla.model.layers]
    bias_slot = q_lora_rank is not None and any(a.q_proj.bias is not None for a in attns)
    biased = bias_slot or any(p.bias is not None for a in attns for p in (a.kv_a_proj_with_mqa, a.o_proj))
    slots, placed = shared_rope_slots(config.rope_pairs)
    rotary = mla.model.rotary_emb
    inv_freq = rotary.inv_freq.double()[slots]
    dr_out = 2 * len(slots)
    attention_scaling = float(getattr(rotary, "attention_scaling", 1.0))
    q_scale = config.softmax_scale / (dn + dr_out) ** -0.5
    out_config = DeepseekV3Config(
        vocab_size=text.vocab_size,
        hidden_size=d,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=L,
        num_attention_heads=H,
        num_key_value_heads=H,
        first_k_dense_replace=L,
        n_routed_experts=1,
        n_shared_experts=0,
        num_experts_per_tok=1,
        n_group=1,
        topk_group=1,
        kv_lora_rank=r_out,
        q_lora_rank=None if q_lora_rank is None else q_lora_rank + bias_slot,  # + the query bias's slot
        qk_rope_head_dim=dr_out,
        qk_nope_head_dim=dn,
        v_head_dim=dv,
        hidden_act=text.hidden_act,
        max_position_embeddings=text.max_position_embeddings,
        rms_norm_eps=NORM_EPS,
        rope_parameters=rope_parameters(
            inv_freq, text.max_position_embeddings, (text.rope_parameters or {}).get("rope_theta")
        ),
        rope_interleave=True,
        attention_bias=biased,
        tie_word_embeddings=False,
        num_mtp_layers=0,
        bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id,
        pad_token_id=text.pad_token_id,
        # Provenance (read by `kv_geometry` and the model card; DeepSeek-V3 ignores both).
        conversion=getattr(config, "conversion", None),
        mlaify_export={
            "source_model_type": text.model_type,
            "source_kv_values_per_token_per_layer": 2 * text.num_key_value_heads * config.head_dim,
            "mlaify_kv_values_per_token": sum(config.kv_values_per_token(i) for i in range(L)),
        },
    )
    state = {}
    with torch.no_grad():
        for i, layer in enumerate(mla.model.layers):
            layer_state = _layer_state(
                i,
                layer,
                placed[i],
                r_out,
                dr_out,
                q_scale,
                attention_scaling,
                H,
                R,
                d,
                q_lora_rank,
                bias_slot,
            )
            state.update({k: v for k, v in layer_state.items() if biased or not k.endswith(".bias")})
        src = mla.state_dict()
        for name, value in src.items():
            if ".self_attn." not in name and name != "lm_head.weight":
                state[name] = value
        residual = math.sqrt(NORM_EPS / text.rms_norm_eps)  # section 7
        for name in state:
            if name == "model.embed_tokens.weight" or name.endswith(_RESIDUAL_WRITERS):
                state[name] = state[name] * residual
        state["lm_head.weight"] = mla.lm_head.weight
        out = DeepseekV3ForCausalLM(out_config)
        state = {k: v.to(torch.float32) for k, v in state.items()}
        missing, unexpected = out.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"export produced a mismatched state dict: missing {missing}, unexpected {unexpected}"
        )
    out.generation_config = mla.generation_config
    return out.to(next(mla.parameters()).dtype).eval()


def _layer_state(
    i, layer, placed, r_out, dr_out, q_scale, attention_scaling, H, R, d, q_lora_rank, bias_slot
) -> dict:
    """One layer's DeepSeek-V3 attention weights from ours (float64 maths), biases included (zeros where
    ours has none); `bias_slot`: the query compression carries the query bias in one more slot."""
    attn = layer.self_attn
    r, dn, dr = attn.kv_lora_rank, attn.qk_nope_head_dim, attn.qk_rope_head_dim
    half = dr // 2
    group = H // R
    # Our rope rows per rope head are [pairs ; pairs + d_h/2] (rotate_half); export slot s takes the
    # pair's first dim at row 2s and its second at 2s + 1 (interleaved).
    rows = torch.full((R, dr), -1, dtype=torch.long)
    for g, head in enumerate(placed):
        for j, s in enumerate(head):
            rows[g, j], rows[g, j + half] = 2 * s, 2 * s + 1

    q_bias = attn.q_proj.bias if attn.q_proj.bias is not None else attn.q_proj.weight.new_zeros(H * (dn + dr))
    q = torch.cat([attn.q_proj.weight, q_bias[:, None]], dim=1).double().view(H, dn + dr, d + 1)
    q_out = q.new_zeros(H, dn + dr_out, d + 1)  # the bias rides along as a last column
    q_out[:, :dn] = q[:, :dn]
    rope_gain = attention_scaling**2  # ours rotates with the source table's scaled cos / sin
    for h in range(H):
        q_out[h, dn + rows[h // group]] = q[h, dn:] * rope_gain
    q_out *= q_scale

    kv_a = attn.kv_a_proj_with_mqa
    w_a = kv_a.weight.double()
    b_a = kv_a.bias.double() if kv_a.bias is not None else w_a.new_zeros(w_a.shape[0])
    w_lat, b_lat, norm = _linear_norm(w_a[:r], b_a[:r], r_out, layer.input_layernorm.weight, NORM_EPS)
    w_rope, b_rope = w_a.new_zeros(dr_out, d), w_a.new_zeros(dr_out)
    w_rope[rows.flatten()], b_rope[rows.flatten()] = w_a[r:], b_a[r:]

    kv_b = attn.kv_b_proj.weight.double()  # [H * (dn + dv), r]
    kv_b_out = kv_b.new_zeros(kv_b.shape[0], r_out)
    kv_b_out[:, :r] = kv_b

    o = attn.o_proj
    o_bias = o.bias.double() if o.bias is not None else o.weight.new_zeros(d, dtype=torch.float64)
    prefix = f"model.layers.{i}.self_attn."
    weights = {}
    q_out, q_bias = q_out.reshape(-1, d + 1).split([d, 1], dim=1)
    if q_lora_rank is None:
        weights[prefix + "q_proj.weight"] = q_out
    else:  # W_UQ W_DQ: the truncated SVD of the query rows, through q_a_layernorm like the latent; with
        # `bias_slot`, one more slot reads the constant 1 after the norm; q_b_proj's column for it: the bias
        u, sv, vh = torch.linalg.svd(q_out, full_matrices=False)
        root = sv[:q_lora_rank].sqrt()
        w_dq = root[:, None] * vh[:q_lora_rank]
        w_uq = u[:, :q_lora_rank] * root
        b_dq = w_dq.new_zeros(q_lora_rank + bias_slot)
        if bias_slot:
            b_dq[-1], w_uq = 1.0, torch.cat([w_uq, q_bias], dim=1)
            w_dq = torch.cat([w_dq, w_dq.new_zeros(1, d)])
        w_q_a, b_q_a, q_norm = _linear_norm(w_dq, b_dq, len(b_dq), layer.input_layernorm.weight, NORM_EPS)
        weights.update(
            {
                prefix + "q_a_proj.weight": w_q_a,
                prefix + "q_a_proj.bias": b_q_a,
                prefix + "q_a_layernorm.weight": q_norm,
                prefix + "q_b_proj.weight": w_uq,
            }
        )
    return {
        **weights,
        prefix + "kv_a_proj_with_mqa.weight": torch.cat([w_lat, w_rope]),
        prefix + "kv_a_proj_with_mqa.bias": torch.cat([b_lat, b_rope]),
        prefix + "kv_a_layernorm.weight": norm,
        prefix + "kv_b_proj.weight": kv_b_out,
        prefix + "o_proj.weight": o.weight.double(),
        prefix + "o_proj.bias": o_bias,
    }
