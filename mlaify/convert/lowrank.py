"""Step 2 of a conversion: factor the NoPE keys and the values through one shared latent.

All three methods solve one problem. With `M = [a W_K_nope ; W_V]` (all KV heads stacked, `a` the
K/V balance), input second moment `C = E[h h^T]` and a block-diagonal output weighting `L`,

    min over rank-r M^  of  E || L (M - M^) h ||^2 = || L (M - M^) C^(1/2) ||_F^2,

whose solution (Eckart-Young in the weighted norm) is `L M^ = U_r U_r^T L M`, with `U_r` the top-r
eigenvectors of `G = L M C M^T L^T` (no square root of C needed); the error left is the sum of the
eigenvalues of G beyond r, which is also the error curve that rank allocation reads.

- `weight`: C = I, L = I, the plain truncated SVD of the weights.
- `activation`: C measured, L = I: the rank-r PCA of the K_nope and V outputs on calibration inputs.
- `attention`: C measured; key rows of KV head g weighted by `Q_g^(1/2)`, `Q_g = sum_{h in group(g)}
  W_Q,h C W_Q,h^T` (nope rows), so the error is that of the scores `E (q_h . dk)^2`; value rows of g
  weighted by `O_g^(1/2)`, `O_g = sum_{h in group(g)} W_O,h^T W_O,h`, so the error is the one of the
  attention output `||W_O,h dv||^2` (heads of a group taken as adding their errors incoherently).

The balance `a` equalises the (weighted) K and V energies times `kv_balance`. The cache holds
`c_kv = W_DKV h` with `W_DKV = S^(-1/2) U_r^T L M` and `[a W_UK ; W_UV] = L^-1 U_r S^(1/2)`,
`S = diag(lambda_r)^(1/2)`: latent and up-projection columns then have the same scale, which keeps
low-precision weights and caches well conditioned.
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
    objective_error: float  # relative error in the method's own norm, sqrt(sum dropped lambda / sum lambda)


def _relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    norm = exact.norm()
    return float((approx - exact).norm() / norm) if norm > 0 else 0.0


def _sym_sqrt(a: torch.Tensor, ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """`(A^(1/2), A^(-1/2))` of a PSD matrix; a ridge of `ridge * mean eigenvalue` makes the inverse exist."""
    lam, vec = torch.linalg.eigh(a)
    lam = lam.clamp_min(0) + ridge * lam.clamp_min(0).mean().clamp_min(1e-30)
    return (vec * lam.sqrt()) @ vec.T, (vec / lam.sqrt()) @ vec.T


def _block_diag(blocks: list[torch.Tensor]) -> torch.Tensor:
    return torch.block_diag(*blocks) if blocks else torch.zeros(0, 0, dtype=torch.float64)


@dataclass
class LatentProblem:
    """One layer's weighted low-rank problem, decomposed once and factored at any rank."""

    w_k: torch.Tensor  # [n_k, d] NoPE key rows
    w_v: torch.Tensor  # [n_v, d] value rows
    balance: float  # a
    left: torch.Tensor | None  # L [n_k + n_v, n_k + n_v] or None for identity
    left_inv: torch.Tensor | None
    eigenvalues: torch.Tensor  # of G, descending
    eigenvectors: torch.Tensor  # [n_k + n_v, n_k + n_v], matching columns

    @property
    def max_rank(self) -> int:
        return min(self.eigenvalues.numel(), self.w_v.shape[1])

    def factor(self, rank: int) -> LatentFactors:
        k, v, a = self.w_k, self.w_v, self.balance
        m = torch.cat([a * k, v])
        lm = m if self.left is None else self.left @ m
        u = self.eigenvectors[:, :rank]
        lam = self.eigenvalues[:rank].clamp_min(self.eigenvalues[0].clamp_min(1e-30) * 1e-24)
        scale = lam.pow(0.25)  # S^(1/2), S = lambda^(1/2)
        w_dkv = (u.T @ lm) / scale[:, None]
        up = u * scale
        up = up if self.left_inv is None else self.left_inv @ up
        w_uk, w_uv = up[: k.shape[0]] / a, up[k.shape[0] :]
        for name, t in (("W_DKV", w_dkv), ("W_UK", w_uk), ("W_UV", w_uv)):
            if not torch.isfinite(t).all():
                raise ValueError(
                    f"non-finite values in {name} after the factorisation; the source weights hold inf or nan"
                )
        total = float(self.eigenvalues.clamp_min(0).sum())
        dropped = float(self.eigenvalues[rank:].clamp_min(0).sum())
        return LatentFactors(
            w_dkv=w_dkv,
            w_uk=w_uk,
            w_uv=w_uv,
            k_error=_relative_error(w_uk @ w_dkv, k) if k.numel() else 0.0,
            v_error=_relative_error(w_uv @ w_dkv, v),
            objective_error=(dropped / total) ** 0.5 if total > 0 else 0.0,
        )


def latent_problem(
    w_k_nope: torch.Tensor,
    w_v: torch.Tensor,
    moment: torch.Tensor | None = None,
    k_weights: list[torch.Tensor] | None = None,
    v_weights: list[torch.Tensor] | None = None,
    kv_balance: float = 1.0,
) -> LatentProblem:
    """Set up `min ||L (M - M^) C^(1/2)||` (float64): `moment` C (None: identity); `k_weights` Q_g and
    `v_weights` O_g per KV head (None: unweighted), whose square roots form L."""
    k, v = w_k_nope.double(), w_v.double()
    c = torch.eye(v.shape[1], dtype=torch.float64) if moment is None else moment.double()
    left = left_inv = None
    if k_weights is not None or v_weights is not None:
        k_blocks = k_weights or [torch.eye(k.shape[0] // len(v_weights), dtype=torch.float64)] * len(
            v_weights
        )
        v_blocks = v_weights or [torch.eye(v.shape[0] // len(k_weights), dtype=torch.float64)] * len(
            k_weights
        )
        roots = [_sym_sqrt(b.double()) for b in (*k_blocks, *v_blocks)]
        left = _block_diag([r for r, _ in roots])
        left_inv = _block_diag([ri for _, ri in roots])
    lk, lv = (
        (k, v)
        if left is None
        else (left[: k.shape[0], : k.shape[0]] @ k, left[k.shape[0] :, k.shape[0] :] @ v)
    )
    k_energy = float(torch.einsum("nd,de,ne->", lk, c, lk)) if k.numel() else 0.0
    v_energy = float(torch.einsum("nd,de,ne->", lv, c, lv))
    balance = kv_balance * (v_energy / k_energy) ** 0.5 if k_energy > 0 else 1.0
    lm = torch.cat([balance * lk, lv])
    lam, vec = torch.linalg.eigh(lm @ c @ lm.T)
    return LatentProblem(k, v, balance, left, left_inv, lam.flip(0), vec.flip(1))
