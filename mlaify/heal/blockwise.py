"""Block-wise distillation: each MLA attention trained, one layer at a time, on the source layer's output.

A generalisation of the conversion's step 3 (refit.py, queryfit.py) from closed-form fits of some
weights to gradient steps on all of them, the cache-writing `kv_a_proj_with_mqa` included. For layer
l, with the source run on the windows through its own layers and the student through its own
(already distilled) layers `< l`, as the refit does:

    min over the attention weights of layer l:  E ||attn_mla(norm(h'_l)) - o_l||^2 / E ||o_l||^2

where `h'_l` is the student's hidden state entering layer l and `o_l` the source attention's output
on its own hidden state. Each step costs one attention layer's forward and backward, not the whole
model's and its vocabulary head, so it is much cheaper per token than end-to-end training; it is a
plain per-layer Adam loop rather than a `Trainer` run because every layer is its own small problem
with its own inputs.
"""

from __future__ import annotations

import logging
from functools import partial

import torch
from torch import nn
from tqdm.auto import tqdm

from ..convert.calibration import autocast_forward, causal_log_mask, layer_mask
from ..convert.source import ModelLayers

log = logging.getLogger(__name__)


def _batched(fn, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([fn(x[b : b + batch_size]) for b in range(0, len(x), batch_size)])


def _distill_layer(attn, x, target, position_embeddings, mask, epochs, lr, batch_size, autocast, generator):
    """Adam on one MLA attention's weights: its output on inputs x [N, S, d] toward target [N, S, d].
    Returns the relative error before and after."""
    scale = target.pow(2).mean()

    def error(b: torch.Tensor) -> torch.Tensor:
        with autocast:
            out = attn(x[b], position_embeddings=position_embeddings, attention_mask=mask)[0]
        return (out.float() - target[b]).pow(2).mean() / scale

    def mean_error() -> float:
        with torch.no_grad():
            return sum(float(error(b)) * len(b) for b in torch.arange(len(x)).split(batch_size)) / len(x)

    before = mean_error()
    optimizer = torch.optim.Adam([p for p in attn.parameters() if p.requires_grad], lr=lr)
    for _ in range(epochs):
        for b in torch.randperm(len(x), generator=generator).split(batch_size):
            optimizer.zero_grad(set_to_none=True)
            error(b).backward()
            optimizer.step()
    return before, mean_error()


def blockwise_distill(
    student: nn.Module,
    teacher: nn.Module,
    windows: torch.Tensor,
    epochs: int = 2,
    lr: float = 1e-4,
    batch_size: int = 4,
    compute_dtype: str = "bfloat16",
    seed: int = 0,
    progress: bool = True,
) -> list[tuple[float, float]]:
    """Train every attention of `student` in place on token `windows` [N, S]; returns each layer's
    relative output error on those windows (before, after)."""
    device = next(student.parameters()).device
    teacher = teacher.to(device).eval()
    windows = windows.to(device)
    seq_len = windows.shape[1]
    generator = torch.Generator().manual_seed(seed)
    autocast = autocast_forward(teacher, compute_dtype)
    positions = torch.arange(seq_len, device=device)[None]
    source = ModelLayers(teacher)  # each layer's RoPE table and window (Gemma3: two of each)
    with torch.no_grad():
        h_src = teacher.model.embed_tokens(windows)
        h_mla = student.model.embed_tokens(windows)
    errors = []
    layers = list(zip(teacher.model.layers, student.model.layers, strict=True))
    for i, (src, mla) in enumerate(tqdm(layers, desc="block-wise", unit="layer", disable=not progress)):
        pe = source.position_embeddings(i, h_src[:1], positions)  # the student's tables are the same
        window = source.sliding_window(i)
        mask = causal_log_mask(seq_len, seq_len, window)[None, None].to(device, h_src.dtype)
        mla_mask = layer_mask(seq_len, window)  # None: causal
        mla_mask = None if mla_mask is None else mla_mask.to(device, h_mla.dtype)
        src_attention = partial(src.self_attn, position_embeddings=pe, attention_mask=mask)
        with torch.no_grad(), autocast:
            normed = _batched(src.input_layernorm, h_src, batch_size)
            target = _batched(lambda x, f=src_attention: f(x)[0].float(), normed, batch_size)
            x = _batched(mla.input_layernorm, h_mla, batch_size).float()
        errors.append(
            _distill_layer(
                mla.self_attn, x, target, pe, mla_mask, epochs, lr, batch_size, autocast, generator
            )
        )
        log.debug("layer %d: relative attention error %.4f -> %.4f", mla.self_attn.layer_idx, *errors[-1])
        with torch.no_grad(), autocast:
            h_src = _batched(partial(src, attention_mask=mask, position_embeddings=pe), h_src, batch_size)
            h_mla = _batched(partial(mla, attention_mask=mla_mask, position_embeddings=pe), h_mla, batch_size)
    first, last = (sum(e[i] for e in errors) / len(errors) for i in (0, 1))
    log.info(
        "block-wise: mean relative attention error over %d layers %.4f -> %.4f", len(errors), first, last
    )
    return errors
