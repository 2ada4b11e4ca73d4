"""The distillation loss and the `Trainer` that computes it with the teacher's logits on the fly.

Why `Trainer`: it already brings what a training run needs on one CPU, one GPU or many under
accelerate / FSDP (optimizer and schedule, gradient accumulation, checkpoints that resume with their
RNG and data position, gradient checkpointing; only the CPU path is tested here); distillation only
changes the loss. The teacher runs
inside `compute_loss` under `no_grad`, so no logits are ever stored, on disk or across steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer

from ..convert.calibration import autocast_forward

# Rows of the [B*S, V] logits per chunk: a few float32 temporaries of 2^22 values (16 MB) at a time.
CHUNK_VALUES = 1 << 22


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    input_ids: torch.Tensor,
    kind: str,
    temperature: float = 1.0,
) -> torch.Tensor:
    """kd (`T^2 KL(p_teacher^T || p_student^T)`, mean over tokens), lm (next-token cross entropy,
    mean over the B x (S - 1) predicted tokens) or their mean, from logits [B, S, V], in float32.

    The last position has no next token and is left out of the lm term."""
    targets = F.pad(input_ids[:, 1:], (0, 1), value=-100)
    return _FusedDistillation.apply(student_logits, teacher_logits, targets, kind, temperature)


class _FusedDistillation(torch.autograd.Function):
    """The loss and its gradient in one pass over the logits, a chunk of rows at a time.

    Plain autograd keeps five to six float32 copies of the [B, S, V] logits alive (the casts, both
    log-softmaxes, the KL terms, their gradients): 21-26 GB for Gemma-3's 262k vocabulary at 8 x 512
    tokens, more than a 24 GB machine has. The gradient has a closed form, so forward writes it
    chunk by chunk into one tensor of the logits' dtype, and backward only scales it. What stays
    alive is the two logits tensors and that gradient, and each chunk makes fewer passes over the
    vocabulary than autograd does (benchmarks/kd_loss.py measures both). Where no gradient is
    wanted (held-out scoring under `no_grad`), only the loss is computed.
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, targets, kind, temperature):
        s_all = student_logits.flatten(0, 1)
        t_all = None if teacher_logits is None else teacher_logits.flatten(0, 1)
        y_all = targets.flatten()
        n, vocab = s_all.shape
        n_lm = int((y_all != -100).sum()) if "lm" in kind else 0
        t = temperature
        grad = torch.empty_like(s_all) if ctx.needs_input_grad[0] else None
        loss = torch.zeros((), dtype=torch.float32, device=s_all.device)
        rows = max(1, CHUNK_VALUES // vocab)
        for i in range(0, n, rows):
            chunk = slice(i, i + rows)
            loss += _chunk_loss_and_grad(
                s_all[chunk],
                None if t_all is None else t_all[chunk],
                y_all[chunk],
                kind,
                t,
                n,
                n_lm,
                None if grad is None else grad[chunk],
            )
        ctx.save_for_backward(grad)
        ctx.shape = student_logits.shape
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return (grad * grad_output.to(grad.dtype)).view(ctx.shape), None, None, None, None


def _chunk_loss_and_grad(
    student: torch.Tensor,
    teacher: torch.Tensor | None,
    targets: torch.Tensor,
    kind: str,
    t: float,
    n: int,
    n_lm: int,
    grad_out: torch.Tensor | None,
) -> torch.Tensor:
    """One chunk of rows [r, V]: its share of the loss, and its gradient written into `grad_out`
    (unless that is None).

    kd: loss `t^2/n sum p_t (log p_t - log p_s)`, gradient `t/n (p_s - p_t)` (both at temperature t).
    lm: loss `-1/n_lm sum log p_s[y]`, gradient `w (p_s - onehot(y))` with w = 1/n_lm where y is a
    target, 0 where it is not. kd+lm: the mean of the two. Temporaries are reused in place.
    """
    kd, lm = "kd" in kind, "lm" in kind
    s = student.float()
    loss = torch.zeros((), dtype=torch.float32, device=s.device)
    log_p = F.log_softmax(s, dim=-1) if lm or t == 1 else None
    if lm:
        w = (targets != -100).unsqueeze(-1).float() / max(n_lm, 1)
        index = targets.clamp_min(0).unsqueeze(-1)
        loss -= (log_p.gather(-1, index) * w).sum()
    if kd:
        log_p_s = log_p if t == 1 else F.log_softmax(s / t, dim=-1)
        log_p_t = F.log_softmax(teacher.float() / t, dim=-1)
        p_t = log_p_t.exp()
        loss += (t * t / n) * log_p_t.sub_(log_p_s).mul_(p_t).sum()
    scale = 1.0 / (kd + lm)  # kd+lm is the mean of the two terms
    if grad_out is None:
        return loss * scale
    if kd and lm and t == 1:  # one exp serves both terms: p_s (1/n + w) - p_t / n
        grad = log_p.exp_().mul_(w + 1 / n).sub_(p_t, alpha=1 / n)
    else:
        grad = log_p_s.exp_().sub_(p_t).mul_(t / n) if kd else None
        if lm:
            grad_lm = log_p.exp_().mul_(w)
            grad = grad_lm if grad is None else grad.add_(grad_lm)
    if lm:
        grad.scatter_add_(-1, index, -w)
    grad_out.copy_(grad.mul_(scale))
    return loss * scale


def hidden_state_loss(student_hidden: tuple, teacher_hidden: tuple) -> torch.Tensor:
    """Mean over the decoder layers of each output's relative squared error to the teacher's,
    `||h_s - h_t||^2 / ||h_t||^2` (the embeddings, shared and untrained, are skipped).

    A dense per-layer signal beside the logits' one: the student's layer l should leave the residual
    stream where the source's layer l leaves it, which is what the conversion approximated."""
    terms = [
        (s.float() - t.float()).pow(2).mean() / t.float().pow(2).mean()
        for s, t in zip(student_hidden[1:], teacher_hidden[1:], strict=True)
    ]
    return sum(terms) / len(terms)


class DistillationTrainer(Trainer):
    """`Trainer` whose training loss is `loss` = kd, lm or their mean (kd+lm) against `teacher`, plus
    `hidden_weight` times the per-layer hidden-state term (`hidden_state_loss`) when it is > 0.

    The forward passes run under `compute_dtype` autocast in training (not through accelerate's
    mixed precision, which would also cast evaluation); evaluation returns the student's own LM
    loss in float32, so `exp(eval_loss)` is the reference protocol's perplexity on its windows.
    Every batch holds equal-length windows, so the per-batch mean that Trainer divides by the
    accumulation steps is the exact token mean (`loss_is_scaled_for_ga = False`).
    """

    loss_is_scaled_for_ga = False

    def __init__(
        self,
        *args,
        teacher: nn.Module,
        loss: str,
        temperature: float,
        compute_dtype: str,
        hidden_weight: float = 0.0,
        **kw,
    ):
        super().__init__(*args, **kw)
        self.hidden_weight = hidden_weight
        self.teacher = teacher.eval().requires_grad_(False).to(self.args.device)
        self.loss_kind = loss
        self.temperature = temperature
        self.compute_dtype = compute_dtype

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = inputs["input_ids"]
        if not model.training:
            out = model(input_ids=ids, labels=inputs["labels"], use_cache=False)
            return (out.loss, out) if return_outputs else out.loss
        hidden = self.hidden_weight > 0
        with autocast_forward(self.teacher, self.compute_dtype):
            out = model(input_ids=ids, use_cache=False, output_hidden_states=hidden)
            teacher_out = None
            if "kd" in self.loss_kind or hidden:
                with torch.no_grad():
                    teacher_out = self.teacher(input_ids=ids, use_cache=False, output_hidden_states=hidden)
            teacher_logits = teacher_out.logits if "kd" in self.loss_kind else None
            loss = distillation_loss(out.logits, teacher_logits, ids, self.loss_kind, self.temperature)
            if hidden:
                loss = loss + self.hidden_weight * hidden_state_loss(
                    out.hidden_states, teacher_out.hidden_states
                )
        return (loss, out) if return_outputs else loss
