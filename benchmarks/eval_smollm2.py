"""SmolLM2-135M source vs its MLA conversions: reference perplexity and zero-shot lm-eval accuracy.

Each KV reduction uses the default conversion (`convert_to_mla(src, MLAConversionConfig(kv_reduction=f))`).
Perplexity follows the reference protocol (32 x 2048 tokens of WikiText-2 test, float32; the source
scores 21.84); tasks read the local copies in the data dir and stop after `--limit` documents each.
Writes `eval_smollm2.json`, `eval_smollm2.md` and `eval_smollm2_ppl_vs_kv.png` into
benchmarks/results/, rewriting them after every model so an interrupted run keeps what it measured.

    python benchmarks/eval_smollm2.py                                        # about an hour on 2 cores
    python benchmarks/eval_smollm2.py --reductions 0.75 --windows 1 --limit 5 --prefix eval_smollm2_smoke
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import time
from pathlib import Path

import mlaify
from mlaify.eval import EvalOptions, evaluate_model, write_report
from mlaify.fetch import fetch_model
from mlaify.loading import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TASKS = "hellaswag,piqa,arc_easy,arc_challenge,winogrande,openbookqa,lambada_openai"

log = logging.getLogger("eval_smollm2")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reductions", default="0.5,0.75,0.875", help="KV reductions to convert at")
    p.add_argument("--limit", type=int, default=500, help="first N documents of each task")
    p.add_argument("--tasks", default=TASKS)
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--data-dir", default=os.environ.get("MLAIFY_DATA", str(ROOT.parent / "shared" / "evaldata"))
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--prefix", default="eval_smollm2", help="file name stem of the outputs")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    options = EvalOptions(
        windows=args.windows,
        seq_len=args.seq_len,
        tasks=args.tasks,
        limit=args.limit,
        data_dir=args.data_dir,
        batch_size=args.batch_size,
    )
    src = fetch_model("smollm2-135m")
    tokenizer = load_tokenizer(str(src))
    start = time.perf_counter()
    source = evaluate_model(src, options, tokenizer, name="smollm2-135m")
    results: list[dict] = []
    notes: list[str] = []
    write_report(source, results, args.out, prefix=args.prefix)
    for reduction in (float(f) for f in args.reductions.split(",")):
        t0 = time.perf_counter()
        try:
            model = mlaify.convert_to_mla(str(src), mlaify.MLAConversionConfig(kv_reduction=reduction))
        except mlaify.MlaifyError as err:  # e.g. a budget the default rope keys alone fill
            log.warning("KV reduction %g: conversion failed: %s", reduction, err)
            notes.append(f"KV reduction {reduction:g}: the default conversion failed: {err}")
            write_report(source, results, args.out, prefix=args.prefix, notes=notes)
            continue
        convert_s = time.perf_counter() - t0
        result = evaluate_model(model, options, tokenizer, name=f"smollm2-135m-mla-kv{reduction:g}")
        result["conversion"] = {
            "kv_reduction": reduction,
            "config": "default (weight-only)",
            "seconds": convert_s,
        }
        results.append(result)
        write_report(source, results, args.out, prefix=args.prefix, notes=notes)
        del model
        gc.collect()
    log.info("done in %.0f s: %s", time.perf_counter() - start, args.out / f"{args.prefix}.md")


if __name__ == "__main__":
    main()
