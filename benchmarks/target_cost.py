"""What `--target deepseek_v3` costs on SmolLM2-135M, and which of its two constraints costs it.

The DeepSeek-V3 layout has one `kv_lora_rank` and one rope frequency set for every layer. At KV
budget 96 (calibrated on WikiText-2 validation, refit on 64 windows, the statistics of
`benchmarks/export.py`'s cache), three conversions: free rope frequencies with adaptive ranks (the
default), free frequencies with uniform ranks, and the target's shared frequencies with uniform
ranks; perplexity on the first 4 windows of WikiText-2 test (source 24.34 there).

    python benchmarks/target_cost.py

Writes benchmarks/results/target_cost.md and target_cost.json.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mlaify import MLAConversionConfig, convert_to_mla
from mlaify.convert.calibration import (
    CalibrationConfig,
    CalibrationStats,
    calibration_windows,
    collect_statistics,
)
from mlaify.eval.perplexity import perplexity_of_ids, tokenize_text
from mlaify.fetch import fetch_model
from mlaify.loading import load_model, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
EVALDATA = Path(os.environ.get("MLAIFY_DATA", ROOT.parent / "shared" / "evaldata"))
RESULTS = ROOT / "benchmarks" / "results"
CACHE = Path(os.environ.get("MLAIFY_CACHE", ROOT / ".cache"))
RUNS = {
    "free rope frequencies, adaptive ranks (default)": dict(),
    "free rope frequencies, uniform ranks": dict(rank_allocation="uniform"),
    "shared rope frequencies, uniform ranks (--target deepseek_v3)": dict(target="deepseek_v3"),
}


def main() -> None:
    src = fetch_model("smollm2-135m")
    tokenizer, model = load_tokenizer(src), load_model(src)
    text = EVALDATA / "wikitext2" / "wiki.valid.tokens"
    stats_file = CACHE / "export" / "stats_wiki.pt"
    stats = CalibrationStats.load(stats_file) if stats_file.is_file() else None
    stats = stats or collect_statistics(model, tokenizer, text, CalibrationConfig())
    windows = calibration_windows(tokenizer, text, CalibrationConfig())[:64]
    ids = tokenize_text(EVALDATA / "wikitext2" / "wiki.test.raw", tokenizer)
    rows = []
    for name, fields in RUNS.items():
        mla = convert_to_mla(model, MLAConversionConfig(kv_budget=96, **fields), stats, windows)
        rows.append(
            {"conversion": name, "ppl_4_windows": perplexity_of_ids(mla, ids, 4, progress=False).perplexity}
        )
        print(json.dumps(rows[-1]), flush=True)
    lines = [
        "# What one rank and one rope frequency set for all layers cost (SmolLM2-135M, KV budget 96)",
        "",
        "Perplexity on the first 4 windows of WikiText-2 test (source 24.34). Calibrated conversions "
        "(WikiText-2 validation, refit on 64 windows).",
        "",
        "| conversion | perplexity |",
        "|---|---|",
        *(f"| {r['conversion']} | {r['ppl_4_windows']:.2f} |" for r in rows),
    ]
    (RESULTS / "target_cost.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    (RESULTS / "target_cost.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
