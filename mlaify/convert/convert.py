"""`convert_to_mla`: a Llama-family causal LM in, an `MlaifyForCausalLM` out, one layer at a time.

Per layer (DESIGN.md section 2): split each KV head's dims into rotary and NoPE (step 1, `rope.py`),
factor the NoPE keys and the values through one latent (step 2, `lowrank.py`), and rearrange
the query rows to match. Given calibration windows, step 3 (`refit.py`) then refits what reads the
cache (per-head W_UV and o_proj) by least squares against the source's attention outputs.
Biases: the NoPE part of a key bias cancels in the softmax (it shifts every score of a query
equally) and is dropped; the rotary part stays on `kv_a_proj_with_mqa`; a value bias adds the
constant `W_O b_V` to the output and folds into the `o_proj` bias.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..devices import resolve_device
from ..errors import MlaifyError
from ..loading import check_finite, load_config
from ..modeling import MlaifyConfig, MlaifyForCausalLM
from ..modeling.modeling_mlaify import MLAAttention, rope_dims
from ..saving import save_model_files
from ..shards import ShardWriter
from .allocation import allocate_ranks
from .calibration import CalibrationStats
from .config import DTYPES, VLLM_GEOMETRIES, MLAConversionConfig
from .lowrank import LatentFactors, latent_problem
from .refit import Refitter
from .rope import (
    HeadSplit,
    average_removed_rope,
    expected_rotation,
    rotated_components,
    select_rope_pairs,
    shared_pair_counts,
    split_by_pairs,
    split_rotated,
)
from .source import (
    ATTENTION,
    LayerSource,
    SafetensorsLayers,
    head_norm_gain,
    layer_prefix,
    layer_source,
    release_memory,
    text_part,
)

log = logging.getLogger(__name__)

# Families whose attention is q/k/v/o projections (fused into one qkv_proj in Phi-3) with HF-layout
# RoPE on every head dim (and, for Qwen3 and Gemma3, a per-head RMSNorm of queries and keys before it).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3")
QK_NORM_MODEL_TYPES = ("qwen3", "gemma3_text")


@dataclass
class SourceGeometry:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_layers: int
    key_scales: int = 0  # values an MLA layer caches per token besides latent and rope keys (qk-norm)

    @classmethod
    def of(cls, config) -> SourceGeometry:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        n_kv = config.num_key_value_heads or config.num_attention_heads
        return cls(
            config.hidden_size,
            config.num_attention_heads,
            n_kv,
            head_dim,
            config.num_hidden_layers,
            n_kv if config.model_type in QK_NORM_MODEL_TYPES else 0,
        )

    @property
    def kv_values_per_token_per_layer(self) -> int:
        return 2 * self.num_kv_heads * self.head_dim


@dataclass
class Plan:
    """The MLA geometry a config resolves to for one source model (rope pairs are chosen per layer)."""

    kv_lora_rank: int  # per layer under uniform allocation; the mean under adaptive
    qk_rope_head_dim: int
    n_rope_heads: int
    qk_nope_head_dim: int
    max_rank: int
    rope_fold: int  # frequency pairs per `rotate` mixing space; 1 where the rope key has room for all


def _default_rope_dim(strategy: str, head_dim: int) -> int:
    if strategy == "all":
        return head_dim
    if strategy == "rotate":  # one rope key for all KV heads: twice the per-head default
        return max(2, head_dim // 2 // 2 * 2)
    return max(2, head_dim // 4 // 2 * 2)


def plan_geometry(src: SourceGeometry, cfg: MLAConversionConfig) -> Plan:
    """Resolve the budget options to a rank and check every size against the source (`cfg` resolved)."""
    if src.head_dim % 2:
        raise MlaifyError(f"head_dim {src.head_dim} is odd; RoPE needs pairs of dims")
    strategy = cfg.rope_strategy or "high"
    d_r = cfg.qk_rope_head_dim or _default_rope_dim(strategy, src.head_dim)
    budget = None
    if cfg.kv_lora_rank is None:
        budget = cfg.kv_budget or round(src.kv_values_per_token_per_layer * (1 - cfg.kv_reduction))
    if cfg.target == "vllm":
        budget, d_r = _vllm_budget(src, cfg, budget), VLLM_ROPE_DIM
    elif budget is not None and cfg.qk_rope_head_dim is None and strategy != "all":
        # "rotate" gives its shared rope key half the budget (the best split measured on SmolLM2,
        # benchmarks/results/quality_explore.md); per-head strategies keep their default unless it
        # would leave the latent less than half the budget.
        if strategy == "rotate":
            d_r = max(2, min(src.num_kv_heads * src.head_dim, budget // 2 // 2 * 2))
        else:
            d_r = max(2, min(d_r, budget // 2 // src.num_kv_heads // 2 * 2))
    if strategy == "all" and d_r != src.head_dim:
        raise MlaifyError(
            f"rope strategy 'all' keeps every dim rotary; drop --rope-dim or set it to {src.head_dim}"
        )
    if strategy == "rotate":
        n_rope, d_n = 1, src.head_dim
        if d_r > src.num_kv_heads * src.head_dim:
            raise MlaifyError(
                f"rope dim {d_r} is too large: 'rotate' mixes at most {src.num_kv_heads} x {src.head_dim} "
                f"= {src.num_kv_heads * src.head_dim} dims into its rope key; lower --rope-dim"
            )
    else:
        n_rope, d_n = src.num_kv_heads, src.head_dim - d_r
        if strategy != "all" and d_r >= src.head_dim:
            raise MlaifyError(
                f"rope dim {d_r} is too large: it must be below the head dim {src.head_dim} "
                "(use --rope-strategy all to keep every dim rotary)"
            )
    rope_values = n_rope * d_r
    stacked = src.num_kv_heads * (d_n + src.head_dim)
    r_max = min(stacked, src.hidden_size)
    if budget is None:
        rank = cfg.kv_lora_rank
    else:
        # a qk-norm source's key scales are `key_scales` more values
        rank = budget - rope_values - src.key_scales
        if rank < 1:
            raise MlaifyError(
                f"a KV budget of {budget} values leaves no room for the latent: the rope keys alone take "
                f"{n_rope} x {d_r} = {rope_values}"
                + (f" and the key scales {src.key_scales}" if src.key_scales else "")
                + "; lower --rope-dim or raise the budget"
            )
    if rank > r_max:
        raise MlaifyError(
            f"kv_lora_rank {rank} is above the maximum {r_max} for this model "
            f"(min of hidden size {src.hidden_size} and the {stacked} stacked K_nope/V rows); lower it"
        )
    return Plan(rank, d_r, n_rope, d_n, r_max, _rope_fold(src, cfg, d_r))


def _rope_fold(src: SourceGeometry, cfg: MLAConversionConfig, d_r: int) -> int:
    """`cfg.rope_fold`, but 1 where the rope key has room for every `rotate` component: keeping them
    all unfolded is exact, folded it is not (rope.py)."""
    if (src.head_dim // 2) % cfg.rope_fold:
        raise MlaifyError(
            f"--rope-fold {cfg.rope_fold} does not divide the {src.head_dim // 2} frequency pairs of "
            f"this model's heads; use a divisor of {src.head_dim // 2}"
        )
    return 1 if d_r // 2 >= src.num_kv_heads * src.head_dim // 2 else cfg.rope_fold


VLLM_ROPE_DIM = VLLM_GEOMETRIES[0][1]


def _vllm_budget(src: SourceGeometry, cfg: MLAConversionConfig, budget: int | None) -> int:
    """`--target vllm`: the largest of VLLM_GEOMETRIES within the budget and below the source's cache,
    or one line naming the nearest; its rope key takes one component of every (d_h / 64)-th pair."""
    if cfg.qk_rope_head_dim not in (None, VLLM_ROPE_DIM):
        raise MlaifyError(
            f"--target vllm keeps a rope key of {VLLM_ROPE_DIM} dims (vLLM's kernels); drop --rope-dim"
        )
    if src.head_dim % VLLM_ROPE_DIM:
        raise MlaifyError(
            f"--target vllm builds its {VLLM_ROPE_DIM}-dim rope key from every (head_dim / 64)-th frequency "
            f"pair, and head_dim {src.head_dim} is not a multiple of 64"
        )
    sizes = [r + dr for r, dr in VLLM_GEOMETRIES]
    below = [n for n in sizes if n < src.kv_values_per_token_per_layer]
    if not below:
        raise MlaifyError(
            f"--target vllm caches {' or '.join(map(str, sizes))} values per token and layer (vLLM's MLA "
            f"kernels), none of them below this model's {src.kv_values_per_token_per_layer}; use "
            "--target deepseek_v3 (any budget, stock transformers)"
        )
    if cfg.kv_lora_rank is not None:
        budget = cfg.kv_lora_rank + VLLM_ROPE_DIM
        if budget not in below:
            ranks = [n - VLLM_ROPE_DIM for n in below]
            raise MlaifyError(
                f"--target vllm runs a latent of {' or '.join(map(str, ranks))} on this model, not "
                f"{cfg.kv_lora_rank}; pass --kv-lora-rank {ranks[0]} or a --kv-budget"
            )
    fits = [n for n in below if n <= budget]
    if not fits:
        nearest = min(below, key=lambda n: abs(n - budget))
        raise MlaifyError(
            f"--target vllm caches {' or '.join(map(str, below))} values per token and layer on this model "
            f"(vLLM's MLA kernels), and a budget of {budget} holds none of them; the nearest is "
            f"--kv-budget {nearest} ({1 - nearest / src.kv_values_per_token_per_layer:.0%} smaller than "
            "the source's)"
        )
    if max(fits) != budget:
        log.info("--target vllm: budget %d -> %d values per token and layer", budget, max(fits))
    return max(fits)


def vllm_pair_counts(head_dim: int) -> list[int]:
    """`--target vllm`'s rope key: one component of every (head_dim / 64)-th frequency pair from pair 0,
    whose frequencies `theta^(-2 s / 64)` are one plain RoPE table (the source's own theta)."""
    step = head_dim // VLLM_ROPE_DIM
    return [int(j % step == 0) for j in range(head_dim // 2)]


DEEPSEEK_V3_DECODERS = ("llama", "mistral", "qwen2")  # decoder layers laid out as DeepSeek-V3's


def deepseek_v3_problem(config) -> str | None:
    """What of a source's (text) config the stock DeepSeek-V3 attention has no exact form for, worded
    to follow "this {model_type} source"; None if nothing. Convert (`--target deepseek_v3|vllm`) asks
    before any work, export (`--format deepseek_v3`) again for folders converted without a target."""
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    window = getattr(config, "sliding_window", None)
    problems = [
        (
            config.model_type in QK_NORM_MODEL_TYPES,
            "normalises each key head, and DeepSeek-V3 caches no per-token key scale to do it with",
        ),
        (config.model_type not in DEEPSEEK_V3_DECODERS, "has decoder layers unlike DeepSeek-V3's"),
        (
            window is not None and window < config.max_position_embeddings,
            f"attends in a sliding window of {window} tokens, and DeepSeek-V3 to the whole context",
        ),
        (rope in ("dynamic", "longrope"), f"changes its RoPE frequencies ({rope}) with the sequence length"),
    ]
    return next((text for found, text in problems if found), None)


def _check_target(config, target: str) -> None:
    """Refuse a `deepseek_v3` / `vllm` target the source cannot meet, from its config alone."""
    problem = deepseek_v3_problem(config)
    if problem:
        raise MlaifyError(
            f"--target {target} needs attention that DeepSeek-V3 can hold, and this {config.model_type} "
            f"source {problem}; use --target mlaify (our class)"
        )
    if target != "vllm":
        return
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    problems = [  # what vLLM's DeepSeek attention reads beyond the stock model: no biases, plain RoPE
        (config.model_type == "qwen2" or getattr(config, "attention_bias", False), "has attention biases"),
        (rope != "default", f"scales its RoPE table ({rope})"),
    ]
    problem = next((text for found, text in problems if found), None)
    if problem:
        raise MlaifyError(
            f"--target vllm needs what vLLM's DeepSeek attention reads, and this {config.model_type} source "
            f"{problem}; use --target mlaify (our class) or --target deepseek_v3 (stock transformers)"
        )


def check_convertible(config, cfg: MLAConversionConfig, calibrated: bool = False) -> Plan:
    """Fail on an unsupported model or impossible geometry from the config alone, before loading weights."""
    config = text_part(config)[0]
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise MlaifyError(
            f"model type {config.model_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    partial = (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
    if partial != 1.0:
        raise MlaifyError(
            f"this {config.model_type} model rotates only {partial:g} of each head's dims; mlaify's rope "
            "split assumes RoPE on every dim, so partial rotary embeddings are not supported"
        )
    if config.model_type in QK_NORM_MODEL_TYPES and getattr(config, "attention_bias", False):
        # inside the key norm, the NoPE part of a key bias no longer shifts a query's scores equally
        raise MlaifyError(
            f"{config.model_type} with attention_bias is not supported: a key bias inside the key norm "
            "does not factor through the latent"
        )
    if cfg.target != "mlaify":
        _check_target(config, cfg.target)
    return plan_geometry(SourceGeometry.of(config), cfg.resolve(calibrated))


def _augmented(proj: nn.Linear, heads: int, head_dim: int, with_bias: bool) -> torch.Tensor:
    """Weight [heads, d_h, d] in float64, with the bias (zero if absent) as a last input column if asked."""
    w = proj.weight.double()
    if with_bias:
        b = proj.bias.double() if proj.bias is not None else w.new_zeros(w.shape[0])
        w = torch.cat([w, b[:, None]], dim=1)
    return w.view(heads, head_dim, -1)


def _head_projections(attn: nn.Module, src: SourceGeometry) -> tuple[torch.Tensor, torch.Tensor]:
    """What step 1 splits: the query and key rows [heads, d_h, d'] of one layer as functions of its
    input columns `[h ; 1 (bias) ; u (qk-norm)]`.

    With per-head q/k norms (qk-norm) the score is `(g_q * u) . RoPE(g_k * k) / rms(k)`, u the unit-RMS
    query head: the key rows are `g_k * W_K` (the norm gain folded in, the RMS left to the cached key
    scale), and each query head also gets d_h columns `diag(g_q)` acting on u. Every split is linear
    in the rows, so those columns come out as the map from u to the head's MLA query (`q_head_proj`),
    while the h columns (`g_q * W_Q`, the query up to its RMS) still rank the rope components."""
    with_bias = attn.q_proj.bias is not None or attn.k_proj.bias is not None
    w_q = _augmented(attn.q_proj, src.num_heads, src.head_dim, with_bias)
    w_k = _augmented(attn.k_proj, src.num_kv_heads, src.head_dim, with_bias)
    if hasattr(attn, "q_norm"):
        g_q, g_k = head_norm_gain(attn.q_norm)[0], head_norm_gain(attn.k_norm)[0]
        unit = torch.diag(g_q).expand(src.num_heads, -1, -1)
        w_q = torch.cat([g_q[:, None] * w_q, unit], dim=-1)
        w_k = torch.cat([g_k[:, None] * w_k, w_k.new_zeros(src.num_kv_heads, src.head_dim, src.head_dim)], -1)
    return w_q, w_k


def split_heads(
    attn: nn.Module,
    src: SourceGeometry,
    plan: Plan,
    cfg: MLAConversionConfig,
    stats,
    layer: int,
    inv_freq: torch.Tensor | None = None,
    pair_counts: list[int] | None = None,
):
    """Step 1 for one layer: the rope strategy's HeadSplit of the (bias-augmented) q and k projections.

    With statistics, `cfg.expected_rotation` and the source's RoPE frequencies `inv_freq`, the NoPE
    query rows carry the attention-averaged rotation of the pairs they lose (rope.py). `pair_counts`
    fixes the rotated key's frequencies (`shared_rotation`)."""
    w_q, w_k = _head_projections(attn, src)
    w_q_nope = None
    if stats is not None and cfg.expected_rotation and inv_freq is not None:
        w_q_nope = average_removed_rope(w_q, *expected_rotation(stats.distance_mass[layer], inv_freq))
    if cfg.rope_strategy == "rotate":
        moment = stats.input_moment[layer]
        return split_rotated(
            w_q, w_k, moment, plan.qk_rope_head_dim // 2, w_q_nope, pair_counts, plan.rope_fold
        )
    norms = (
        (stats.q_pair_norm[layer], stats.k_pair_norm[layer]) if cfg.rope_strategy == "norm" else (None, None)
    )
    pairs = select_rope_pairs(
        cfg.rope_strategy, src.head_dim, plan.qk_rope_head_dim // 2, src.num_kv_heads, *norms
    )
    return split_by_pairs(w_q, w_k, pairs, w_q_nope)


def shared_rotation(source: LayerSource, src: SourceGeometry, plan: Plan, stats) -> list[int]:
    """For `--target deepseek_v3` with `rotate`: how many components of each fold of frequency pairs
    every layer's rope key keeps, so that all layers share one frequency set (rope.shared_pair_counts)."""
    lams = []
    for i in range(src.num_layers):
        w_q, w_k = _head_projections(source.attention(i), src)
        lams.append(rotated_components(w_q, w_k, stats.input_moment[i], plan.rope_fold)[0])
    return shared_pair_counts(lams, plan.qk_rope_head_dim // 2)


def layer_problem(
    attn: nn.Module, split: HeadSplit, src: SourceGeometry, cfg: MLAConversionConfig, stats, layer: int
):
    """Step 2 set-up for one layer: the low-rank method's weighted problem for K_nope and V."""
    d, d_h, n_kv = src.hidden_size, src.head_dim, src.num_kv_heads
    group = src.num_heads // n_kv
    w_k_nope = split.k_nope[..., :d].reshape(-1, d)
    w_v = attn.v_proj.weight.double()
    if cfg.lowrank == "weight":
        return latent_problem(w_k_nope, w_v, kv_balance=cfg.kv_balance)
    moment = stats.input_moment[layer].double()
    if cfg.lowrank == "activation":
        return latent_problem(w_k_nope, w_v, moment, kv_balance=cfg.kv_balance)
    q = split.q_nope[..., :d].view(n_kv, group, -1, d)  # [n_kv, group, dn, d]
    q_weights = list(torch.einsum("gnad,de,gnbe->gab", q, moment, q))  # Q_g: [dn, dn] per KV head
    w_o = attn.o_proj.weight.double().view(d, n_kv, group, d_h)
    o_weights = list(torch.einsum("dgna,dgnb->gab", w_o, w_o))  # O_g: [d_h, d_h] per KV head
    return latent_problem(w_k_nope, w_v, moment, q_weights, o_weights, cfg.kv_balance)


@torch.inference_mode()
def assemble_attention(
    attn: nn.Module, split: HeadSplit, factors: LatentFactors, src: SourceGeometry
) -> dict:
    """MLA weights (DeepSeek names, float64) for one layer from its head split and latent factors."""
    d, d_h, n_kv, n_h = src.hidden_size, src.head_dim, src.num_kv_heads, src.num_heads
    group = n_h // n_kv
    rank = factors.w_dkv.shape[0]
    q = torch.cat([split.q_nope, split.q_rope], dim=1)  # [H, dn + dr, d']
    k_rope = split.k_rope.reshape(-1, split.k_rope.shape[-1])  # [R * d_r, d']
    with_bias = attn.q_proj.bias is not None or attn.k_proj.bias is not None  # a column after the d inputs
    weights = {"kv_a_proj_with_mqa.weight": torch.cat([factors.w_dkv, k_rope[:, :d]])}
    if with_bias:
        weights["kv_a_proj_with_mqa.bias"] = torch.cat([k_rope.new_zeros(rank), k_rope[:, d]])
    if hasattr(attn, "q_norm"):  # qk-norm: the source's pre-norm q and k, and the map of each normed head
        weights["q_head_proj"] = q[..., -d_h:]
        weights["q_proj.weight"] = attn.q_proj.weight.double()
        weights["k_proj.weight"] = attn.k_proj.weight.double()
    else:
        q = q.reshape(-1, q.shape[-1])  # [H * (dn + dr), d']
        weights["q_proj.weight"] = q[:, :d]
        if with_bias:  # q/k biases (Qwen2) rode along as a last input column
            weights["q_proj.bias"] = q[:, d]

    w_uk = factors.w_uk.view(n_kv, -1, rank)
    w_uv = factors.w_uv.view(n_kv, d_h, rank)
    weights["kv_b_proj.weight"] = torch.cat(
        [torch.cat([w_uk[h // group], w_uv[h // group]]) for h in range(n_h)]
    )

    b_v, b_o = attn.v_proj.bias, attn.o_proj.bias
    weights["o_proj.weight"] = attn.o_proj.weight.double()
    if b_v is not None or b_o is not None:
        o_bias = b_o.double() if b_o is not None else torch.zeros(d, dtype=torch.float64)
        if b_v is not None:  # softmax weights sum to one, so the value bias reaches the output unchanged
            b_v = b_v.double().view(n_kv, 1, d_h).expand(n_kv, group, d_h).reshape(-1)
            o_bias = o_bias + weights["o_proj.weight"] @ b_v
        weights["o_proj.bias"] = o_bias
    return weights


def _provenance(cfg: MLAConversionConfig, stats, refit_windows, query_fit: int, compute_dtype: str) -> dict:
    """What made this checkpoint, for its config: the same inputs give the same record (no time, no paths)."""
    from .. import __version__

    calibration = None
    if stats is not None:
        calibration = {k: v for k, v in stats.meta.items() if k != "source"}
    return {
        "mlaify_version": __version__,
        "method": {k: v for k, v in asdict(cfg).items() if v is not None},
        "calibration": calibration,  # CalibrationConfig fields and the text's sha256
        "refit_windows": 0 if refit_windows is None else int(refit_windows.shape[0]),
        "query_fit_windows": query_fit,
        "compute_dtype": compute_dtype if stats is not None else None,
    }


_DEGENERATE = (
    "the calibration statistics are degenerate here: use more --calib-sequences, --calib-dtype float32, "
    "or --no-calib"
)


def _log_errors(errors: list[tuple[float, float, float]], lowrank: str) -> None:
    log.info(
        "mean relative error over %d layers: K_nope weights %.4f, V weights %.4f, %s objective %.4f",
        len(errors),
        *(sum(e[j] for e in errors) / len(errors) for j in range(2)),
        lowrank,
        sum(e[2] for e in errors) / len(errors),
    )


def _mla_config(
    source: LayerSource,
    plan: Plan,
    ranks,
    rope_pairs,
    biases: set,
    qk_norm_eps: float | None,
    provenance,
    kept: list[int],
) -> MlaifyConfig:
    text_config = source.config.to_dict()
    text_config.pop("quantization_config", None)
    scalar = getattr(source.config, "query_pre_attn_scalar", None)  # Gemma's softmax scale
    config = MlaifyConfig(
        text_config=text_config,
        kv_lora_rank=ranks if len(set(ranks)) > 1 else ranks[0],
        qk_rope_head_dim=plan.qk_rope_head_dim,
        qk_nope_head_dim=plan.qk_nope_head_dim,
        n_rope_heads=plan.n_rope_heads,
        rope_pairs=rope_pairs,
        softmax_scale=(scalar or SourceGeometry.of(source.config).head_dim) ** -0.5,
        attention_bias=bool(biases & {"q_proj", "k_proj"}),
        o_proj_bias=bool(biases & {"v_proj", "o_proj"}),
        qk_norm=qk_norm_eps is not None,
        qk_norm_eps=qk_norm_eps if qk_norm_eps is not None else 1e-6,
        source_attention_layers=kept or None,
        conversion=provenance,
    )
    config.name_or_path = source.config.name_or_path
    return config


def _refit_layer(source, i, weights, config, refit: Refitter) -> dict:
    """Step 3 for layer i: its MLA attention built from `weights`, inside the source's decoder layer
    (norms and MLP shared), refit against the source layer; returns the refit weights (float32)."""
    attn = MLAAttention(config, i)
    attn.load_state_dict({**weights, "rope_dims": rope_dims(config, i)})
    attn.to(source.device)
    src_layer = source.decoder_layer(i)
    mla_layer = copy.copy(src_layer)  # the same norms and MLP, its own attention
    mla_layer._modules = {**src_layer._modules, "self_attn": attn}
    try:
        refit.layer(src_layer, mla_layer)
    finally:
        source.release(src_layer)
    refitted = {k: v.cpu() for k, v in attn.state_dict().items() if k != "rope_dims"}
    check_finite(refitted, f"layer {i} after the refit", _DEGENERATE)
    return refitted


def convert_layers(
    source: LayerSource,
    cfg: MLAConversionConfig,
    stats: CalibrationStats | None,
    sink: Callable[[str, torch.Tensor], None],
    provenance: dict,
    refit: Refitter | None = None,
) -> MlaifyConfig:
    """Steps 1 and 2 (and 3 with `refit`), a layer at a time: each layer's MLA attention weights, then
    every other tensor of the source as it is, handed to `sink(name, tensor)` one by one; returns
    the MLA config.

    Only one layer is held at a time (adaptive ranks read every layer twice: once for the error
    curves that allocate the ranks, once to factor), so `source` may stream from disk. Layers that
    `kept_layers` names (`keep_sliding`) hand the source's attention tensors on as they are."""
    plan = check_convertible(source.config, cfg, calibrated=stats is not None)
    src = SourceGeometry.of(source.config)
    if stats is not None:
        stats.check_matches(src.num_layers, src.hidden_size, src.num_heads, src.num_kv_heads)
    log.info(
        "converting with rope strategy %s, low-rank method %s, %s ranks (mean r = %d, rope %d x %d)",
        cfg.rope_strategy,
        cfg.lowrank,
        cfg.rank_allocation,
        plan.kv_lora_rank,
        plan.n_rope_heads,
        plan.qk_rope_head_dim,
    )
    rotation = stats is not None and cfg.expected_rotation
    counts = None
    if cfg.target == "vllm":
        counts = vllm_pair_counts(src.head_dim)
    elif cfg.target == "deepseek_v3" and cfg.rope_strategy == "rotate":
        with torch.inference_mode():
            counts = shared_rotation(source, src, plan, stats)

    @torch.inference_mode()
    def problem(i: int):
        attn = source.attention(i)
        split = split_heads(attn, src, plan, cfg, stats, i, source.inv_freq(i) if rotation else None, counts)
        return attn, split, layer_problem(attn, split, src, cfg, stats, i)

    kept = kept_layers(source, cfg)
    layers = [i for i in range(src.num_layers) if i not in kept]  # the converted ones
    ranks = [0 if i in kept else plan.kv_lora_rank for i in range(src.num_layers)]  # 0: no latent
    if cfg.rank_allocation == "adaptive":
        caps, curves = [], []
        for i in tqdm(layers, desc="measuring layers", unit="layer", leave=False):
            eig = problem(i)[2].eigenvalues.clamp_min(0)
            caps.append(min(len(eig), plan.max_rank))
            curves.append(eig / eig.sum())
        total = plan.kv_lora_rank * len(layers)
        allocated = allocate_ranks(curves, total, min_rank=max(1, plan.kv_lora_rank // 2), max_ranks=caps)
        for i, rank in zip(layers, allocated, strict=True):
            ranks[i] = rank
        log.info("adaptive ranks per layer: %s", ranks)

    first = source.attention(0)
    biases = {proj for proj in ATTENTION if getattr(first, proj).bias is not None}
    qk_norm_eps = head_norm_gain(first.k_norm)[1] if hasattr(first, "k_norm") else None
    errors, rope_pairs = [], []
    for i in tqdm(range(src.num_layers), desc="converting layers", unit="layer", leave=False):
        if i in kept:  # the source's attention, as stored; both refit streams pass through it
            rope_pairs.append([])
            for name, tensor in source.attention_tensors(i):
                sink(name, tensor)
            if refit is not None:
                layer = source.decoder_layer(i)
                try:
                    refit.keep(i, layer)
                finally:
                    source.release(layer)
            continue
        attn, split, prob = problem(i)
        factors = prob.factor(ranks[i])
        log.debug(
            "layer %d: r=%d, relative error K_nope %.4f, V %.4f, %s objective %.4f",
            i,
            ranks[i],
            factors.k_error,
            factors.v_error,
            cfg.lowrank,
            factors.objective_error,
        )
        weights = assemble_attention(attn, split, factors, src)
        check_finite(weights, f"layer {i} after factorisation", _DEGENERATE)
        errors.append((factors.k_error, factors.v_error, factors.objective_error))
        rope_pairs.append(split.rope_pairs)
        del attn, split, prob, factors  # only the weights go on
        release_memory()
        if refit is not None:  # this layer's pairs in every slot: the config MLAAttention(i) reads
            weights = {name: weight.float() for name, weight in weights.items()}  # what the refit runs in
            pairs = [rope_pairs[-1]] * src.num_layers
            layer_config = _mla_config(source, plan, ranks, pairs, biases, qk_norm_eps, None, kept)
            weights = _refit_layer(source, i, weights, layer_config, refit)
        for name, weight in weights.items():
            sink(f"{layer_prefix(i)}self_attn.{name}", weight)
        del weights
        release_memory()
    _log_errors(errors, cfg.lowrank)
    if refit is not None:
        refit.finish()
    for name, tensor in source.passthrough():
        sink(name, tensor)
    return _mla_config(source, plan, ranks, rope_pairs, biases, qk_norm_eps, provenance, kept)


def kept_layers(source: LayerSource, cfg: MLAConversionConfig) -> list[int]:
    """The layers that keep the source's attention: with `keep_sliding`, the sliding-window ones."""
    if not cfg.keep_sliding:
        return []
    kept = [i for i in range(source.num_layers) if source.sliding_window(i) is not None]
    if not kept or len(kept) == source.num_layers:
        raise MlaifyError(
            f"--keep-sliding keeps the sliding-window layers and converts the others, but {len(kept)} of "
            f"this model's {source.num_layers} layers slide; drop --keep-sliding"
        )
    return kept


def _source(src, device: str | torch.device | None) -> LayerSource:
    """A model, a `LayerSource`, or a path: a local safetensors folder is read a layer at a time. Its
    layers run on `device` (None: the CPU, where a loaded model must be: the factorisation and the
    statistics live there)."""
    device = None if device is None else resolve_device(device)
    if isinstance(src, PreTrainedModel) and (home := next(src.parameters()).device).type != "cpu":
        raise MlaifyError(
            f"the source model is on {home}; load it on the CPU and pass the device to run its layers "
            "on (device=..., --device) instead"
        )
    if isinstance(src, (PreTrainedModel, LayerSource)):
        return layer_source(src, device=device)
    return layer_source(str(src), load_config(str(src)), device)


def _refitter(source: LayerSource, windows, compute_dtype: str, query_fit: int) -> Refitter | None:
    """Step 3's per-layer refit on `windows` (None: no refit)."""
    if windows is None:
        return None
    return Refitter(source, windows, compute_dtype=compute_dtype, query_fit=query_fit)


def _resolve(config, stats, refit_windows, query_fit) -> MLAConversionConfig:
    cfg = (config or MLAConversionConfig()).resolve(calibrated=stats is not None)
    available = 0 if refit_windows is None else len(refit_windows)
    if not 0 <= query_fit <= available:
        raise MlaifyError(f"query_fit must be between 0 and the {available} refit windows, got {query_fit}")
    return cfg


def convert_to_mla(
    model_or_path: str | PreTrainedModel,
    config: MLAConversionConfig | None = None,
    stats: CalibrationStats | None = None,
    refit_windows: torch.Tensor | None = None,
    compute_dtype: str = "bfloat16",
    query_fit: int = 0,
    device: str | torch.device | None = None,
) -> MlaifyForCausalLM:
    """Convert a Llama/Mistral/Qwen2 causal LM (object, folder, .gguf or hub id) to MLA, in memory.

    `stats` (calibration.py) enables the data-aware methods; the method fields of `config` left at
    None then resolve to the best combination (config.BEST), else to the weight-only path.
    `refit_windows` ([N, S] token ids of calibration text) adds step 3, the least-squares refit of
    W_UV and o_proj against the source's attention outputs (refit.py), its forward passes run under
    `compute_dtype` autocast (as calibration's); `query_fit` > 0 refits the queries first, on that
    many of those windows, to the source's attention probabilities (queryfit.py). Without a refit, a
    safetensors folder is read a layer at a time (`convert_to_folder` also writes it so). The
    calibration-driven passes run on `device` (devices.py; None: the CPU, where a loaded source must be).
    """
    cfg = _resolve(config, stats, refit_windows, query_fit)
    source = _source(model_or_path, device)
    refit = _refitter(source, refit_windows, compute_dtype, query_fit)
    state = {}
    mla_config = convert_layers(
        source,
        cfg,
        stats,
        lambda name, tensor: state.__setitem__(name, tensor.to(torch.float32)),
        _provenance(cfg, stats, refit_windows, query_fit, compute_dtype),
        refit,
    )
    mla = MlaifyForCausalLM(mla_config)
    state.update({k: v for k, v in mla.state_dict().items() if k.endswith("rope_dims")})
    missing, unexpected = mla.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and mla_config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(
            f"conversion produced a mismatched state dict: missing {missing}, unexpected {unexpected}"
        )
    mla.tie_weights()
    dtype = DTYPES[cfg.dtype] if cfg.dtype else source.dtype
    return mla.to(dtype).eval()


def convert_to_folder(
    src,
    folder: str | Path,
    config: MLAConversionConfig | None = None,
    stats: CalibrationStats | None = None,
    refit_windows: torch.Tensor | None = None,
    compute_dtype: str = "bfloat16",
    query_fit: int = 0,
    shard_bytes: int | None = None,
    device: str | torch.device | None = None,
) -> MlaifyConfig:
    """`convert_to_mla` written into `folder` (existing, empty) as it goes, never holding more than
    one layer of either model: a local safetensors checkpoint (a path or its `SafetensorsLayers`) is
    read a tensor at a time, and every output tensor goes into the next shard (of at most
    `shard_bytes`, default a sixteenth of the source, 64 MiB to 1 GiB: writing a shard holds it
    twice). Writes what `save_pretrained` writes: the shards, config.json, the modeling files."""
    cfg = _resolve(config, stats, refit_windows, query_fit)
    source = _source(src, device)
    if not isinstance(source, SafetensorsLayers):
        raise MlaifyError(f"{src} is not a local safetensors checkpoint; convert it with convert_to_mla")
    dtype = DTYPES[cfg.dtype] if cfg.dtype else source.dtype
    if shard_bytes is None:
        size = sum(f.stat().st_size for f in set(source.files.values()))
        shard_bytes = min(max(size // 16, 64 << 20), 1 << 30)
    refit = _refitter(source, refit_windows, compute_dtype, query_fit)
    writer = ShardWriter(folder, shard_bytes)
    mla_config = convert_layers(
        source,
        cfg,
        stats,
        lambda name, tensor: writer.add(name, tensor.to(dtype)),
        _provenance(cfg, stats, refit_windows, query_fit, compute_dtype),
        refit,
    )
    for i in range(mla_config.num_hidden_layers):
        if mla_config.is_mla_layer(i):
            writer.add(f"{layer_prefix(i)}self_attn.rope_dims", rope_dims(mla_config, i))
    writer.close()
    save_model_files(mla_config, folder, dtype)
    return mla_config
