"""Step 3a of a calibrated conversion: refit the queries to the source's attention probabilities.

Queries are never cached, so `q_proj` (NoPE and rope rows of every head) can change at no cost in
KV size. After steps 1-2 each converted head attends with probabilities `p'` that differ from the
source's `p`, because its keys lost RoPE on most components and pass through a rank-r latent. For
layer l, with the converted layer's keys fixed (the latent `c_n` and the rotated rope key `k_n` that
its cache will hold), the score of head h between query position m and key n,

    s'_{h,mn} = scale * ((W_UK,h^T W_QN,h x_m) . c_n + RoPE_m(W_QR,h x_m) . k_n),

is linear in the query rows `W_Q = [W_QN ; W_QR]`, and the loss

    KL = mean_{h,m} sum_n p_{h,mn} (log p_{h,mn} - log softmax_n(s'_{h,m.}))

is convex in the scores (log-sum-exp minus a linear term), hence convex in `W_Q`: L-BFGS from the
converted weights has no local minimum to stop in, only a step budget. Its gradient is closed-form,
`d KL / d s' = p' - p`, mapped back through `c` and `W_UK` (NoPE rows) and the inverse rotation
(rope rows), so no autograd graph over the `[B, H, S, S]` probabilities is kept. The targets are
the source's probabilities on its own hidden states; the inputs `x` are the converted model's
(sequential, as the read-out refit).

This changes the probabilities, not what they average, so it runs before the read-out refit
(refit.py), which then fits W_UV and o_proj on the new probabilities. Measured on SmolLM2-135M
(16 windows, 30 L-BFGS steps per layer, the refit's o_proj bound; README's quality table):
perplexity 29.24 -> 28.44, 61.05 -> 54.24 and 197.7 -> 132.4 at 192, 96 and 48 values per token
per layer; the conversion takes 10-15 minutes on 2 cores instead of 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .calibration import causal_attention_probs, causal_log_mask
from .source import projections

# Windows and L-BFGS iterations per layer of the benchmarked query fit (quality.md). Fewer cost less
# and gain less: at budget 96, 8 x 15 reached 48.1 where 16 x 30 reached 46.7 and no fit 51.5 (first
# 8 test windows; quality_explore.md).
QUERY_FIT_SEQUENCES = 16
QUERY_FIT_STEPS = 30


def source_attention_probs(
    attn: nn.Module, x: torch.Tensor, position_embeddings, sliding_window: int | None = None
) -> torch.Tensor:
    """Attention probabilities [B, H, S, S] of a Llama-family source attention on its normed input x
    (through its head norms, if it has them)."""
    B, S, _ = x.shape
    proj = projections(attn, attn.config)
    x = x.to(proj["q_proj"].weight.dtype)
    q = proj["q_proj"](x).view(B, S, -1, attn.head_dim)
    k = proj["k_proj"](x).view(B, S, -1, attn.head_dim)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    cos, sin = position_embeddings  # [1, S, d_h]
    return causal_attention_probs(
        q.transpose(1, 2), k.transpose(1, 2), cos[0], sin[0], attn.scaling, sliding_window
    )


def query_inputs(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the fitted query weights act on: the layer input x [B, S, d], or with qk-norm each head's
    unit-RMS source query [B, S, H, d_h] (which `q_head_proj` maps)."""
    return attn.unit_queries(x) if attn.n_key_scales else x


def query_weights(attn: nn.Module) -> torch.Tensor:
    """The fitted weights: `q_head_proj` [H, dn + dr, d_h] with qk-norm, else `q_proj.weight`."""
    return attn.q_head_proj if attn.n_key_scales else attn.q_proj.weight


