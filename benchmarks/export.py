"""The stock DeepSeek-V3 export of SmolLM2-135M conversions against the mlaify checkpoints they came from.

For each KV budget: the calibrated conversion (as `benchmarks/heal.py` makes it), its export
(`mlaify export`, loaded by transformers' own `DeepseekV3ForCausalLM`), and the reference perplexity
protocol (WikiText-2 test, 32 x 2048, float32; source 21.84) on both, the largest logit difference
on the first window, whether greedy generation (our latent cache against the stock cache) gives the
same 32 tokens, and the cache each holds.

    python benchmarks/export.py --budgets 192,96,48

Writes benchmarks/results/export.md and export.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from mlaify.eval.perplexity import perplexity_of_ids, tokenize_text
from mlaify.export import to_deepseek_v3
from mlaify.fetch import fetch_model
from mlaify.geometry import kv_geometry
from mlaify.loading import load_model, load_tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from heal import converted  # noqa: E402  (the same cached conversions)

ROOT = Path(__file__).resolve().parents[1]
EVALDATA = Path(os.environ.get("MLAIFY_DATA", ROOT.parent / "shared" / "evaldata"))
RESULTS = ROOT / "benchmarks" / "results"
PROMPT = "The history of the Roman Empire"


def render(rows: list[dict], windows: int) -> str:
    lines = [
        "# SmolLM2-135M: the DeepSeek-V3 export against the mlaify checkpoint",
        "",
        f"Perplexity: WikiText-2 test, first {windows} windows of 2048 tokens, float32 (the reference "
        "protocol at 32; source 21.84). Conversions: calibrated on WikiText-2 validation "
        "(`benchmarks/heal.py`'s). Export: `mlaify export`, loaded by transformers' `DeepseekV3ForCausalLM`.",
        "",
        "| KV budget | mlaify ppl | export ppl | ratio - 1 | max abs logit diff | greedy 32 tokens equal "
        "| cache values / token / layer (ours -> export) | rope table | export s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['budget']} | {r['mlaify_ppl']:.4f} | {r['export_ppl']:.4f} | "
            f"{r['export_ppl'] / r['mlaify_ppl'] - 1:+.2e} | {r['max_logit_diff']:.2e} | "
            f"{'yes' if r['same_tokens'] else 'no'} | {r['values_ours']:g} -> {r['values_export']:g} | "
            f"{r['rope_type']} ({r['rope_slots']} slots) | {r['export_s']:.1f} |"
        )
    lines += [
        "",
        "The export caches one value more per token and layer than ours (the constant latent slot that "
        "makes `kv_a_layernorm` exact), the largest layer's rank where ranks are adaptive, and as "
        "many rope slots as the union of the layers' rope frequencies needs (mlaify/export.py).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="96")
    parser.add_argument("--windows", type=int, default=32)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    src = fetch_model("smollm2-135m")
    tokenizer = load_tokenizer(src)
    ids = tokenize_text(EVALDATA / "wikitext2" / "wiki.test.raw", tokenizer)
    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
    rows = []
    for budget in (int(b) for b in args.budgets.split(",")):
        mla = load_model(converted(src, budget))
        start = time.perf_counter()
        exported = to_deepseek_v3(mla)
        export_s = time.perf_counter() - start
        with torch.inference_mode():
            window = ids[None, :2048]
            diff = float((mla(window).logits - exported(window).logits).abs().max())
            gen = [m.generate(prompt, max_new_tokens=32, do_sample=False) for m in (mla, exported)]
        ours, theirs = (perplexity_of_ids(m, ids, args.windows).perplexity for m in (mla, exported))
        layers = mla.config.text_config.num_hidden_layers
        rows.append(
            {
                "budget": budget,
                "mlaify_ppl": ours,
                "export_ppl": theirs,
                "max_logit_diff": diff,
                "same_tokens": bool(torch.equal(*gen)),
                "values_ours": kv_geometry(mla.config)["kv_values_per_token"] / layers,
                "values_export": kv_geometry(exported.config)["kv_values_per_token"] / layers,
                "rope_type": exported.config.rope_parameters["rope_type"],
                "rope_slots": exported.config.qk_rope_head_dim // 2,
                "export_s": export_s,
            }
        )
        log = json.dumps(rows[-1])
        logging.info("%s", log)
        (RESULTS / "export.json").write_text(json.dumps({"windows": args.windows, "rows": rows}, indent=2) + "\n")
        (RESULTS / "export.md").write_text(render(rows, args.windows))
    print(render(rows, args.windows))


if __name__ == "__main__":
    main()
