"""Step 2 of a conversion: factor the NoPE keys and the values through one shared latent.

`M = [a W_K_nope ; W_V]` (all KV heads stacked) is replaced by its rank-r truncated SVD
`U_r S_r V_r^T`; the cache then holds `c_kv = W_DKV h` with `W_DKV = S_r^(1/2) V_r^T`, and
`[a W_UK ; W_UV] = U_r S_r^(1/2)`. Splitting `S` evenly keeps both factors well scaled for
low-precision weights and caches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass
class LatentFactors:
    w_dkv: torch.Tensor  # [r, d]
    w_uk: torch.Tensor  # [n_kv * dn, r]
    w_uv: torch.Tensor  # [n_kv * d_h, r]
    k_error: float  # relative Frobenius error of W_K_nope
    v_error: float  # relative Frobenius error of W_V


def max_rank(w_k_nope: torch.Tensor, w_v: torch.Tensor) -> int:
    return min(w_k_nope.shape[0] + w_v.shape[0], w_v.shape[1])


def _relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    norm = exact.norm()
    return float((approx - exact).norm() / norm) if norm > 0 else 0.0


def factor_weights(w_k_nope: torch.Tensor, w_v: torch.Tensor, rank: int, balance: float | None) -> LatentFactors:
    """Weight-only truncated SVD of the stacked NoPE keys and values (float64 inside)."""
    k, v = w_k_nope.double(), w_v.double()
    if balance is None:  # equal energies, so neither K nor V dominates the shared latent
        balance = float(v.norm() / k.norm()) if k.numel() and k.norm() > 0 else 1.0
    m = torch.cat([balance * k, v])
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    root = s[:rank].sqrt()
    w_dkv = root[:, None] * vh[:rank]
    up = u[:, :rank] * root
    w_uk, w_uv = up[: k.shape[0]] / balance, up[k.shape[0] :]
    for name, t in (("W_DKV", w_dkv), ("W_UK", w_uk), ("W_UV", w_uv)):
        if not torch.isfinite(t).all():
            raise ValueError(f"non-finite values in {name} after the SVD; the source weights hold inf or nan")
    return LatentFactors(
        w_dkv=w_dkv,
        w_uk=w_uk,
        w_uv=w_uv,
        k_error=_relative_error(w_uk @ w_dkv, k) if k.numel() else 0.0,
        v_error=_relative_error(w_uv @ w_dkv, v),
    )
