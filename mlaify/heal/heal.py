"""`heal(student, teacher, texts, HealConfig)`: distil a converted model back toward its source.

The student (MLA) learns to match the teacher's (source's) next-token distribution on general text
(DESIGN.md section 6). Only the parameters of `config.train` learn; the geometry, and so the cache
(`c_kv` + `k_rope` per token), never changes. Progress is counted in training tokens, the budget
the issue's recovery curve is measured in.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedModel, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..devices import resolve_device
from ..errors import MlaifyError
from .blockwise import blockwise_distill
from .config import HealConfig
from .data import TextSource, eval_windows, training_windows
from .distill import DistillationTrainer

log = logging.getLogger(__name__)


def trainable_names(model: nn.Module, train: str) -> list[str]:
    """Names of the parameters that learn under `train` (attention, attention+norms or all)."""
    names = [name for name, _ in model.named_parameters()]
    if train == "all":
        return names
    keep = (".self_attn.",) if train == "attention" else (".self_attn.", "norm.")
    return [name for name in names if any(k in name for k in keep)]


def last_checkpoint(folder: str | Path) -> str | None:
    """The newest complete checkpoint in `folder`, or None. Trainer writes `trainer_state.json` last,
    so a checkpoint without it was cut off mid-write (a kill during a save) and cannot be resumed."""
    found = []
    for path in Path(folder).glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        step = path.name.removeprefix(f"{PREFIX_CHECKPOINT_DIR}-")
        if step.isdigit() and (path / "trainer_state.json").is_file():
            found.append((int(step), str(path)))
    return max(found)[1] if found else None


def select_trainable(model: nn.Module, train: str) -> int:
    """Freeze every parameter outside `train`; returns the number of trainable values."""
    chosen = set(trainable_names(model, train))
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class _Windows(Dataset):
    """Rows of a [N, S] id tensor as Trainer's causal-LM examples (labels are the ids: Trainer
    computes an eval loss only for examples with labels)."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class TokenSchedule(TrainerCallback):
    """Evaluate at token counts (every `eval_every` and each of `eval_at`), and show a progress bar
    in tokens with tokens/s, the loss and the ETA."""

    def __init__(
        self, tokens_per_step: int, evaluate: bool, eval_every: int, eval_at: tuple[int, ...], progress: bool
    ):
        self.tokens_per_step = tokens_per_step
        self.evaluate = evaluate
        self.eval_every = eval_every
        self.eval_steps = {math.ceil(t / tokens_per_step) for t in eval_at}
        self.progress = progress
        self.bar = None
        self.start = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.progress:
            self.bar = tqdm(
                total=state.max_steps * self.tokens_per_step,
                initial=state.global_step * self.tokens_per_step,
                unit="tok",
                unit_scale=True,
                desc="healing",
                dynamic_ncols=True,
            )

    def on_step_end(self, args, state, control, **kwargs):
        tokens = state.global_step * self.tokens_per_step
        every = (
            self.eval_every and tokens // self.eval_every > (tokens - self.tokens_per_step) // self.eval_every
        )
        at = every or state.global_step in self.eval_steps or state.global_step == state.max_steps
        control.should_evaluate = self.evaluate and bool(at)
        if self.bar is not None:
            self.bar.update(tokens - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs:
            shown = {k: logs[k] for k in ("loss", "eval_loss") if k in logs}
            if "eval_loss" in shown:
                shown["eval_ppl"] = math.exp(shown.pop("eval_loss"))
            if shown:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def training_log(history: list[dict], tokens_per_step: int) -> list[dict]:
    """Trainer's log history with the token count of each entry and the eval perplexity."""
    rows = []
    for entry in history:
        row = {**entry, "tokens": entry.get("step", 0) * tokens_per_step}
        if "eval_loss" in row:
            row["eval_perplexity"] = math.exp(row["eval_loss"])
        rows.append(row)
    return rows


def _check_pair(student: PreTrainedModel, teacher: PreTrainedModel) -> None:
    got, want = student.config.get_text_config().vocab_size, teacher.config.get_text_config().vocab_size
    if got != want:
        raise MlaifyError(
            f"the teacher's vocabulary ({want} tokens) is not the student's ({got}); "
            "pass the source model the student was converted from as --teacher"
        )


def heal(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    texts: TextSource,
    config: HealConfig | None = None,
    *,
    tokenizer=None,
    eval_texts: TextSource | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    callbacks: list[TrainerCallback] | None = None,
    progress: bool = True,
) -> PreTrainedModel:
    """Distil `student` toward `teacher` on `texts` (file path(s), or token ids [N, seq_len]) in place.

    With `config.blockwise_windows`, every attention is first distilled layer by layer (blockwise.py)
    on that many training windows; then end-to-end for `config.tokens` (0: none).
    `eval_texts` (one file, or ids) is scored at the start (after the block-wise stage), every
    `config.eval_every` tokens, at each of `config.eval_at` and at the end; the log is
    `student.heal_log` (its `history`: Trainer's log entries, each with its `tokens`). Checkpoints
    every `config.save_every` tokens go to `checkpoint_dir`, and `resume` continues from the last one
    there (optimizer, schedule, RNG and data position included).
    """
    cfg = config or HealConfig()
    _check_pair(student, teacher)
    train_ids = training_windows(texts, tokenizer, cfg.seq_len, cfg.seed)
    eval_ids = (
        None
        if eval_texts is None
        else eval_windows(eval_texts, tokenizer, cfg.eval_windows, cfg.eval_seq_len)
    )
    if (cfg.save_every or resume) and checkpoint_dir is None:
        raise MlaifyError("checkpoints (save_every, resume) need a checkpoint_dir")
    last = last_checkpoint(checkpoint_dir) if resume else None
    if resume and last is None:
        raise MlaifyError(f"no checkpoint to resume from in {checkpoint_dir}; run without --resume")

    student.float()  # master weights and optimizer state in float32; autocast lowers the forward only
    flags = {name: p.requires_grad for name, p in student.named_parameters()}
    trainable = select_trainable(student, cfg.train)
    with tempfile.TemporaryDirectory(prefix="mlaify-heal-") as scratch:
        args = TrainingArguments(
            output_dir=str(checkpoint_dir or scratch),
            per_device_train_batch_size=cfg.batch_size,
            per_device_eval_batch_size=1,
            gradient_accumulation_steps=cfg.grad_accum,
            learning_rate=cfg.lr,
            weight_decay=cfg.weight_decay,
            lr_scheduler_type=cfg.schedule,
            warmup_steps=cfg.warmup,
            seed=cfg.seed,
            data_seed=cfg.seed,
            use_cpu=resolve_device(cfg.device).type == "cpu",
            activation_checkpointing=cfg.gradient_checkpointing,
            activation_checkpointing_kwargs={"use_reentrant": False},
            eval_strategy="steps" if eval_ids is not None else "no",
            eval_on_start=eval_ids is not None and last is None,
            prediction_loss_only=True,
            save_strategy="steps" if cfg.save_every else "no",
            save_total_limit=1,
            logging_steps=1,
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            remove_unused_columns=False,
        )
        # Under accelerate every process reads its own batches: the budget counts all of them.
        tokens_per_step = cfg.tokens_per_step * args.world_size
        steps = cfg.tokens // tokens_per_step
        if steps == 0 and cfg.tokens:
            raise MlaifyError(
                f"--tokens {cfg.tokens} is less than one optimizer step of {tokens_per_step} tokens over "
                f"{args.world_size} processes; raise --tokens or lower --batch-size"
            )
        args.max_steps = max(steps, 1)  # 0 steps: block-wise only, Trainer only evaluates
        args.eval_steps = steps + 1  # a step Trainer never reaches: TokenSchedule decides
        args.save_steps = max(1, cfg.save_every // tokens_per_step)
        log.info(
            "healing %s: %d steps of %d tokens, %.1fM trainable parameters, loss %s",
            cfg.train,
            steps,
            tokens_per_step,
            trainable / 1e6,
            cfg.loss,
        )
        if steps * cfg.batch_size * cfg.grad_accum * args.world_size > len(train_ids):
            log.warning(
                "the training text holds %d windows: healing reads some of them again", len(train_ids)
            )
        schedule = TokenSchedule(tokens_per_step, eval_ids is not None, cfg.eval_every, cfg.eval_at, progress)
        trainer = DistillationTrainer(
            model=student,
            args=args,
            train_dataset=_Windows(train_ids),
            eval_dataset=None if eval_ids is None else _Windows(eval_ids),
            teacher=teacher,
            loss=cfg.loss,
            temperature=cfg.temperature,
            compute_dtype=cfg.compute_dtype,
            hidden_weight=cfg.hidden_weight,
            callbacks=[schedule, *(callbacks or [])],
        )
        trainer.remove_callback(ProgressCallback)
        trainer.remove_callback(PrinterCallback)
        first_step = int(Path(last).name.split("-")[-1]) if last else 0
        start = time.perf_counter()
        blockwise = None
        if cfg.blockwise_windows and last is None:  # a resumed run has had its block-wise stage
            student.to(args.device)
            blockwise = blockwise_distill(
                student,
                teacher,
                train_ids[: cfg.blockwise_windows],
                cfg.blockwise_epochs,
                cfg.blockwise_lr,
                cfg.batch_size,
                cfg.compute_dtype,
                cfg.seed,
                progress,
            )
        blockwise_s = time.perf_counter() - start
        if steps:
            trainer.train(resume_from_checkpoint=last)
        elif eval_ids is not None:
            trainer.evaluate()
        wall = time.perf_counter() - start
    if cfg.gradient_checkpointing:
        student.activation_checkpointing_disable()
    for name, param in student.named_parameters():  # as the caller had them
        param.requires_grad_(flags[name])
    student.eval()
    rows = training_log(trainer.state.log_history, tokens_per_step)
    eval_s = sum(row.get("eval_runtime", 0.0) for row in rows if row["step"] >= first_step)
    trained = (steps - first_step) * tokens_per_step
    student.heal_log = {
        "config": cfg.to_dict(),
        "trainable_parameters": trainable,
        "steps": steps,
        "tokens": steps * tokens_per_step,
        "blockwise_errors": blockwise,  # per layer (before, after), when that stage ran
        "wall_s": wall,  # of this call (a resumed run: since the resume)
        "eval_s": eval_s,
        "blockwise_s": blockwise_s,
        "train_tokens_per_s": trained / max(wall - eval_s - blockwise_s, 1e-9),
        "history": rows,
    }
    return student
