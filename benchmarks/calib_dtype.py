"""Calibration on SmolLM2-135M with float32 and with bfloat16 forward passes: time and agreement.

Both runs measure the same windows of wiki.valid.tokens in this process (`collect_statistics`, the
pass `mlaify convert --calib-text` makes); the table gives each one's wall time, the speed-up and
how far the bfloat16 statistics lie from the float32 ones (relative Frobenius difference, worst
layer). Writes `calib_dtype.md` and `calib_dtype.json` into benchmarks/results/.

    python benchmarks/calib_dtype.py --windows 32
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MLAIFY_DATA", ROOT.parent / "shared" / "evaldata")) / "wikitext2"
RESULTS = ROOT / "benchmarks" / "results"
STATS = ("input_moment", "q_pair_norm", "k_pair_norm", "distance_mass")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=32, help="calibration windows of 512 tokens")
    args = parser.parse_args()

    from mlaify.convert.calibration import COMPUTE_DTYPES, CalibrationConfig, collect_statistics
    from mlaify.fetch import fetch_model
    from mlaify.loading import load_model, load_tokenizer

    os.environ.setdefault("MLAIFY_CACHE", str(ROOT / ".cache"))
    src = fetch_model("smollm2-135m")
    model, tokenizer = load_model(str(src)), load_tokenizer(str(src))
    text = DATA / "wiki.valid.tokens"
    collect_statistics(model, tokenizer, text, CalibrationConfig(num_sequences=1))  # warm-up
    seconds, stats = {}, {}
    for dtype in COMPUTE_DTYPES:
        start = time.perf_counter()
        stats[dtype] = collect_statistics(
            model, tokenizer, text, CalibrationConfig(num_sequences=args.windows, compute_dtype=dtype)
        )
        seconds[dtype] = round(time.perf_counter() - start, 2)
    difference = {
        name: max(
            float((a - b).norm() / b.norm())
            for a, b in zip(getattr(stats["bfloat16"], name), getattr(stats["float32"], name), strict=True)
        )
        for name in STATS
    }
    report = {
        "model": "SmolLM2-135M-Instruct",
        "windows": args.windows,
        "seq_len": 512,
        "seconds": seconds,
        "speedup": round(seconds["float32"] / seconds["bfloat16"], 2),
        "max_layer_relative_difference": difference,
        "torch_threads": torch.get_num_threads(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "calib_dtype.json").write_text(json.dumps(report, indent=2))
    lines = [
        f"# Calibration forward passes: float32 vs bfloat16 ({args.windows} x 512 tokens, SmolLM2-135M)",
        "",
        "| forward dtype | seconds |",
        "|---|---|",
        *(f"| {dtype} | {s} |" for dtype, s in seconds.items()),
        "",
        f"Speed-up: {report['speedup']}x on {report['torch_threads']} threads.",
        "",
        "| statistic | bfloat16 vs float32, relative difference (worst layer) |",
        "|---|---|",
        *(f"| {name} | {d:.2e} |" for name, d in difference.items()),
    ]
    (RESULTS / "calib_dtype.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
