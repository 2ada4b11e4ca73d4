"""What each layer's conversion costs SmolLM2-135M, split into RoPE removal and low rank.

For every layer l, the source model with only layer l's attention replaced by (a) its MLA
conversion at full rank (only RoPE removal: the best preset's shared rope key, `rotate`, with every
latent component kept) and (b) its conversion at the KV budget (RoPE removal and low rank). The
increase in log perplexity over the source is that layer's cost; (b) - (a) is what low rank adds.
Perplexity: the first `--windows` windows of 2048 tokens of WikiText-2 test (not the 32-window
reference; this is a diagnostic). Writes `layer_costs.md` and `layer_costs.json`.

    python benchmarks/layer_costs.py --budget 96 --windows 1
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MLAIFY_DATA", ROOT.parent / "shared" / "evaldata")) / "wikitext2"
RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=96, help="KV values per token per layer")
    parser.add_argument("--windows", type=int, default=1)
    parser.add_argument(
        "--stats", type=Path, default=ROOT / ".cache" / "smollm2-135m-wikitext2-valid-stats.pt"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from mlaify import MLAConversionConfig, convert_to_mla
    from mlaify.convert.calibration import CalibrationConfig, load_or_collect
    from mlaify.convert.convert import check_convertible
    from mlaify.eval.perplexity import perplexity_of_ids, tokenize_text
    from mlaify.fetch import fetch_model
    from mlaify.loading import load_model, load_tokenizer

    src = fetch_model("smollm2-135m")
    source, tokenizer = load_model(str(src)), load_tokenizer(str(src))
    stats = load_or_collect(source, tokenizer, DATA / "wiki.valid.tokens", CalibrationConfig(), args.stats)
    ids = tokenize_text(DATA / "wiki.test.raw", tokenizer)

    def log_ppl(model) -> float:
        return perplexity_of_ids(model, ids, args.windows, progress=False).mean_nll

    cfg = MLAConversionConfig(kv_budget=args.budget)
    plan = check_convertible(source.config, cfg, calibrated=True)
    budget = convert_to_mla(source, cfg, stats)
    d_r = plan.qk_rope_head_dim
    full = MLAConversionConfig(kv_lora_rank=plan.max_rank, qk_rope_head_dim=d_r)
    rope_only = convert_to_mla(source, full, stats)
    base = log_ppl(source)
    whole = {"rope_only": log_ppl(rope_only), "budget": log_ppl(budget)}

    rows = []
    layers = source.model.layers
    for i, layer in enumerate(layers):
        original = layer.self_attn
        costs = {}
        for name, model in (("rope_only", rope_only), ("budget", budget)):
            layer.self_attn = model.model.layers[i].self_attn
            costs[name] = log_ppl(source) - base
        layer.self_attn = original
        rows.append({"layer": i, "kv_lora_rank": budget.config.layer_kv_lora_rank(i), **costs})
        print(f"layer {i:2d}: rope removal {costs['rope_only']:+.4f}, with low rank {costs['budget']:+.4f}")

    report = {
        "model": "SmolLM2-135M-Instruct",
        "budget": args.budget,
        "rope": f"{budget.config.n_rope_heads} x {d_r} (rotate)",
        "windows": args.windows,
        "source_ppl": math.exp(base),
        "all_layers_ppl": {k: math.exp(v) for k, v in whole.items()},
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "layer_costs.json").write_text(json.dumps(report, indent=2))
    lines = [
        f"# Per-layer cost of the conversion: SmolLM2-135M, budget {args.budget}, best preset",
        "",
        f"WikiText-2 test, first {args.windows} x 2048 tokens (diagnostic, not the reference protocol). "
        f"Source ppl {math.exp(base):.2f}; every layer converted: RoPE removal only (rope key "
        f"{report['rope']}, full rank) {report['all_layers_ppl']['rope_only']:.2f}, at the budget "
        f"{report['all_layers_ppl']['budget']:.2f}.",
        "",
        "Cost = increase of log perplexity when only that layer is converted.",
        "",
        "| layer | kv_lora_rank | RoPE removal | RoPE removal + low rank | low rank share |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        share = 1 - r["rope_only"] / r["budget"] if r["budget"] > 0 else float("nan")
        lines.append(
            f"| {r['layer']} | {r['kv_lora_rank']} | {r['rope_only']:+.4f} | {r['budget']:+.4f} "
            f"| {share:.0%} |"
        )
    total_r, total_b = sum(r["rope_only"] for r in rows), sum(r["budget"] for r in rows)
    lines.append(f"| sum | | {total_r:+.4f} | {total_b:+.4f} | {1 - total_r / total_b:.0%} |")
    (RESULTS / "layer_costs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
