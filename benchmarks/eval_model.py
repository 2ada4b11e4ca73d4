"""A real model (SmolLM2-135M, Gemma-3-270M) vs its MLA conversions: reference perplexity and zero-shot
lm-eval accuracy.

Each KV reduction is converted with the default method (weight-only SVD: `convert_to_mla(src,
MLAConversionConfig(kv_reduction=f))`) and, with `--methods default,best`, also with the calibrated
best preset (statistics of 128 x 512 tokens of wiki.valid.tokens, measured once and reused, and
the refit on the first 64 of those windows, as `mlaify convert --calib-text` does).
Perplexity follows the reference protocol (32 x 2048 tokens of WikiText-2 test, float32; SmolLM2
scores 21.84); tasks read the local copies in the data dir and stop after `--limit` documents each.
Writes `eval_{model}.json`, `.md` and `_ppl_vs_kv.png` (`eval_smollm2.*`, `eval_gemma3.*`) into
benchmarks/results/, rewriting them after every model so an interrupted run keeps what it measured.

    python benchmarks/eval_model.py                                          # about an hour on 2 cores
    python benchmarks/eval_model.py --model gemma3-270m --methods best --reductions 0.5,0.75
    python benchmarks/eval_model.py --reductions 0.75 --windows 1 --limit 5 --prefix eval_smollm2_smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import time
from pathlib import Path

import mlaify
from mlaify.convert.calibration import CalibrationConfig, calibration_windows, load_or_collect
from mlaify.convert.refit import REFIT_SEQUENCES
from mlaify.eval import EvalOptions, evaluate_model, write_report
from mlaify.fetch import fetch_model
from mlaify.loading import load_model, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TASKS = "hellaswag,piqa,arc_easy,arc_challenge,winogrande,openbookqa,lambada_openai"

PREFIXES = {"smollm2-135m": "eval_smollm2", "gemma3-270m": "eval_gemma3"}

log = logging.getLogger("eval_model")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(PREFIXES), default="smollm2-135m")
    p.add_argument("--reductions", default="0.5,0.75,0.875", help="KV reductions to convert at")
    p.add_argument(
        "--methods", default="default", help="comma list of: default (weight-only), best (calibrated preset)"
    )
    p.add_argument("--limit", type=int, default=500, help="first N documents of each task")
    p.add_argument("--tasks", default=TASKS)
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--data-dir", default=os.environ.get("MLAIFY_DATA", str(ROOT.parent / "shared" / "evaldata"))
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--reuse", help="JSON of an earlier run: keep its source and rows, measure the rest")
    p.add_argument(
        "--prefix", help="file name stem of the outputs (default: eval_ and the model's short name)"
    )
    args = p.parse_args()
    args.prefix = args.prefix or PREFIXES[args.model]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    options = EvalOptions(
        windows=args.windows,
        seq_len=args.seq_len,
        tasks=args.tasks,
        limit=args.limit,
        data_dir=args.data_dir,
        batch_size=args.batch_size,
    )
    src = fetch_model(args.model)
    tokenizer = load_tokenizer(str(src))
    start = time.perf_counter()
    results: list[dict] = []
    notes: list[str] = []
    if args.reuse:  # rows measured by another run (same protocol) are kept, not measured again
        previous = json.loads(Path(args.reuse).read_text())
        source, results, notes = previous["source"], previous["models"], previous["notes"]
    else:
        source = evaluate_model(src, options, tokenizer, name=args.model)
    write_report(source, results, args.out, prefix=args.prefix)
    methods = args.methods.split(",")
    calibration = None  # (statistics, refit windows) of the best preset
    if "best" in methods:
        model = load_model(str(src))
        text = Path(args.data_dir) / "wikitext2" / "wiki.valid.tokens"
        stats_file = (
            Path(os.environ.get("MLAIFY_CACHE", ROOT / ".cache")) / f"{args.model}-wikitext2-valid-stats.pt"
        )
        stats = load_or_collect(model, tokenizer, text, CalibrationConfig(), stats_file)
        windows = calibration_windows(tokenizer, text, CalibrationConfig())[:REFIT_SEQUENCES]
        calibration = stats, windows
        del model
    for method in methods:
        for reduction in (float(f) for f in args.reductions.split(",")):
            if any(r["model"] == row_name(args.model, method, reduction) for r in results):
                continue
            result = convert_and_evaluate(
                src, args.model, method, reduction, calibration, options, tokenizer, notes
            )
            if result is not None:
                results.append(result)
            write_report(source, results, args.out, prefix=args.prefix, notes=notes)
            gc.collect()
    log.info("done in %.0f s: %s", time.perf_counter() - start, args.out / f"{args.prefix}.md")


def row_name(model: str, method: str, reduction: float) -> str:
    return f"{model}-mla-kv{reduction:g}" + ("" if method == "default" else f"-{method}")


def convert_and_evaluate(
    src, model_name, method, reduction, calibration, options, tokenizer, notes
) -> dict | None:
    """One row: convert `src` at `reduction` with `method` (default or best) and evaluate it."""
    t0 = time.perf_counter()
    cfg = mlaify.MLAConversionConfig(kv_reduction=reduction)
    try:
        model = mlaify.convert_to_mla(str(src), cfg, *(calibration if method == "best" else ()))
    except mlaify.MlaifyError as err:
        log.warning("KV reduction %g (%s): conversion failed: %s", reduction, method, err)
        notes.append(f"KV reduction {reduction:g}, {method} method: the conversion failed: {err}")
        return None
    convert_s = time.perf_counter() - t0
    result = evaluate_model(model, options, tokenizer, name=row_name(model_name, method, reduction))
    result["conversion"] = {
        "kv_reduction": reduction,
        "config": "default (weight-only)" if method == "default" else "best preset (calibrated, refit)",
        "seconds": convert_s,
    }
    return result


if __name__ == "__main__":
    main()
