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


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    input_ids: torch.Tensor,
    kind: str,
    temperature: float = 1.0,
) -> torch.Tensor:
    """kd (`T^2 KL(p_teacher^T || p_student^T)`, mean over tokens), lm (next-token cross entropy,
    mean over the B x (S - 1) predicted tokens) or their mean, from logits [B, S, V], in float32.

    One student log-softmax serves both terms (at T = 1): over a 49k vocabulary each pass over the
    [B, S, V] logits costs about as much as a decoder layer.
    """
    t = temperature
    log_p = F.log_softmax(student_logits.float(), dim=-1) if "lm" in kind or t == 1 else None
    terms = []
    if "kd" in kind:
        log_p_s = log_p if t == 1 else F.log_softmax(student_logits.float() / t, dim=-1)
        log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
        kl = F.kl_div(log_p_s.flatten(0, 1), log_p_t.flatten(0, 1), log_target=True, reduction="batchmean")
        terms.append(kl * t * t)
    if "lm" in kind:
        # The last position has no next token: ignored, not sliced off (a slice's backward would
        # write a zero-filled copy of the whole [B, S, V] gradient).
        targets = F.pad(input_ids[:, 1:], (0, 1), value=-100)
        terms.append(F.nll_loss(log_p.flatten(0, 1), targets.flatten(), ignore_index=-100))
    return sum(terms) / len(terms)


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
