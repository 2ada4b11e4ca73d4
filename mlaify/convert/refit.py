"""Step 3 of a calibrated conversion: refit what reads the cache, layer by layer, by least squares.

Steps 1 and 2 fix what the cache holds (`W_DKV`, `W_KR`). What reads it can still change at no
cost in KV size: the value up-projection `W_UV,h` of every query head (`kv_b_proj` holds one per
head, even where the source shared V across a group) and `o_proj`. For layer l, with the source run
on the calibration windows and the converted model run on the same windows through its own
converted layers `< l` (so layer l also absorbs what earlier layers got wrong):

- `z_h = sum_n p'_{h,n} c_n`: the converted head's softmax-weighted latents (`attend_latent`, the
  absorbed attention before W_UV), `u_h` the source head's output (the input of its `o_proj`):
  `W_UV,h = argmin E||u_h - W z_h||^2 = E[u_h z_h^T] E[z_h z_h^T]^-1`;
- then `u'_h = W_UV,h z_h` stacked over heads, `o` the source attention output:
  `W_O = argmin E||o - W u'||^2 = E[o u'^T] E[u' u'^T]^-1`. This mixes across heads and so also
  absorbs, to first order, the error of the changed attention probabilities `p'`. With
  `r <= d_v` the pair reaches the best linear map from all heads' `z` to `o`.

The second moments are taken in one pass per layer (`E[u' u'^T] = B E[z z^T] B^T`, B the block
diagonal of the new W_UV). Both solves carry a ridge toward the converted weights, 1e-6 of the
mean diagonal unless that leaves o_proj over READOUT_BOUND times the source's norm: where the
heads attend almost alike, their read-outs `u'_h` are nearly collinear, and a weak ridge fits the
bfloat16 rounding of the calibration passes into huge weights that need that same rounding to
cancel (SmolLM2-135M layer 18 at budget 192: o_proj 20-130x the source's norm, perplexity doubled;
benchmarks/results/quality_explore.md).
Measured on SmolLM2-135M (benchmarks/results/quality.md, 64 windows): perplexity 36.6 -> 29.2,
115.0 -> 61.1 and 409 -> 198 at 192, 96 and 48 values per token per layer (29.8 / 61.0 / 198
before the bound).
"""

from __future__ import annotations

import logging
from functools import partial

import torch
from torch import nn

from .calibration import autocast_forward, causal_log_mask, full_precision, layer_mask
from .queryfit import QUERY_FIT_STEPS, fit_queries
from .source import projections

log = logging.getLogger(__name__)

# Calibration windows `mlaify convert --calib-text` refits on by default: 64 x 512 tokens take about
# 80 s on 2 cores for SmolLM2-135M at budget 96 (bfloat16 forward passes); 128 windows lower the
# perplexity further at twice that, which takes the whole conversion past 3 minutes.
REFIT_SEQUENCES = 64
# Ridges tried in turn, weakest first: the first whose o_proj stays within READOUT_BOUND times the
# source's Frobenius norm is kept. Most layers keep the weakest (SmolLM2-135M at 192: all but layer
# 18, which takes 1e-4); a bound of 2 also constrains layers 0 and 1 and costs perplexity.
RIDGES = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
READOUT_BOUND = 4.0


def _solve_(gram: torch.Tensor, cross: torch.Tensor, prior: torch.Tensor, ridge: float) -> torch.Tensor:
    """`(cross + l prior) (gram + l I)^-1`, the normal equations of `min E||y - W x||^2 + l ||W - prior||^2`
    with `l = ridge x` the mean diagonal of `gram`: where the data leave W undetermined it stays
    at the converted weights instead of growing (or shrinking to zero). Adds `l I` to `gram` in
    place: the grams are the refit's largest tensors, so no copy of one and no identity is made here."""
    diagonal = gram.diagonal(dim1=-2, dim2=-1)
    lam = ridge * diagonal.mean(-1, keepdim=True).clamp_min(1e-30)
    diagonal.add_(lam)
    rhs = cross + lam[..., None] * prior
    return torch.linalg.solve(gram, rhs.transpose(-1, -2)).transpose(-1, -2)


