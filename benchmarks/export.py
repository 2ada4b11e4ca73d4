"""The stock DeepSeek-V3 export of SmolLM2-135M conversions against the mlaify checkpoints they came from.

For each KV budget and target: the calibrated conversion (`mlaify convert --calib-text
wiki.valid.tokens`, as `benchmarks/heal.py` makes it) with `--target mlaify` (every layer its own
rope frequencies and rank) or `--target deepseek_v3` (one set and one rank for all layers), and at
`--vllm-budgets` with `--target vllm` (256 + 64 and one plain RoPE table: the one vLLM geometry below
SmolLM2's 384 values); its export (`mlaify export`, loaded by transformers' own
`DeepseekV3ForCausalLM`), and on both the reference perplexity protocol (WikiText-2 test, 32 x 2048,
float32; source 21.84), the largest logit difference on the first window, whether greedy generation
(our latent cache against the stock cache) gives the same 32 tokens, the cache each holds, and
whether vLLM's and SGLang's DeepSeek attention could serve the export (`export.vllm_obstacles`).

    python benchmarks/export.py --budgets 192,96,48 --q-lora-ranks 576,384,288 --vllm-budgets 320

`--q-lora-ranks` adds rows for the `--target deepseek_v3` exports with query compression
(`mlaify export --q-lora-rank Q`: fewer parameters, the same cache; exact at 576, the hidden size).

Writes benchmarks/results/export.md and export.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from mlaify.eval.perplexity import perplexity_of_ids, tokenize_text
from mlaify.export import to_deepseek_v3, vllm_obstacles
from mlaify.fetch import fetch_model
from mlaify.geometry import kv_geometry
from mlaify.loading import load_model, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
EVALDATA = Path(os.environ.get("MLAIFY_DATA", ROOT.parent / "shared" / "evaldata"))
RESULTS = ROOT / "benchmarks" / "results"
CACHE = Path(os.environ.get("MLAIFY_CACHE", ROOT / ".cache"))
PROMPT = "The history of the Roman Empire"
TARGETS = ("mlaify", "deepseek_v3")  # at every budget; `vllm` at --vllm-budgets


def converted(src: Path, budget: int, target: str) -> Path:
    """The calibrated CLI conversion at `budget` for `target`, made once into the cache (the
    calibration statistics are shared by every budget and target)."""
    out = CACHE / "export" / f"mla{budget}-{target}"
    if not (out / "config.json").is_file():
        cmd = [sys.executable, "-m", "mlaify.cli", "convert", str(src), str(out), "--kv-budget", str(budget)]
        cmd += ["--calib-text", str(EVALDATA / "wikitext2" / "wiki.valid.tokens"), "--target", target]
        cmd += ["--calib-stats", str(CACHE / "export" / "stats_wiki.pt")]
        subprocess.run(cmd, check=True)
    return out


def render(rows: list[dict], windows: int) -> str:
    lines = [
        "# SmolLM2-135M: the DeepSeek-V3 export against the mlaify checkpoint",
        "",
        f"Perplexity: WikiText-2 test, first {windows} windows of 2048 tokens, float32 (the reference "
        "protocol at 32; source 21.84). Conversions: calibrated on WikiText-2 validation "
        "(`benchmarks/heal.py`'s). Export: `mlaify export`, loaded by transformers' `DeepseekV3ForCausalLM`.",
        "",
        "| KV budget | target | q_lora_rank | parameters | mlaify ppl | export ppl | ratio - 1 "
        "| max abs logit diff | greedy 32 tokens equal | cache values / token / layer (ours -> export) "
        "| rope table | vLLM / SGLang | export s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['budget']} | {r['target']} | {r['q_lora_rank'] or '-'} | {r['parameters'] / 1e6:.1f}M "
            f"| {r['mlaify_ppl']:.4f} | {r['export_ppl']:.4f} | "
            f"{r['export_ppl'] / r['mlaify_ppl'] - 1:+.2e} | {r['max_logit_diff']:.2e} | "
            f"{'yes' if r['same_tokens'] else 'no'} | {r['values_ours']:g} -> {r['values_export']:g} | "
            f"{r['rope_type']} ({r['rope_slots']} slots) | {'serve' if not r['vllm_obstacles'] else 'no'} "
            f"| {r['export_s']:.1f} |"
        )
    lines += [
        "",
        "With `--target mlaify` the export caches the largest layer's rank where ranks are adaptive, and "
        "as many rope slots as the union of the layers' rope frequencies needs (mlaify/export.py); the "
        "latent norm is made linear with no extra value. `--target deepseek_v3` converts so that the "
        "export holds exactly the budget; its mlaify ppl column is the quality cost of one frequency set "
        "and one rank for all layers. `--target vllm` adds a kernel geometry and a plain RoPE table "
        "(vLLM / SGLang `serve`: their DeepSeek attention reads this export's layout; not run here).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="96")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--q-lora-ranks", default="", help="query-compression rows (deepseek_v3 target)")
    parser.add_argument("--vllm-budgets", default="320", help="budgets of the --target vllm rows")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    src = fetch_model("smollm2-135m")
    tokenizer = load_tokenizer(src)
    ids = tokenize_text(EVALDATA / "wikitext2" / "wiki.test.raw", tokenizer)
    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
    path = RESULTS / "export.json"
    earlier = json.loads(path.read_text()) if path.is_file() else {"windows": args.windows, "rows": []}
    # Earlier runs' rows are kept where they were scored on as many windows; else the table restarts.
    rows = earlier["rows"] if earlier["windows"] == args.windows else []
    if earlier["rows"] and not rows:
        logging.info(
            "export.json was scored on %s windows, not %s: its rows are replaced",
            earlier["windows"],
            args.windows,
        )
    q_ranks = [int(q) for q in args.q_lora_ranks.split(",") if q]
    budgets = [int(b) for b in args.budgets.split(",") if b]
    runs = [(b, t, None) for b in budgets for t in TARGETS]
    runs += [(b, "deepseek_v3", q) for b in budgets for q in q_ranks]
    runs += [(int(b), "vllm", None) for b in args.vllm_budgets.split(",") if b]
    ours = {}  # (budget, target) -> the mlaify checkpoint's perplexity, measured once
    for budget, target, q_lora_rank in runs:
        mla = load_model(converted(src, budget, target))
        start = time.perf_counter()
        exported = to_deepseek_v3(mla, q_lora_rank)
        export_s = time.perf_counter() - start
        with torch.inference_mode():
            window = ids[None, :2048]
            diff = float((mla(window).logits - exported(window).logits).abs().max())
            gen = [m.generate(prompt, max_new_tokens=32, do_sample=False) for m in (mla, exported)]
        if (budget, target) not in ours:
            ours[budget, target] = perplexity_of_ids(mla, ids, args.windows).perplexity
        theirs = perplexity_of_ids(exported, ids, args.windows).perplexity
        layers = mla.config.text_config.num_hidden_layers
        rows[:] = [
            r for r in rows if (r["budget"], r["target"], r["q_lora_rank"]) != (budget, target, q_lora_rank)
        ]
        rows.append(
            {
                "budget": budget,
                "target": target,
                "q_lora_rank": q_lora_rank,
                "parameters": exported.num_parameters(),
                "mlaify_ppl": ours[budget, target],
                "export_ppl": theirs,
                "max_logit_diff": diff,
                "same_tokens": bool(torch.equal(*gen)),
                "values_ours": kv_geometry(mla.config)["kv_values_per_token"] / layers,
                "values_export": kv_geometry(exported.config)["kv_values_per_token"] / layers,
                "rope_type": exported.config.rope_parameters["rope_type"],
                "rope_slots": exported.config.qk_rope_head_dim // 2,
                "vllm_obstacles": vllm_obstacles(exported.config),
                "export_s": export_s,
            }
        )
        log = json.dumps(rows[-1])
        logging.info("%s", log)
        data = {"windows": args.windows, "rows": rows}
        path.write_text(json.dumps(data, indent=2) + "\n")
        (RESULTS / "export.md").write_text(render(rows, args.windows))
    print(render(rows, args.windows))


if __name__ == "__main__":
    main()
