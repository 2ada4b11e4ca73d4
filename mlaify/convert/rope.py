"""Step 1 of a conversion: which frequency pairs of each KV head stay rotary.

In the HF layout a head vector x of size d_h has pairs `(i, i + d_h/2)` rotated at frequency
`theta_i = base^(-2i/d_h)`, so pair 0 turns fastest. A strategy returns, per rope head, the sorted
pair indices kept rotary; the other pairs lose RoPE and become NoPE dims that go into the latent.
"""

from __future__ import annotations


def select_rope_pairs(strategy: str, head_dim: int, qk_rope_head_dim: int, n_rope_heads: int) -> list[list[int]]:
    """Kept pairs per rope head: "high" keeps the d_r/2 fastest pairs, "all" keeps every pair."""
    n_pairs = head_dim // 2 if strategy == "all" else qk_rope_head_dim // 2
    return [list(range(n_pairs)) for _ in range(n_rope_heads)]


def split_dims(pairs: list[int], head_dim: int) -> tuple[list[int], list[int]]:
    """(rope dims, nope dims) of one head: rope dims are `[pairs ; pairs + d_h/2]` (rotate_half layout)."""
    half = head_dim // 2
    rope = list(pairs) + [p + half for p in pairs]
    kept = set(rope)
    return rope, [i for i in range(head_dim) if i not in kept]