def fit_readout(
    zz: torch.Tensor,
    uz: torch.Tensor,
    oz: torch.Tensor,
    uv_prior: torch.Tensor,
    o_prior: torch.Tensor,
    bound: float,
    ridges: tuple[float, ...] = RIDGES,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per-head `W_UV` [H, dv, r] and `W_O` [d, H dv] from the moments `E[z z^T]` (all heads),
    `E[u_h z_h^T]` and `E[o z^T]`, with the weakest of `ridges` whose `W_O` has a Frobenius norm
    within `bound` (the strongest if none does); returns both and that ridge."""
    H, dv, r = uz.shape
    zz_blocks = zz.view(H, r, H, r)
    heads = torch.arange(H, device=zz.device)
    zz_heads = zz_blocks[heads, :, heads]  # [H, r, r], E[z_h z_h^T]
    for ridge in ridges:
        w_uv = _solve_(zz_heads.clone(), uz, uv_prior, ridge)
        # u' = B z with B the block diagonal of w_uv, never formed: it is mostly zeros, and B, B zz
        # and B zz B^T would each be about as large as zz, at the conversion's peak memory.
        uu = torch.einsum("hdr,hrgs,ges->hdge", w_uv, zz_blocks, w_uv).reshape(H * dv, H * dv)
        ou = torch.einsum("ogr,gdr->ogd", oz.view(-1, H, r), w_uv).reshape(-1, H * dv)
        w_o = _solve_(uu, ou, o_prior, ridge)
        if w_o.norm() <= bound:
            break
    return w_uv, w_o, ridge


class _OutputRecorder:
    """Forward hook on a source `o_proj`: its input (the head outputs u) and its output o."""

    def __init__(self, o_proj: nn.Linear):
        self.handle = o_proj.register_forward_hook(self._record)
        self.u = self.o = None

    def _record(self, module, args, out) -> None:
        self.u, self.o = args[0], out


class Refitter:
    """Step 3 a layer at a time, as the conversion goes: holds the two streams of hidden states (the
    source's through its own layers, the converted model's through the converted ones) and refits
    each converted layer in turn, so that only one layer of either model is ever needed.

    The layers run under `compute_dtype` autocast (calibration.py); the moments and solves do not.
    In float32 the refit keeps an exact conversion exact; bfloat16 leaves its rounding in the fitted
    weights (about 1% of the largest logit on the tiny test models), far below a lossy conversion's error.
    `query_fit` > 0 first refits each layer's queries on that many of the windows (queryfit.py).
    """

    @torch.no_grad()
    def __init__(
        self,
        source,
        windows: torch.Tensor,
        batch_size: int = 4,
        compute_dtype: str = "bfloat16",
        query_fit: int = 0,
        query_fit_steps: int = QUERY_FIT_STEPS,
    ):
        n, seq_len = windows.shape
        self.batch_size, self.compute_dtype = batch_size, compute_dtype
        self.query_fit, self.query_fit_steps = query_fit, query_fit_steps
        self.source = source
        self.hidden_src = self.hidden_mla = source.embed(windows)  # never changed in place
        self.batches = range(0, n, batch_size)
        self.kls = []  # attention KL per layer, before and after the query fit
        log.info("refitting W_UV and o_proj on %d windows of %d tokens", n, seq_len)

    @torch.no_grad()
    def layer(self, src_layer: nn.Module, mla_layer: nn.Module) -> None:
        """Refit `mla_layer`'s per-head W_UV and o_proj (in place) against `src_layer`, then move both
        streams through their layer."""
        autocast = autocast_forward(src_layer, self.compute_dtype)
        device = self.hidden_src.device
        exact = full_precision(device)
        hidden_src, hidden_mla = self.hidden_src, self.hidden_mla
        batch_size, batches = self.batch_size, self.batches
        attn = mla_layer.self_attn
        position_embeddings, mask_src, mask_mla = self._layer_inputs(attn.layer_idx)
        H, r, dv, dn = attn.num_heads, attn.kv_lora_rank, attn.v_head_dim, attn.qk_nope_head_dim
        recorder = _OutputRecorder(src_layer.self_attn.o_proj)
        # Targets without the biases the converted layer already adds: the source value bias
        # (folded into the converted o_proj bias at conversion) and that o_proj bias.
        v_bias = projections(src_layer.self_attn, src_layer.self_attn.config)["v_proj"].bias
        if v_bias is None:
            v_bias = 0
        else:  # one row per KV head, repeated for the query heads of its group
            n_kv = v_bias.numel() // dv
            v_bias = v_bias.view(n_kv, dv).repeat_interleave(H // n_kv, dim=0)
        o_bias = 0 if attn.o_proj.bias is None else attn.o_proj.bias
        if self.query_fit:
            q = self.query_fit
            with exact:
                x_src = src_layer.input_layernorm(hidden_src[:q]).float()
                x_mla = mla_layer.input_layernorm(hidden_mla[:q]).float()
                kl = fit_queries(
                    src_layer.self_attn,
                    attn,
                    x_src,
                    x_mla,
                    position_embeddings,
                    self.query_fit_steps,
                    batch_size,
                )
            log.debug("layer %d: attention KL %.4f -> %.4f", attn.layer_idx, *kl)
            self.kls.append(kl)
        zeros = partial(torch.zeros, dtype=torch.float64, device=device)
        zz = zeros(H * r, H * r)  # E[z z^T], all heads
        uz = zeros(H, dv, r)  # E[u_h z_h^T]
        oz = zeros(attn.o_proj.out_features, H * r)  # E[o z^T]
        outputs = []
        try:
            for b in batches:
                with autocast:
                    outputs.append(
                        src_layer(
                            hidden_src[b : b + batch_size],
                            attention_mask=mask_src,
                            position_embeddings=position_embeddings,
                        )
                    )
                    x = mla_layer.input_layernorm(hidden_mla[b : b + batch_size])
                    z = attn.attend_latent(*attn.project(x, position_embeddings), mask_mla)  # [B, H, S, r]
                with exact:
                    u = recorder.u.float().view(*recorder.u.shape[:2], H, dv) - v_bias  # [B, S, H, dv]
                    # float32 within a batch, float64 across batches (as calibration.py)
                    z_rows = z.transpose(1, 2).reshape(-1, H * r).float()
                    for h, head_rows in enumerate(z_rows.split(r, dim=1)):  # no (H r)^2 temporaries
                        zz[h * r : (h + 1) * r] += (head_rows.T @ z_rows).double()
                    uz += torch.einsum("bshd,bhsr->hdr", u, z.float()).double()
                    o = (recorder.o.float() - o_bias).reshape(-1, oz.shape[0])
                    oz += (o.T @ z_rows).double()
        finally:
            recorder.handle.remove()
        uv_prior = attn.kv_b_proj.weight.view(H, dn + dv, r)[:, dn:].double()
        bound = READOUT_BOUND * float(src_layer.self_attn.o_proj.weight.double().norm())
        w_uv, w_o, ridge = fit_readout(zz, uz, oz, uv_prior, attn.o_proj.weight.double(), bound)
        if ridge != RIDGES[0]:
            log.info(
                "layer %d: refit ridge %g, o_proj norm %.4g (bound %.4g)",
                attn.layer_idx,
                ridge,
                w_o.norm(),
                bound,
            )
        attn.kv_b_proj.weight.view(H, dn + dv, r)[:, dn:] = w_uv.to(attn.kv_b_proj.weight.dtype)
        attn.o_proj.weight.copy_(w_o)
        self.hidden_src = torch.cat(outputs)
        with autocast:
            self.hidden_mla = torch.cat(
                [
                    mla_layer(
                        hidden_mla[b : b + batch_size],
                        attention_mask=mask_mla,
                        position_embeddings=position_embeddings,
                    )
                    for b in batches
                ]
            )

    def _layer_inputs(self, i: int):
        """Layer i's RoPE tables, and its masks: an additive causal (or banded) one for the source
        layers, which every attention backend reads; for MLAAttention None (causal: SDPA's causal
        kernel) unless a sliding window is shorter than the windows."""
        hidden = self.hidden_src
        seq_len, device = hidden.shape[1], hidden.device
        positions = torch.arange(seq_len, device=device)[None]
        position_embeddings = self.source.position_embeddings(i, hidden[:1], positions)
        window = self.source.sliding_window(i)
        mask_src = causal_log_mask(seq_len, seq_len, window, device)[None, None].to(hidden.dtype)
        return position_embeddings, mask_src, layer_mask(seq_len, window, device)

    @torch.no_grad()
    def keep(self, i: int, src_layer: nn.Module) -> None:
        """A layer that kept the source's attention: nothing to fit, both streams pass through it."""
        position_embeddings, mask, _ = self._layer_inputs(i)
        run = partial(src_layer, attention_mask=mask, position_embeddings=position_embeddings)
        with autocast_forward(src_layer, self.compute_dtype):
            outputs = [
                torch.cat([run(h[b : b + self.batch_size]) for b in self.batches])
                for h in (self.hidden_src, self.hidden_mla)
            ]
        self.hidden_src, self.hidden_mla = outputs

    def finish(self) -> None:
        if self.kls:
            before, after = (sum(k) / len(self.kls) for k in zip(*self.kls, strict=True))
            log.info("query fit: mean attention KL over %d layers %.4f -> %.4f", len(self.kls), before, after)
