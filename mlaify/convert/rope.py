"""Step 1 of a conversion: which parts of the keys and queries stay rotary.

In the HF layout a head vector x of size d_h has pairs `(i, i + d_h/2)` rotated at frequency
`theta_i = base^(-2i/d_h)`, so pair 0 turns fastest. Removing RoPE from a pair replaces
`q_i^T R(theta_i (m - n)) k_i` by `q_i^T k_i`: exact for `theta_i (m - n) ~ 0`, and the error grows
with the pair's share of the score, which is what the strategies rank.

Pair strategies keep, per KV head (`n_rope_heads = n_kv`), `d_r / 2` pairs; the other pairs
become NoPE dims that go into the latent:

- `high`: the fastest pairs `0 .. d_r/2 - 1` (local position); `low`: the slowest; `uniform`:
  evenly spaced over the spectrum; `all`: every pair (exact with full rank).
- `norm`: per KV head g, the pairs with the largest measured contribution
  `E||k_{g,i}|| * sum_{h in group(g)} E||q_{h,i}||` (mean pair norms on calibration text; the
  2-norm criterion of MHA2MLA, arXiv 2502.14837).

`rotate` builds one shared rope key (`n_rope_heads = 1`, DeepSeek style). RoPE acts on pair i of
every head with the same 2x2 rotation, so any mixing `k'_{.,i} = A_i k_{.,i}` across the KV heads
that treats both dims of the pair alike commutes with it, and `q_h^T R k_g = sum_j (B_i[g, j] q_h)^T R k'_j`
with `B_i = A_i^-1`. We take `A_i = U_i^T D_i^(1/2)`, where `D_i = diag_g sum_{h in group(g)} E||q_{h,i}||^2`
and `U_i` are the eigenvectors of the query-weighted key Gram `D_i^(1/2) K_i D_i^(1/2)`,
`K_i[g, g'] = E[k_{g,i} . k_{g',i}]` (both from the input second moment C: `E[x x^T] = W C W^T`).
Component `(i, j)` then carries score energy `lambda_{i,j}`, and the `d_r / 2` largest over all pairs
and components form the rope key (a frequency may appear more than once). What is left of each
key, `k_{g,i} - sum_{kept j} B_i[g, j] k'_{j,i}`, loses RoPE and joins the NoPE latent, so every
key dim stays NoPE (`qk_nope_head_dim = d_h`) and keeping all components is exact.

Folding (`fold` f > 1; the frequency folding of TransMLA, arXiv 2502.07864). Adjacent pairs turn at
nearby frequencies, so f of them (pairs `f m .. f m + f - 1`) can share one mixing space as if they
turned alike: the same construction over the n_kv * f (head, pair) vectors of a fold, each component
turned at the fold's fastest frequency `theta_{f m}`. A few components then capture more score energy
than per-pair mixing can (MQA, with one KV head, has nothing to mix otherwise), at the price of
turning the slower pairs' kept share slightly too fast. Keeping all components is then no longer
exact, so a rope key with room for every component does not fold (convert.plan_geometry). Off by
default: on SmolLM2-135M it helps at -75% and -87.5% and hurts at -50% (config.py).

Expected rotation. A pair that loses RoPE contributes `q^T R(-theta_i t) k` at distance t in the
source but `q^T k` after conversion, which is wrong wherever `theta_i t` is not small. With `P_h(t)`
the share of head h's attention at distance t (calibration.py), the best fixed replacement in mean
is `q^T E_t[R(-theta_i t)] k = q^T [[c, s], [-s, c]] k`, `c = sum_t P_h(t) cos(theta_i t)`,
`s = sum_t P_h(t) sin(theta_i t)`: a fixed 2x2 map per (head, pair) that folds into the NoPE query
rows, `q~_i = c q_i - s q_{i+d_h/2}`, `q~_{i+d_h/2} = s q_i + c q_{i+d_h/2}`. High-frequency pairs
average out (c, s ~ 0) instead of adding an unrotated, wrong score; slow pairs keep c ~ 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAIR_STRATEGIES = ("high", "low", "uniform", "norm", "all")


def select_rope_pairs(
    strategy: str,
    head_dim: int,
    n_kept: int,
    n_kv_heads: int,
    q_pair_norm: torch.Tensor | None = None,
    k_pair_norm: torch.Tensor | None = None,
) -> list[list[int]]:
    """Sorted kept pairs per KV head for a pair strategy (`*_pair_norm`: [heads, d_h/2], for "norm")."""
    n_pairs = head_dim // 2
    if strategy == "all":
        return [list(range(n_pairs)) for _ in range(n_kv_heads)]
    if strategy == "high":
        kept = list(range(n_kept))
    elif strategy == "low":
        kept = list(range(n_pairs - n_kept, n_pairs))
    elif strategy == "uniform":
        kept = sorted({round(j * (n_pairs - 1) / max(n_kept - 1, 1)) for j in range(n_kept)})
    elif strategy == "norm":
        group = q_pair_norm.shape[0] // n_kv_heads
        q = q_pair_norm.view(n_kv_heads, group, n_pairs).sum(1)
        score = k_pair_norm * q  # [n_kv, pairs]
        return [sorted(score[g].topk(n_kept).indices.tolist()) for g in range(n_kv_heads)]
    else:
        raise ValueError(f"not a pair strategy: {strategy}")
    return [kept for _ in range(n_kv_heads)]


def split_dims(pairs: list[int], head_dim: int) -> tuple[list[int], list[int]]:
    """(rope dims, nope dims) of one head: rope dims are `[pairs ; pairs + d_h/2]` (rotate_half layout)."""
    half = head_dim // 2
    rope = list(pairs) + [p + half for p in pairs]
    kept = set(rope)
    return rope, [i for i in range(head_dim) if i not in kept]


@dataclass
class HeadSplit:
    """One layer's projections split into NoPE and rotary rows (last input column may be a bias).

    Query head h is `[q_nope[h] ; q_rope[h]]`; its score is `q_nope[h] . k_nope[h // group] +
    q_rope[h] . RoPE(k_rope[h // (H / R)])`.
    """

    q_nope: torch.Tensor  # [H, dn, d']
    q_rope: torch.Tensor  # [H, dr, d']
    k_nope: torch.Tensor  # [n_kv, dn, d']
    k_rope: torch.Tensor  # [R, dr, d']
    rope_pairs: list[list[int]]  # [R][dr / 2], frequency pair of each rotary slot


def split_by_pairs(
    w_q: torch.Tensor, w_k: torch.Tensor, pairs: list[list[int]], w_q_nope: torch.Tensor | None = None
) -> HeadSplit:
    """Pair strategies: each KV head (and its query group) keeps its own pairs rotary.

    `w_q_nope`: the query rows to use where RoPE is removed (default `w_q`; see expected rotation)."""
    w_q_nope = w_q if w_q_nope is None else w_q_nope
    n_h, d_h, _ = w_q.shape
    n_kv = w_k.shape[0]
    group = n_h // n_kv
    dims = [split_dims(p, d_h) for p in pairs]  # (rope, nope) per KV head
    return HeadSplit(
        q_nope=torch.stack([w_q_nope[h, dims[h // group][1]] for h in range(n_h)]),
        q_rope=torch.stack([w_q[h, dims[h // group][0]] for h in range(n_h)]),
        k_nope=torch.stack([w_k[g, nope] for g, (_, nope) in enumerate(dims)]),
        k_rope=torch.stack([w_k[g, rope] for g, (rope, _) in enumerate(dims)]),
        rope_pairs=[list(p) for p in pairs],
    )


def expected_rotation(
    distance_mass: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(c, s)` [H, d_h/2]: attention-weighted mean cos and sin of `theta_i t` per query head and pair."""
    angle = torch.arange(distance_mass.shape[-1], dtype=torch.float64)[:, None] * inv_freq.double()  # [T, P]
    return distance_mass.double() @ angle.cos(), distance_mass.double() @ angle.sin()


