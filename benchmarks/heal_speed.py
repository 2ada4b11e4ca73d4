"""Healing throughput of SmolLM2-135M at -75% (or `--budget`): training tokens/s by forward precision,
parameter set, activation checkpointing and loss implementation (or, with `--batch-sizes`, by windows
per step), all in one run; the ratio column is against the first row. The `plain` row computes the
same loss with plain autograd ops (kd_loss.py), as healing did before the fused loss.

    python benchmarks/heal_speed.py            # about 5 minutes on 2 cores
    python benchmarks/heal_speed.py --steps 3 --name heal_speed_epyc   # another machine, kept beside
    python benchmarks/heal_speed.py --batch-sizes 8 2 4 --budget 192 --name heal_speed_batch  # by batch

Each row heals the default calibrated conversion (benchmarks/heal.py) for `--steps` optimizer steps of
8 (or `--batch-sizes`) x 512 tokens of the training text and reports the tokens/s of the steps after the
first (warm-up). Writes `{name}.md` and `{name}.json` (default heal_speed) into benchmarks/results/, with
the CPU they were measured on: the same code has run up to 8x slower on one of this project's machines
than on another (heal_speed.md against heal_speed_epyc.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import torch
from heal import MODELS, RESULTS, TRAIN, converted
from kd_loss import plain_loss
from transformers import TrainerCallback

from mlaify.fetch import fetch_model
from mlaify.heal import HealConfig, distill, heal
from mlaify.heal.data import training_windows
from mlaify.loading import load_model, load_tokenizer

# compute dtype, parameter set, activation checkpointing, loss implementation, windows per step
BATCH = HealConfig.batch_size
ROWS = (
    ("float32", "attention", False, "fused", BATCH),
    ("bfloat16", "attention", False, "fused", BATCH),
    ("bfloat16", "attention", False, "plain", BATCH),
    ("bfloat16", "all", False, "fused", BATCH),
    ("bfloat16", "attention", True, "fused", BATCH),
)


def cpu_model() -> str:
    """The CPU's model name (Linux), else what `platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


class StepClock(TrainerCallback):
    """Wall time of every optimizer step."""

    def __init__(self):
        self.times = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--budget", type=int, default=96)
    parser.add_argument("--name", default="heal_speed", help="results file stem")
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", help="instead of ROWS: the default row at these batch sizes"
    )
    args = parser.parse_args()
    rows_run = (
        [("bfloat16", "attention", False, "fused", b) for b in args.batch_sizes] if args.batch_sizes else ROWS
    )
    logging.basicConfig(level=logging.WARNING)
    src = fetch_model("smollm2-135m")
    tokenizer, teacher = load_tokenizer(src), load_model(src)
    windows = training_windows(TRAIN[1], tokenizer, 512)  # the Wikipedia file: quick to tokenize
    rows = []
    fused = distill.distillation_loss
    for dtype, train, checkpointing, loss, batch in rows_run:
        # The plain row swaps the loss that DistillationTrainer calls (kd+lm at T = 1, the default).
        distill.distillation_loss = (
            fused if loss == "fused" else lambda s, t, ids, kind, temp: plain_loss(s, t, ids)
        )
        cfg = HealConfig(
            tokens=args.steps * batch * 512,
            batch_size=batch,
            compute_dtype=dtype,
            train=train,
            gradient_checkpointing=checkpointing,
        )
        clock = StepClock()
        heal(
            load_model(converted(src, args.budget, MODELS["smollm2-135m"])),
            teacher,
            windows,
            cfg,
            callbacks=[clock],
            progress=False,
        )
        seconds = sum(clock.times[1:]) / (len(clock.times) - 1)
        rows.append(
            {
                "compute_dtype": dtype,
                "train": train,
                "activation_checkpointing": checkpointing,
                "loss": loss,
                "batch_size": batch,
                "step_s": seconds,
                "tokens_per_s": cfg.tokens_per_step / seconds,
            }
        )
        print(rows[-1], flush=True)
    base = rows[0]["tokens_per_s"]
    machine = f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    lines = [
        f"# Healing throughput: SmolLM2-135M at KV budget {args.budget}, windows of 512 tokens, loss kd+lm",
        "",
        f"Machine: {machine}; {args.steps} steps per row, the first one left out.",
        "",
        "| forward | trains | activation checkpointing | loss | windows / step | s / step | tokens/s "
        "| vs first row |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['compute_dtype']} | {r['train']} | {'yes' if r['activation_checkpointing'] else 'no'} "
            f"| {r['loss']} | {r['batch_size']} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} "
            f"| {r['tokens_per_s'] / base:.2f}x |"
        )
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    data = {"machine": machine, "steps": args.steps, "rows": rows}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(data, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
