"""What a conversion does, as one validated dataclass (the CLI maps each flag to one field)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import MlaifyError

RopeStrategy = Literal["high", "low", "uniform", "norm", "rotate", "all"]
ROPE_STRATEGIES = ("high", "low", "uniform", "norm", "rotate", "all")
LOWRANK_METHODS = ("weight", "activation", "attention")
RANK_ALLOCATIONS = ("uniform", "adaptive")
# Strategies and methods that read calibration statistics (`calibration.py`).
NEEDS_CALIBRATION = {"norm", "rotate", "activation", "attention", "adaptive"}
# Layouts a conversion can aim at: mlaify's own (every layer its own rope frequencies and rank), one
# that the stock DeepSeek-V3 export (export.py) holds at the same cache size (one rope frequency set
# and one rank for every layer), or one that vLLM's and SGLang's DeepSeek attention also serve: a
# geometry of VLLM_GEOMETRIES and a rope key whose frequencies form one plain RoPE table.
TARGETS = ("mlaify", "deepseek_v3", "vllm")
# (kv_lora_rank, qk_rope_head_dim) that vLLM's MLA backends run (FlashMLA on Hopper: 512 + 64 only).
VLLM_GEOMETRIES = ((256, 64), (512, 64))
SHARED_ROPE_STRATEGIES = ("high", "low", "uniform", "rotate", "all")  # those `deepseek_v3` can share
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The defaults when calibration statistics are given, and the `--preset best` combination: the one
# that measured best on SmolLM2-135M at KV budgets 192, 96 and 48 (benchmarks/results/quality.md).
BEST = dict(lowrank="attention", rope_strategy="rotate", rank_allocation="adaptive")
PRESETS = {"best": BEST}


@dataclass
class MLAConversionConfig:
    """How to turn each attention layer into MLA.

    The cache size is set by exactly one of `kv_lora_rank` (r), `kv_budget` (values per token per
    layer, `r + n_rope_heads * qk_rope_head_dim`) or `kv_reduction` (fraction of the source cache
    saved, e.g. 0.75 keeps a quarter); with none of them, `kv_reduction=0.5`. The method fields left
    at None resolve by `resolve()`: the `BEST` combination with calibration statistics, the
    weight-only path (`weight`, `high`, `uniform`) without.
    """

    kv_lora_rank: int | None = None
    kv_budget: int | None = None
    kv_reduction: float | None = None
    # Rotary dims kept per rope head; None: a quarter of the head dim (all of it for "all"; half of
    # it for "rotate", whose single rope head serves every KV head).
    qk_rope_head_dim: int | None = None
    # Which frequency pairs stay rotary (rope.py): "high", "low", "uniform" by frequency, "norm" by
    # measured query-key contribution, "rotate" one shared rope key mixed across KV heads, "all" every
    # pair (with full rank this reproduces the source exactly).
    rope_strategy: RopeStrategy | None = None
    # How K_nope and V are factored (lowrank.py): "weight" SVD, "activation" PCA of the outputs on
    # calibration inputs, "attention" PCA weighted by the query (keys) and o_proj (values).
    lowrank: str | None = None
    # "uniform": every layer gets the same kv_lora_rank; "adaptive": the same total, spent by greedy
    # marginal error reduction across layers (allocation.py).
    rank_allocation: str | None = None
    # Weight of the NoPE keys relative to the values in the shared factorisation, as a multiple of
    # the weight that equalises their (measured) energies; 1 = equal energies. None: 0.5 for the
    # `attention` factorisation, 1 for the others. Measured on SmolLM2-135M with the refit at 192,
    # 96 and 48 values: 29.9 / 61.1 / 198 at 0.5 against 31.5 / 63.0 / 202 at 1 (quality.md).
    kv_balance: float | None = None
    # With calibration: fold the attention-averaged rotation of what loses RoPE into the NoPE query
    # rows (rope.py, expected rotation). None: on for "rotate", off otherwise. Measured on SmolLM2: it
    # helps "rotate", whose residuals are the minor components, and hurts pair strategies, where whole
    # pairs (with the large, sink-forming scores) are averaged away.
    expected_rotation: bool | None = None
    # "rotate" only: how many adjacent frequency pairs share one mixing space, turned at the fastest
    # one's frequency (rope.py, folding); 1 keeps every pair at its own frequency. Measured on
    # SmolLM2-135M with the refit (quality_explore.md): 2 helps at 96 and 48 values (61.05 -> 59.27,
    # 197.66 -> 174.41), hurts at 192 (29.24 -> 30.64), and with the query fit at 48 too (132.39 ->
    # 135.40), so it is not the default.
    # `--target vllm` needs 1 (one plain RoPE table).
    rope_fold: int = 1
    dtype: str | None = None  # output dtype; None keeps the source's
    target: str = "mlaify"  # TARGETS
    # Sliding-window layers keep the source's attention: their cache already holds at most the window,
    # so at long context the full-attention layers hold almost all of it (Gemma-3-270M at 32k: 93%).
    # The budget then applies to the full-attention layers alone.
    keep_sliding: bool = False

    def __post_init__(self) -> None:
        given = [
            name for name in ("kv_lora_rank", "kv_budget", "kv_reduction") if getattr(self, name) is not None
        ]
        if len(given) > 1:
            raise MlaifyError(
                f"give only one of kv_lora_rank, kv_budget, kv_reduction (got {', '.join(given)})"
            )
        if not given:
            self.kv_reduction = 0.5
        if self.kv_lora_rank is not None and self.kv_lora_rank < 1:
            raise MlaifyError(f"kv_lora_rank must be >= 1, got {self.kv_lora_rank}")
        if self.kv_budget is not None and self.kv_budget < 2:
            raise MlaifyError(f"kv_budget must be >= 2 values per token per layer, got {self.kv_budget}")
        if self.kv_reduction is not None and not 0 <= self.kv_reduction < 1:
            raise MlaifyError(f"kv_reduction must be in [0, 1), got {self.kv_reduction}")
        for name, allowed in (
            ("rope_strategy", ROPE_STRATEGIES),
            ("lowrank", LOWRANK_METHODS),
            ("rank_allocation", RANK_ALLOCATIONS),
        ):
            value = getattr(self, name)
            if value is not None and value not in allowed:
                label = name.replace("_", " ")
                raise MlaifyError(f"unknown {label} {value!r}; choose one of {', '.join(allowed)}")
        if self.qk_rope_head_dim is not None and (self.qk_rope_head_dim < 2 or self.qk_rope_head_dim % 2):
            raise MlaifyError(
                "rope dim must be an even number >= 2 (it keeps whole frequency pairs), "
                f"got {self.qk_rope_head_dim}"
            )
        if self.rope_fold < 1:
            raise MlaifyError(f"rope fold must be >= 1 frequency pair, got {self.rope_fold}")
        if self.kv_balance is not None and not self.kv_balance > 0:
            raise MlaifyError(f"kv_balance must be > 0, got {self.kv_balance}")
        if self.target not in TARGETS:
            raise MlaifyError(f"unknown target {self.target!r}; choose one of {', '.join(TARGETS)}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise MlaifyError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")

    def resolve(self, calibrated: bool) -> MLAConversionConfig:
        """This config with every method field set, checking that the chosen ones have what they need."""
        fallback = (
            BEST if calibrated else dict(lowrank="weight", rope_strategy="high", rank_allocation="uniform")
        )
        if self.target != "mlaify":  # one rank for every layer: the export would pad to the largest
            fallback = {**fallback, "rank_allocation": "uniform"}
        if self.target == "vllm":  # one rope key for every head, as vLLM's MLA kernels read it
            fallback = {**fallback, "rope_strategy": "rotate"}
        fields = {name: getattr(self, name) or default for name, default in fallback.items()}
        strategies = ("rotate",) if self.target == "vllm" else SHARED_ROPE_STRATEGIES
        if self.target != "mlaify" and (
            fields["rank_allocation"] != "uniform" or fields["rope_strategy"] not in strategies
        ):
            raise MlaifyError(
                f"--target {self.target} gives every layer one rank and one rope frequency set: use "
                f"--rank-allocation uniform and a rope strategy of {', '.join(strategies)}"
            )
        if not calibrated:
            needing = sorted(value for value in fields.values() if value in NEEDS_CALIBRATION)
            if needing:
                raise MlaifyError(
                    f"{', '.join(needing)} needs calibration statistics; "
                    "drop --no-calib (the CLI calibrates by default) or pass --calib-text FILE"
                )
        if self.kv_balance is None:
            fields["kv_balance"] = 0.5 if fields["lowrank"] == "attention" else 1.0
        if self.expected_rotation is None:
            fields["expected_rotation"] = calibrated and fields["rope_strategy"] == "rotate"
        if self.rope_fold > 1 and (fields["rope_strategy"] != "rotate" or self.target == "vllm"):
            raise MlaifyError(
                "--rope-fold folds the rotate strategy's frequency pairs, and --target vllm needs each "
                "rope dim at its own frequency: use --rope-strategy rotate without --target vllm, or drop "
                "--rope-fold"
            )
        return MLAConversionConfig(**{**self.__dict__, **fields})