def average_removed_rope(w_q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Query rows [H, d_h, d'] with each pair mapped by `E[R(-theta t)]^T`, for use as NoPE rows."""
    half = w_q.shape[1] // 2
    q1, q2 = w_q[:, :half], w_q[:, half:]
    c, s = cos[..., None], sin[..., None]
    return torch.cat([c * q1 - s * q2, s * q1 + c * q2], dim=1)


def _pair_energy(w: torch.Tensor, moment: torch.Tensor) -> torch.Tensor:
    """`E||x_{head, i}||^2` for x = W h: [heads, d_h/2] from W [heads, d_h, d] and C [d, d]."""
    per_dim = torch.einsum("had,de,hae->ha", w, moment, w)
    half = w.shape[1] // 2
    return per_dim[:, :half] + per_dim[:, half:]


def rotated_components(w_q: torch.Tensor, w_k: torch.Tensor, moment: torch.Tensor, fold: int = 1):
    """Per fold of `fold` adjacent frequency pairs, the components of `rotate` (module docstring):
    eigenvalues lam [folds, n_kv * fold] (ascending per fold: what each captures), mix A [folds, comp,
    n_kv * fold] and unmix B [folds, n_kv * fold, comp], over the fold's (KV head, pair) vectors in
    head-major order."""
    n_h, d_h, _ = w_q.shape
    n_kv = w_k.shape[0]
    group, half = n_h // n_kv, d_h // 2
    folds = half // fold
    d = moment.shape[0]  # w may carry a bias column beyond the d inputs
    q_energy = _pair_energy(w_q[..., :d], moment).view(n_kv, group, half).sum(1)  # D: [n_kv, pairs]
    q_energy = q_energy.clamp_min(q_energy.max() * 1e-12)
    root = q_energy.view(n_kv, folds, fold).transpose(0, 1).reshape(folds, n_kv * fold).sqrt()
    gram = 0
    for k in _fold_rows(w_k[..., :d], fold):  # the first and the second dim of each pair
        gram = gram + torch.einsum("fid,de,fje->fij", k, moment, k)  # K: [folds, n_kv * fold, n_kv * fold]
    lam, vecs = torch.linalg.eigh(root[:, :, None] * gram * root[:, None, :])  # ascending per fold
    mix = vecs.transpose(1, 2) * root[:, None, :]  # A = U^T D^(1/2)
    unmix = vecs / root[:, :, None]  # B = D^(-1/2) U
    return lam, mix, unmix


def _fold_rows(w: torch.Tensor, fold: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of W [heads, d_h, d'] for the first and for the second dim of every pair, grouped by
    fold: two [folds, heads * fold, d'] (head-major within a fold)."""
    heads, d_h, d_in = w.shape
    folds = d_h // 2 // fold
    return tuple(
        part.reshape(heads, folds, fold, d_in).transpose(0, 1).reshape(folds, heads * fold, d_in)
        for part in w.chunk(2, dim=1)
    )


def shared_pair_counts(lams: list[torch.Tensor], n_slots: int) -> list[int]:
    """How many components of each fold of pairs every layer keeps when all layers must keep the same
    frequencies (`--target deepseek_v3`): the `n_slots` largest of the components' captured shares
    summed over layers (each layer's eigenvalues normalised to sum 1, so no layer dominates)."""
    share = sum(lam.clamp_min(0).flip(1) / lam.clamp_min(0).sum().clamp_min(1e-30) for lam in lams)
    counts = [0] * share.shape[0]
    for s in share.flatten().topk(n_slots).indices.tolist():  # the k-th largest per fold is taken first
        counts[s // share.shape[1]] += 1
    return counts


def split_rotated(
    w_q: torch.Tensor,
    w_k: torch.Tensor,
    moment: torch.Tensor,
    n_slots: int,
    w_q_nope: torch.Tensor | None = None,
    pair_counts: list[int] | None = None,
    fold: int = 1,
) -> HeadSplit:
    """`rotate`: one shared rope key of `n_slots` mixed (fold, component) slots; see the module
    docstring. `pair_counts` fixes how many components of each fold are kept (the largest of each)."""
    n_h, d_h, d_in = w_q.shape
    n_kv = w_k.shape[0]
    group, half = n_h // n_kv, d_h // 2
    lam, mix, unmix = rotated_components(w_q, w_k, moment, fold)
    width = n_kv * fold  # components per fold
    if pair_counts is None:
        slots = sorted(divmod(int(s), width) for s in lam.flatten().topk(n_slots).indices)  # (fold, comp)
    else:  # components ascend: the last c of fold m are its largest
        slots = [(m, j) for m, c in enumerate(pair_counts) for j in range(width - c, width)]

    k_rows, q_rows = _fold_rows(w_k, fold), _fold_rows(w_q, fold)  # 2 x [folds, heads * fold, d']
    k_left = [rows.clone() for rows in k_rows]  # what stays of each (KV head, pair) beyond the rope key
    k_rope = torch.zeros(2, n_slots, d_in, dtype=w_k.dtype)  # [first|second dim of the pair, slot, d']
    q_rope = torch.zeros(n_h, 2, n_slots, d_in, dtype=w_q.dtype)
    heads = torch.arange(n_h) // group
    for s, (m, j) in enumerate(slots):
        unmix_j = unmix[m, :, j].view(n_kv, fold)  # B[(g, p), j]
        for a in (0, 1):
            k_rope[a, s] = mix[m, j] @ k_rows[a][m]
            q_rope[:, a, s] = torch.einsum("hp,hpd->hd", unmix_j[heads], q_rows[a][m].view(n_h, fold, d_in))
            k_left[a][m] -= unmix_j.reshape(-1, 1) * k_rope[a, s]
    unfolded = [left.view(half // fold, n_kv, fold, d_in).transpose(0, 1).flatten(1, 2) for left in k_left]
    k_nope = torch.cat(unfolded, dim=1)  # back from folds to [n_kv, d_h, d']
    return HeadSplit(
        q_nope=w_q if w_q_nope is None else w_q_nope,
        q_rope=q_rope.reshape(n_h, 2 * n_slots, d_in),
        k_nope=k_nope,
        k_rope=k_rope.reshape(1, 2 * n_slots, d_in),
        rope_pairs=[[m * fold for m, _ in slots]],
    )