class AttentionKL:
    """`KL(W_Q)` and its gradient for one MLA layer with fixed keys (see the module docstring)."""

    def __init__(
        self, attn: nn.Module, targets: list[torch.Tensor], inputs: list[torch.Tensor], position_embeddings
    ):
        self.attn, self.targets, self.pe = attn, targets, position_embeddings
        S = inputs[0].shape[1]
        self.mask = causal_log_mask(S, S, attn.sliding_window, inputs[0].device)
        # (c_kv [B, 1, S, r + n_s] with any key scales, rotated k_rope of each query head's rope head
        # [B, H, S, dr])
        self.keys = []
        for x in inputs:
            _, _, c_kv, k_rope = attn.project(x, position_embeddings)
            k_rope = k_rope.repeat_interleave(attn.num_heads // attn.n_rope_heads, dim=1)
            self.keys.append((c_kv, k_rope))
        self.inputs = [query_inputs(attn, x) for x in inputs]
        self.count = sum(x.shape[0] * x.shape[1] for x in inputs) * attn.num_heads
        self.neg_entropy = sum(float(torch.special.xlogy(p, p).sum()) for p in targets)

    @torch.no_grad()  # the gradient is closed-form (L-BFGS runs its closure with autograd on)
    def __call__(self, w_q: torch.Tensor) -> tuple[float, torch.Tensor]:
        attn = self.attn
        H, dn, dr, scale = attn.num_heads, attn.qk_nope_head_dim, attn.qk_rope_head_dim, attn.scaling
        w_uk = attn._up_weights()[0]  # [H, dn, r]
        cos, sin = self.pe
        loss, grad = self.neg_entropy, torch.zeros_like(w_q)
        r = attn.kv_lora_rank
        for x, p, (c_kv, k_rope) in zip(self.inputs, self.targets, self.keys, strict=True):
            B, S = x.shape[:2]
            if attn.n_key_scales:  # x: unit-RMS query heads [B, S, H, d_h]
                q = torch.einsum("bshi,hoi->bhso", x, w_q)
            else:
                q = F.linear(x, w_q, attn.q_proj.bias).view(B, S, H, dn + dr).transpose(1, 2)
            q_nope, q_rope = q.split([dn, dr], dim=-1)
            q_lat, q_rope = q_nope @ w_uk, attn.rotate_queries(q_rope, self.pe)
            scores = q_lat @ c_kv[..., :r].transpose(-1, -2) + q_rope @ k_rope.transpose(-1, -2)
            scores = attn.scale_by_key(scores, c_kv) * scale
            log_q = (scores + self.mask).log_softmax(-1)  # [B, H, S, S]
            loss -= float((p * log_q).sum())
            # d (count * KL) / d (q . k): (p' - p) * scale * the key scale
            d_scores = attn.scale_by_key(log_q.exp_().sub_(p).mul_(scale), c_kv)
            d_nope = (d_scores @ c_kv[..., :r]) @ w_uk.transpose(1, 2)  # [B, H, S, dn]
            d_rope = attn.rotate_queries(d_scores @ k_rope, (cos, -sin))  # rotated back: [B, H, S, dr]
            d_q = torch.cat([d_nope, d_rope], dim=-1)  # [B, H, S, dn + dr]
            if attn.n_key_scales:
                grad += torch.einsum("bhso,bshi->hoi", d_q, x)
            else:
                grad += d_q.transpose(1, 2).reshape(B * S, -1).T @ x.reshape(B * S, -1)
        return loss / self.count, grad / self.count


def fit_queries(
    src_attn: nn.Module,
    attn: nn.Module,
    x_src: torch.Tensor,
    x_mla: torch.Tensor,
    position_embeddings,
    steps: int = QUERY_FIT_STEPS,
    batch_size: int = 4,
) -> tuple[float, float]:
    """Refit the query weights (`query_weights`) in place by L-BFGS on the attention KL; returns the
    KL before and after.

    `x_src`, `x_mla` [N, S, d]: the normed inputs of the source layer `src_attn` and of the MLA layer
    `attn` on the same windows. Keeps the old weights if the fit did not lower the KL."""
    batches = range(0, len(x_src), batch_size)
    window = attn.sliding_window
    targets = [
        source_attention_probs(src_attn, x_src[b : b + batch_size], position_embeddings, window)
        for b in batches
    ]
    kl = AttentionKL(attn, targets, [x_mla[b : b + batch_size] for b in batches], position_embeddings)
    w_q = query_weights(attn).detach().clone()
    lbfgs = torch.optim.LBFGS([w_q], max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        loss, w_q.grad = kl(w_q)
        return torch.tensor(loss)

    before = float(lbfgs.step(closure))  # step returns the loss of its first evaluation: the start
    after = kl(w_q)[0]
    if after < before:
        query_weights(attn).copy_(w_q)
    return before, min(before, after)
