"""`convert_to_mla`: a Llama-family causal LM in, an `MlaifyForCausalLM` out, one layer at a time.

Per layer (DESIGN.md section 2): split each KV head's dims into rotary and NoPE (step 1, `rope.py`),
factor the NoPE keys and the values through one latent (step 2, `lowrank.py`), and rearrange
the query rows to match. Biases: the NoPE part of a key bias cancels in the softmax (it shifts
every score of a query equally) and is dropped; the rotary part stays on `kv_a_proj_with_mqa`;
a value bias adds the constant `W_O b_V` to the output and folds into the `o_proj` bias.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..errors import MlaifyError
from ..loading import load_model
from ..modeling import MlaifyConfig, MlaifyForCausalLM
from .config import DTYPES, MLAConversionConfig
from .lowrank import factor_weights, max_rank
from .rope import select_rope_pairs, split_dims

log = logging.getLogger(__name__)

# Families whose attention is q/k/v/o projections with HF-layout RoPE on every head dim.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass
class SourceGeometry:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_layers: int

    @classmethod
    def of(cls, config) -> SourceGeometry:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads or config.num_attention_heads,
            head_dim,
            config.num_hidden_layers,
        )

    @property
    def kv_values_per_token_per_layer(self) -> int:
        return 2 * self.num_kv_heads * self.head_dim


@dataclass
class Plan:
    """The MLA geometry a config resolves to for one source model."""

    kv_lora_rank: int
    qk_rope_head_dim: int
    n_rope_heads: int
    rope_pairs: list[list[int]]  # per rope head, shared by all layers


def plan_geometry(src: SourceGeometry, cfg: MLAConversionConfig) -> Plan:
    """Resolve the budget options to a rank and check every size against the source."""
    if src.head_dim % 2:
        raise MlaifyError(f"head_dim {src.head_dim} is odd; RoPE needs pairs of dims")
    if cfg.rope_strategy == "all":
        d_r = src.head_dim
        if cfg.qk_rope_head_dim not in (None, d_r):
            raise MlaifyError(f"rope strategy 'all' keeps every dim rotary; drop --rope-dim or set it to {d_r}")
    else:
        d_r = cfg.qk_rope_head_dim or max(2, src.head_dim // 4 // 2 * 2)
        if d_r >= src.head_dim:
            raise MlaifyError(
                f"rope dim {d_r} is too large: it must be below the head dim {src.head_dim} "
                "(use --rope-strategy all to keep every dim rotary)"
            )
    n_rope = src.num_kv_heads
    rope_values = n_rope * d_r
    nope_rows = src.num_kv_heads * (src.head_dim - d_r)
    r_max = min(nope_rows + src.num_kv_heads * src.head_dim, src.hidden_size)
    if cfg.kv_lora_rank is not None:
        rank = cfg.kv_lora_rank
    else:
        budget = cfg.kv_budget or round(src.kv_values_per_token_per_layer * (1 - cfg.kv_reduction))
        rank = budget - rope_values
        if rank < 1:
            raise MlaifyError(
                f"a KV budget of {budget} values leaves no room for the latent: the rope keys alone take "
                f"{n_rope} x {d_r} = {rope_values}; lower --rope-dim or raise the budget"
            )
    if rank > r_max:
        raise MlaifyError(
            f"kv_lora_rank {rank} is above the maximum {r_max} for this model "
            f"(min of hidden size {src.hidden_size} and the {nope_rows + src.num_kv_heads * src.head_dim} "
            "stacked K_nope/V rows); lower it"
        )
    pairs = select_rope_pairs(cfg.rope_strategy, src.head_dim, d_r, n_rope)
    return Plan(rank, d_r, n_rope, pairs)


def check_convertible(config, cfg: MLAConversionConfig) -> Plan:
    """Fail on an unsupported model or impossible geometry from the config alone, before loading weights."""
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise MlaifyError(
            f"model type {config.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return plan_geometry(SourceGeometry.of(config), cfg)


@torch.inference_mode()
def convert_attention(attn: nn.Module, src: SourceGeometry, plan: Plan, cfg: MLAConversionConfig, layer: int):
    """MLA weights (DeepSeek names) for one source attention module, in float64."""
    d, d_h, n_kv, n_h = src.hidden_size, src.head_dim, src.num_kv_heads, src.num_heads
    group = n_h // n_kv
    w_q = attn.q_proj.weight.double().view(n_h, d_h, d)
    w_k = attn.k_proj.weight.double().view(n_kv, d_h, d)
    w_v = attn.v_proj.weight.double().view(n_kv * d_h, d)
    b_q, b_k, b_v, b_o = (
        None if p.bias is None else p.bias.double() for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)
    )
    dims = [split_dims(plan.rope_pairs[g], d_h) for g in range(n_kv)]  # (rope, nope) per KV head
    w_k_nope = torch.cat([w_k[g, nope] for g, (_, nope) in enumerate(dims)])  # [n_kv * dn, d]
    factors = factor_weights(w_k_nope, w_v, plan.kv_lora_rank, cfg.kv_balance)
    log.debug("layer %d: relative error K_nope %.4f, V %.4f", layer, factors.k_error, factors.v_error)

    # Query head h reads KV head h // group: rows [q_nope ; q_rope] in that head's dim order.
    order = [torch.tensor(dims[h // group][1] + dims[h // group][0]) for h in range(n_h)]
    weights = {"q_proj.weight": torch.cat([w_q[h, order[h]] for h in range(n_h)])}
    if b_q is not None or b_k is not None:  # Qwen2: q and k biases; a missing one is zero
        b_q = b_q if b_q is not None else w_q.new_zeros(n_h * d_h)
        b_k = b_k if b_k is not None else w_q.new_zeros(n_kv * d_h)
        weights["q_proj.bias"] = torch.cat([b_q.view(n_h, d_h)[h, order[h]] for h in range(n_h)])

    w_kr = torch.cat([w_k[g, rope] for g, (rope, _) in enumerate(dims)])  # [R * d_r, d]
    weights["kv_a_proj_with_mqa.weight"] = torch.cat([factors.w_dkv, w_kr])
    if b_k is not None:
        b_kr = torch.cat([b_k.view(n_kv, d_h)[g, rope] for g, (rope, _) in enumerate(dims)])
        weights["kv_a_proj_with_mqa.bias"] = torch.cat([b_kr.new_zeros(plan.kv_lora_rank), b_kr])

    d_n = d_h - plan.qk_rope_head_dim
    w_uk = factors.w_uk.view(n_kv, d_n, plan.kv_lora_rank)
    w_uv = factors.w_uv.view(n_kv, d_h, plan.kv_lora_rank)
    weights["kv_b_proj.weight"] = torch.cat([torch.cat([w_uk[h // group], w_uv[h // group]]) for h in range(n_h)])

    weights["o_proj.weight"] = attn.o_proj.weight.double()
    if b_v is not None or b_o is not None:
        o_bias = b_o if b_o is not None else torch.zeros(d, dtype=torch.float64)
        if b_v is not None:  # softmax weights sum to one, so the value bias reaches the output unchanged
            o_bias = o_bias + weights["o_proj.weight"] @ b_v.view(n_kv, 1, d_h).expand(n_kv, group, d_h).reshape(-1)
        weights["o_proj.bias"] = o_bias
    return weights, factors


def _source_attention_layers(model: PreTrainedModel) -> list[nn.Module]:
    return [layer.self_attn for layer in model.model.layers]


def _has_bias(model: PreTrainedModel, proj: str) -> bool:
    return getattr(model.model.layers[0].self_attn, proj).bias is not None


def convert_to_mla(
    model_or_path: str | PreTrainedModel, config: MLAConversionConfig | None = None
) -> MlaifyForCausalLM:
    """Convert a Llama/Mistral/Qwen2 causal LM (object, folder, .gguf or hub id) to MLA."""
    cfg = config or MLAConversionConfig()
    source = load_model(model_or_path)
    plan = check_convertible(source.config, cfg)
    src = SourceGeometry.of(source.config)
    dtype = DTYPES[cfg.dtype] if cfg.dtype else next(source.parameters()).dtype

    text_config = source.config.to_dict()
    text_config.pop("quantization_config", None)
    mla_config = MlaifyConfig(
        text_config=text_config,
        kv_lora_rank=plan.kv_lora_rank,
        qk_rope_head_dim=plan.qk_rope_head_dim,
        n_rope_heads=plan.n_rope_heads,
        rope_pairs=[plan.rope_pairs] * src.num_layers,
        softmax_scale=src.head_dim**-0.5,
        attention_bias=any(_has_bias(source, name) for name in ("q_proj", "k_proj")),
        o_proj_bias=any(_has_bias(source, name) for name in ("v_proj", "o_proj")),
    )
    state = {k: v for k, v in source.state_dict().items() if ".self_attn." not in k}
    errors = []
    layers = _source_attention_layers(source)
    for i, attn in enumerate(tqdm(layers, desc="converting layers", unit="layer", leave=False)):
        weights, factors = convert_attention(attn, src, plan, cfg, i)
        state.update({f"model.layers.{i}.self_attn.{k}": w for k, w in weights.items()})
        errors.append((factors.k_error, factors.v_error))
    log.info(
        "mean relative weight error over %d layers: K_nope %.4f, V %.4f",
        len(errors),
        sum(e[0] for e in errors) / len(errors),
        sum(e[1] for e in errors) / len(errors),
    )

    mla = MlaifyForCausalLM(mla_config)
    state = {k: v.to(torch.float32) for k, v in state.items()}
    state.update({k: v for k, v in mla.state_dict().items() if k.endswith("rope_dims")})
    if mla_config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = mla.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and mla_config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"conversion produced a mismatched state dict: missing {missing}, unexpected {unexpected}")
    mla.tie_weights()
    mla.config.name_or_path = source.config.name_or_path
    return mla.to(dtype).eval()
