"""Rescale each MLA attention's factor pairs to equal per-value size before training: same function,
balanced Adam steps.

A converted attention computes products of factors whose split is free: `W_UK (W_DKV h)`,
`q_rope . k_rope`, `q_nope . (W_UK c)`, `W_O (W_UV z)`. Any positive diagonal gauge `D` between two
factors (`A -> D A`, `B -> B D^-1`) leaves every product, and so the model's output, unchanged. The
conversion picks splits for accuracy, not for training: on SmolLM2 at budget 96 the latent rows of
`kv_a_proj_with_mqa` have a root-mean-square value about 1.3 while the `kv_b_proj` columns that read
them have about 0.035. Adam moves every value by about the learning rate per step whatever its size,
so the cache-writing projection then changes 40x less, relative to itself, than what reads it, and
no single learning rate suits both. `balance_attention` picks each gauge so that the two factors'
values have the same RMS (`c = sqrt(rms(B_i) / rms(A_i))`), which equalises their relative step:

- latent dim i: row i of `W_DKV` (and its bias) against column i of `kv_b_proj`;
- rope pair p of rope head g: its two key rows in `kv_a_proj_with_mqa` against the two query rows of
  every query head of the group (a scalar on a pair commutes with its rotation);
- NoPE dim j of head h: its query row against its `W_UK` row;
- value dim j of head h: its `W_UV` row against its `o_proj` column.

The gauges share `kv_b_proj`, so a few alternating rounds settle them (each round is exact).
"""

from __future__ import annotations

import torch
from torch import nn

ROUNDS = 4


def _rms(x: torch.Tensor, dims) -> torch.Tensor:
    return x.pow(2).mean(dim=dims).sqrt()


def _gauge(a: torch.Tensor, b: torch.Tensor, a_dims, b_dims) -> torch.Tensor:
    """`sqrt(rms(b) / rms(a))` per gauge (1 where either side is all zeros)."""
    ra, rb = _rms(a, a_dims), _rms(b, b_dims)
    ok = (ra > 0) & (rb > 0)
    return torch.where(ok, (rb / ra.where(ok, torch.ones_like(ra))).sqrt(), torch.ones_like(ra))


@torch.no_grad()
def balance_attention(attn: nn.Module, rounds: int = ROUNDS) -> None:
    """Balance one MLAAttention in place (float64 arithmetic; the function is unchanged up to
    round-off of the weights' dtype)."""
    H, R = attn.num_heads, attn.n_rope_heads
    r, dn, dr, dv = attn.kv_lora_rank, attn.qk_nope_head_dim, attn.qk_rope_head_dim, attn.v_head_dim
    params = [attn.kv_a_proj_with_mqa.weight, attn.kv_b_proj.weight, attn.o_proj.weight]
    biases = {"kv_a": attn.kv_a_proj_with_mqa.bias}
    if attn.n_key_scales:  # qk-norm: the MLA query is q_head_proj's output
        params.append(attn.q_head_proj)
        q = params[-1].double().clone()  # [H, dn + dr, d_h]
        q_bias = None
    else:
        params.append(attn.q_proj.weight)
        q = params[-1].double().view(H, dn + dr, -1).clone()  # [H, dn + dr, d]
        q_bias = None if attn.q_proj.bias is None else attn.q_proj.bias.double().view(H, dn + dr).clone()
    a = params[0].double().clone()  # [r + R * dr, d]
    a_bias = None if biases["kv_a"] is None else biases["kv_a"].double().clone()
    b = params[1].double().view(H, dn + dv, r).clone()  # [H, dn + dv, r]
    o = params[2].double().view(-1, H, dv).clone()  # [d, H, dv]

    def scale_rows(w, bias, c, rows):
        w[rows] *= c.unsqueeze(-1)
        if bias is not None:
            bias[rows] *= c

    for _ in range(rounds):
        # Latent dims: W_DKV row i against kv_b_proj column i.
        c = _gauge(a[:r], b, (1,), (0, 1))
        scale_rows(a, a_bias, c, slice(0, r))
        b /= c
        # Rope pairs: key rows (p, p + dr/2) of rope head g against the same query rows of its group.
        k = a[r:].view(R, 2, dr // 2, -1)  # [R, 2, dr/2, d]
        qr = q[:, dn:].view(R, H // R, 2, dr // 2, -1)  # [R, group, 2, dr/2, d]
        c = _gauge(k, qr, (1, 3), (1, 2, 4))  # [R, dr/2]
        k *= c[:, None, :, None]
        qr /= c[:, None, None, :, None]
        if a_bias is not None:
            a_bias[r:].view(R, 2, dr // 2).mul_(c[:, None, :])
        if q_bias is not None:
            q_bias[:, dn:].view(R, H // R, 2, dr // 2).div_(c[:, None, None, :])
        # NoPE dims: query row (h, j) against W_UK row (h, j).
        c = _gauge(q[:, :dn], b[:, :dn], (2,), (2,))  # [H, dn]
        q[:, :dn] *= c.unsqueeze(-1)
        if q_bias is not None:
            q_bias[:, :dn] *= c
        b[:, :dn] /= c.unsqueeze(-1)
        # Value dims: W_UV row (h, j) against o_proj column (h, j).
        c = _gauge(b[:, dn:], o, (2,), (0,))  # [H, dv]
        b[:, dn:] *= c.unsqueeze(-1)
        o /= c
    for p, new in zip(params, (a, b, o, q)):
        p.copy_(new.view_as(p).to(p.dtype))
    if a_bias is not None:
        biases["kv_a"].copy_(a_bias.to(biases["kv_a"].dtype))
    if q_bias is not None:
        attn.q_proj.bias.copy_(q_bias.view_as(attn.q_proj.bias).to(attn.q_proj.bias.dtype))


def balance_model(model: nn.Module) -> int:
    """Balance every MLA attention of `model`; returns how many were balanced."""
    layers = [m for m in model.modules() if hasattr(m, "kv_b_proj") and hasattr(m, "kv_a_proj_with_mqa")]
    for attn in layers:
        balance_attention(attn)
    return len(layers)
