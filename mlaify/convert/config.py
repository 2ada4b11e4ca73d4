"""What a conversion does, as one validated dataclass (the CLI maps each flag to one field)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import MlaifyError

RopeStrategy = Literal["high", "all"]
ROPE_STRATEGIES = ("high", "all")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class MLAConversionConfig:
    """How to turn each attention layer into MLA.

    The cache size is set by exactly one of `kv_lora_rank` (r), `kv_budget` (values per token per
    layer, `r + n_rope_heads * qk_rope_head_dim`) or `kv_reduction` (fraction of the source cache
    saved, e.g. 0.75 keeps a quarter); with none of them, `kv_reduction=0.5`.
    """

    kv_lora_rank: int | None = None
    kv_budget: int | None = None
    kv_reduction: float | None = None
    # Rotary dims kept per rope head; None: a quarter of the head dim (all of it for "all").
    qk_rope_head_dim: int | None = None
    # "high": keep the highest-frequency pairs (they carry local position); "all": keep every pair
    # rotary, which with full rank reproduces the source exactly.
    rope_strategy: RopeStrategy = "high"
    # Multiplier `a` of the NoPE keys in `[a W_K_nope ; W_V]`; None equalises the two energies.
    kv_balance: float | None = None
    dtype: str | None = None  # output dtype; None keeps the source's

    def __post_init__(self) -> None:
        given = [name for name in ("kv_lora_rank", "kv_budget", "kv_reduction") if getattr(self, name) is not None]
        if len(given) > 1:
            raise MlaifyError(f"give only one of kv_lora_rank, kv_budget, kv_reduction (got {', '.join(given)})")
        if not given:
            self.kv_reduction = 0.5
        if self.kv_lora_rank is not None and self.kv_lora_rank < 1:
            raise MlaifyError(f"kv_lora_rank must be >= 1, got {self.kv_lora_rank}")
        if self.kv_budget is not None and self.kv_budget < 2:
            raise MlaifyError(f"kv_budget must be >= 2 values per token per layer, got {self.kv_budget}")
        if self.kv_reduction is not None and not 0 <= self.kv_reduction < 1:
            raise MlaifyError(f"kv_reduction must be in [0, 1), got {self.kv_reduction}")
        if self.rope_strategy not in ROPE_STRATEGIES:
            raise MlaifyError(f"unknown rope strategy {self.rope_strategy!r}; choose one of {', '.join(ROPE_STRATEGIES)}")
        if self.qk_rope_head_dim is not None and (self.qk_rope_head_dim < 2 or self.qk_rope_head_dim % 2):
            raise MlaifyError(
                f"rope dim must be an even number >= 2 (it keeps whole frequency pairs), got {self.qk_rope_head_dim}"
            )
        if self.kv_balance is not None and not self.kv_balance > 0:
            raise MlaifyError(f"kv_balance must be > 0, got {self.kv_balance}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise MlaifyError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
