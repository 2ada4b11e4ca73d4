"""`mlaify heal` (and `mlaify convert --heal-text`): argparse glue, one flag per `HealConfig` field.

The healed checkpoint is written atomically with `heal_log.json` and `heal_curve.png` beside the
weights; resumable checkpoints (`--save-every`) live in the sibling `OUT.checkpoints/` until the
run has finished and its output is saved.
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import fields
from functools import partial
from pathlib import Path

import torch

from ..card import write_model_card
from ..loading import TRUST_REMOTE_CODE_HELP
from .config import COMPUTE_DTYPES, DEVICES, SCHEDULES, TRAIN_SETS, HealConfig
from .report import write_heal_log

_DEFAULTS = HealConfig()


def add_heal_command(subparsers) -> None:
    p = subparsers.add_parser("heal", help="distil a converted model back toward its source")
    p.add_argument("mla_dir", help="converted (mlaify) model folder: the student")
    p.add_argument("out", help="output folder for the healed model (written atomically)")
    p.add_argument("--teacher", required=True, help="the source model the student was converted from")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)
    p.add_argument("--train-text", nargs="+", required=True, help="plain-text file(s) to train on")
    p.add_argument(
        "--tokens",
        type=int,
        default=_DEFAULTS.tokens,
        help="end-to-end training tokens (default %(default)s; 0: the block-wise stage only)",
    )
    p.add_argument(
        "--seq-len", type=int, default=_DEFAULTS.seq_len, help="tokens per window (default %(default)s)"
    )
    p.add_argument("--batch-size", type=int, default=_DEFAULTS.batch_size, help="windows per step and device")
    p.add_argument("--grad-accum", type=int, default=_DEFAULTS.grad_accum, help="batches per optimizer step")
    p.add_argument("--lr", type=float, default=_DEFAULTS.lr, help="peak learning rate (default %(default)s)")
    p.add_argument("--warmup", type=float, default=_DEFAULTS.warmup, help="warm-up fraction of the steps")
    p.add_argument("--schedule", default=_DEFAULTS.schedule, help="lr schedule: " + ", ".join(SCHEDULES))
    p.add_argument(
        "--train",
        default=_DEFAULTS.train,
        help="parameters that learn: " + ", ".join(TRAIN_SETS) + " (default %(default)s)",
    )
    p.add_argument(
        "--loss",
        default=_DEFAULTS.loss,
        help="kd (KL to the teacher), lm, or kd+lm (their mean; the default)",
    )
    p.add_argument("--temperature", type=float, default=_DEFAULTS.temperature, help="of the KL term")
    p.add_argument(
        "--hidden-weight",
        type=float,
        default=_DEFAULTS.hidden_weight,
        help="weight of a per-layer hidden-state term against the teacher's (default %(default)s: off)",
    )
    p.add_argument("--weight-decay", type=float, default=_DEFAULTS.weight_decay)
    p.add_argument("--eval-text", help="text to score (perplexity) while training, e.g. held-out prose")
    p.add_argument("--eval-every", type=int, default=0, help="tokens between evaluations (0: start and end)")
    p.add_argument(
        "--eval-windows", type=int, default=_DEFAULTS.eval_windows, help="eval windows (first ones)"
    )
    p.add_argument("--eval-seq-len", type=int, default=_DEFAULTS.eval_seq_len, help="tokens per eval window")
    p.add_argument("--save-every", type=int, default=0, help="tokens between resumable checkpoints (0: none)")
    p.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in OUT.checkpoints/"
    )
    p.add_argument("--seed", type=int, default=_DEFAULTS.seed)
    p.add_argument("--device", default=_DEFAULTS.device, help=", ".join(DEVICES) + " (default %(default)s)")
    p.add_argument(
        "--compute-dtype",
        default=_DEFAULTS.compute_dtype,
        help="autocast of the forward passes: " + ", ".join(COMPUTE_DTYPES) + " (default %(default)s)",
    )
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations: less memory")
    g = p.add_argument_group("block-wise stage (first: each attention toward the source layer's output)")
    g.add_argument("--blockwise-windows", type=int, default=0, help="training windows it reads (0: off)")
    g.add_argument(
        "--blockwise-epochs", type=int, default=_DEFAULTS.blockwise_epochs, help="passes per layer"
    )
    g.add_argument(
        "--blockwise-lr", type=float, default=_DEFAULTS.blockwise_lr, help="its Adam learning rate"
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_heal)


def add_chain_options(parser: argparse.ArgumentParser) -> None:
    """`convert --heal-text FILE --heal-tokens N`: heal the conversion, the source as teacher, then save."""
    g = parser.add_argument_group("healing (then distil the conversion toward the source)")
    g.add_argument("--heal-text", nargs="+", help="plain-text file(s) to heal on (`mlaify heal` defaults)")
    g.add_argument(
        "--heal-tokens", type=int, default=_DEFAULTS.tokens, help="healing tokens (default %(default)s)"
    )


def config_from_args(args: argparse.Namespace) -> HealConfig:
    """Every `HealConfig` field that has a flag of the same name (all but `eval_at`)."""
    return HealConfig(**{f.name: getattr(args, f.name) for f in fields(HealConfig) if hasattr(args, f.name)})


def checkpoint_dir(out: str | Path) -> Path:
    out = Path(out).resolve()
    return out.with_name(out.name + ".checkpoints")


def heal_and_save(
    student,
    teacher,
    tokenizer,
    out: str | Path,
    cfg: HealConfig,
    train_text,
    eval_text=None,
    resume: bool = False,
    overwrite: bool = False,
    dtype=None,
    card=None,
) -> Path:
    """Heal `student` in place, save it atomically (in `dtype`, default its own) with its log and
    curve, and the model card `card(folder)` writes, then drop the checkpoints."""
    from ..saving import save_atomic
    from .heal import heal

    ckpt = checkpoint_dir(out)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype or student.dtype
    heal(
        student,
        teacher,
        train_text,
        cfg,
        tokenizer=tokenizer,
        eval_texts=eval_text,
        checkpoint_dir=ckpt,
        resume=resume,
    )
    saved = save_atomic(
        student.to(dtype),
        out,
        tokenizer,
        overwrite=overwrite,
        extras=partial(_write_extras, heal_log=student.heal_log, card=card),
    )
    shutil.rmtree(ckpt, ignore_errors=True)
    return saved


def _write_extras(folder: Path, heal_log: dict, card) -> None:
    write_heal_log(folder, heal_log)
    if card is not None:  # last: the card reads the log
        card(folder)


def _heal(args: argparse.Namespace) -> int:
    from ..errors import MlaifyError
    from ..loading import load_config, load_model, load_tokenizer
    from ..saving import check_output
    from .data import text_paths

    cfg = config_from_args(args)
    check_output(args.out, args.overwrite)
    text_paths(args.train_text)
    if args.eval_text:
        text_paths(args.eval_text)
    stored = load_config(args.mla_dir)
    if stored.model_type != "mlaify":
        raise MlaifyError(f"{args.mla_dir} is not a converted model; convert it first with `mlaify convert`")
    student = load_model(args.mla_dir)
    teacher = load_model(args.teacher, trust_remote_code=args.trust_remote_code)
    try:
        tokenizer = load_tokenizer(args.mla_dir)
    except MlaifyError:
        tokenizer = load_tokenizer(args.teacher, args.trust_remote_code)
    out = heal_and_save(
        student,
        teacher,
        tokenizer,
        args.out,
        cfg,
        args.train_text,
        args.eval_text,
        args.resume,
        args.overwrite,
        stored.dtype,
        card=partial(write_model_card, source=args.teacher, command=args.argv, name=Path(args.out).name),
    )
    curve = [row for row in student.heal_log["history"] if "eval_perplexity" in row]
    for row in curve:
        print(f"tokens {row['tokens']:>10,}  eval perplexity {row['eval_perplexity']:.3f}")
    print(f"saved to {out}")
    return 0
