"""`mlaify eval` and `mlaify compare`: argparse glue, one flag per `EvalOptions` field.

`mlaify/cli.py` calls `add_eval_commands(subparsers)`; `convert --eval` calls `run_compare`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from .evaluate import EvalOptions
from .harness import DEFAULT_TASKS

log = logging.getLogger(__name__)


def add_eval_options(parser: argparse.ArgumentParser) -> None:
    """The protocol flags shared by `eval`, `compare` (and `convert --eval`)."""
    g = parser.add_argument_group("evaluation protocol")
    g.add_argument("--ppl-text", help="text file for perplexity (default: WikiText-2 test in the data dir)")
    g.add_argument(
        "--windows", type=int, default=32, help="perplexity windows; 0 skips perplexity (default 32)"
    )
    g.add_argument("--seq-len", type=int, default=2048, help="tokens per perplexity window (default 2048)")
    g.add_argument(
        "--tasks",
        default="",
        help=f"comma-separated lm-eval tasks, or 'all' for {','.join(DEFAULT_TASKS)} (default: none)",
    )
    g.add_argument("--limit", type=int, help="evaluate only the first N documents of each task")
    g.add_argument(
        "--data-dir", help="folder of local evaluation data (default: $MLAIFY_DATA, else the hub datasets)"
    )
    g.add_argument("--batch-size", type=int, default=1, help="lm-eval batch size (default 1)")
    add_device_option(parser)


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """`--device`, shared by eval, compare and convert (whose calibration passes it governs too)."""
    from ..devices import DEVICES

    parser.add_argument(
        "--device",
        default="auto",
        choices=DEVICES,
        help="where the forward passes run: auto (CUDA when visible, else the CPU), cpu or cuda",
    )


def options_from_args(args: argparse.Namespace) -> EvalOptions:
    return EvalOptions(
        ppl_text=args.ppl_text,
        windows=args.windows,
        seq_len=args.seq_len,
        tasks=args.tasks,
        limit=args.limit,
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        device=args.device,
    )


def add_eval_commands(subparsers) -> None:
    """Add the `eval` and `compare` subcommands to an argparse subparsers object."""
    from ..loading import TRUST_REMOTE_CODE_HELP

    p = subparsers.add_parser("eval", help="perplexity and lm-eval benchmarks of one model")
    p.add_argument("model", help="HF folder (source or converted), .gguf file or hub id")
    add_eval_options(p)
    p.add_argument("--json", dest="json_out", help="write the full result to this JSON file")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)
    p.set_defaults(func=_eval)

    p = subparsers.add_parser("compare", help="evaluate a source and its converted models side by side")
    p.add_argument("src", help="source model")
    p.add_argument("models", nargs="+", help="converted model folders")
    p.add_argument("--out", default="eval-report", help="report folder (default ./eval-report)")
    add_eval_options(p)
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)
    p.set_defaults(func=_compare)

    p = subparsers.add_parser("tasks", help="print the lm-eval --include_path of the offline task YAMLs")
    p.set_defaults(func=_tasks)


def _tasks(args: argparse.Namespace) -> int:
    from .tasks import LOCAL_DATA, TASKS_DIR

    print(TASKS_DIR)
    log.info(
        "tasks %s; e.g. MLAIFY_DATA=DIR lm_eval --model hf "
        "--model_args pretrained=OUT,trust_remote_code=True --include_path %s --tasks mlaify_piqa",
        ", ".join(f"mlaify_{t}" for t in LOCAL_DATA),
        TASKS_DIR,
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_model, write_json
    from .report import result_table

    result = evaluate_model(args.model, options_from_args(args), trust_remote_code=args.trust_remote_code)
    print(result_table(result), end="")
    if args.json_out:
        write_json(result, args.json_out)
        log.info("result written to %s", args.json_out)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .report import render_table

    report = run_compare(args.src, args.models, args, out_dir=args.out)
    print(render_table(report["rows"]), end="")
    return 0


def run_compare(
    src: str,
    models: list[str],
    args: argparse.Namespace | EvalOptions | None = None,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Compare `src` with `models` on the protocol of `args` (parsed eval flags or `EvalOptions`).

    `out_dir` defaults to `<first model>-eval` beside the first model. Returns the report dict.
    """
    from .report import compare

    options = args if isinstance(args, EvalOptions) else options_from_args(args) if args else EvalOptions()
    if out_dir is None:
        first = Path(models[0])
        out_dir = first.parent / f"{first.name}-eval"
    trust = bool(getattr(args, "trust_remote_code", False))
    return compare(src, list(models), out_dir, options, trust_remote_code=trust)
