"""Decode speed, prefill time, KV bytes and peak RSS: SmolLM2-135M against its MLA conversions.

Every row is greedy decoding in float32 on CPU with transformers' own DynamicCache for the source
and the latent cache (LatentCacheLayer, swapped in by MLAAttention) for MLA. Per (context, batch,
model): one timed prefill of `context - new_tokens` random tokens (so the last decoded token sits
at `context`: 8192 stays within SmolLM2's max_position_embeddings), a short warm-up decode, then
`--runs` decodes of `new_tokens` tokens, each cropping the cache back to the prompt; tokens/s is
the median. Models are saved once and loaded one at a time, so peak RSS (VmHWM, reset before each
measurement) holds one model. Budget 48 keeps 8 rotary dims per rope head (16 leaves no latent).
Writes `decode.md` and `decode.json` into benchmarks/results/.

    python benchmarks/decode.py                                   # the full table (15-25 min on 2 cores)
    python benchmarks/decode.py --contexts 512 --batches 1 --budgets 96 --runs 2 --ppl-windows 0
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import re
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from mlaify import MLAConversionConfig, convert_to_mla
from mlaify.fetch import fetch_model
from mlaify.modeling.cache_mlaify import Int8LatentCache, LatentCacheLayer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WIKI = (
    Path(os.environ.get("MLAIFY_DATA", ROOT.parent / "shared" / "evaldata")) / "wikitext2" / "wiki.test.raw"
)

log = logging.getLogger("decode")


def conversion(budget: int) -> MLAConversionConfig:
    # 3 rope heads x 16 dims would fill a budget of 48: keep 8 per head there.
    return MLAConversionConfig(kv_budget=budget, qk_rope_head_dim=8 if budget <= 48 else None)


def _kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def reset_peak_rss() -> None:
    """Start VmHWM again from the current RSS (Linux: writing 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def cache_bytes(cache) -> tuple[int, int]:
    """(bytes of cached tokens, bytes allocated), summed over the cache's tensors."""
    used = alloc = 0
    for layer in cache.layers:
        if isinstance(layer, LatentCacheLayer):
            u, a = layer.nbytes()
        else:  # a stock DynamicLayer holds exactly its tokens
            u = a = layer.keys.nbytes + layer.values.nbytes
        used, alloc = used + u, alloc + a
    return used, alloc


def weight_bytes(model) -> int:
    """Parameters read per decode step (a tied embedding counts once: lm_head reads it whole)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


@torch.inference_mode()
def measure(model, make_cache, batch: int, prompt_len: int, new_tokens: int, runs: int) -> dict:
    ids = torch.randint(
        0, model.config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(0)
    )
    model(ids[:, :32])  # warm-up: thread pool and allocator, so the first row is not penalised
    gc.collect()
    reset_peak_rss()
    cache = make_cache()
    start = time.perf_counter()
    first = model(ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)  # [B, 1]
    prefill = time.perf_counter() - start

    def decode(steps: int) -> tuple[float, tuple[int, int]]:
        """Seconds for `steps` one-token forwards, and the cache bytes at the end; then crop back."""
        token = first
        start = time.perf_counter()
        for _ in range(steps):
            token = model(token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        elapsed = time.perf_counter() - start
        held = cache_bytes(cache)
        cache.crop(-steps)
        return elapsed, held

    decode(min(8, new_tokens))  # warm-up
    timed = [decode(new_tokens) for _ in range(runs)]
    used, alloc = timed[-1][1]
    return dict(
        prefill_s=prefill,
        decode_tok_s=statistics.median(batch * new_tokens / t for t, _ in timed),
        decode_runs_s=[t for t, _ in timed],
        kv_bytes=used,
        kv_bytes_allocated=alloc,
        peak_rss_bytes=_kib("VmHWM") * 1024,
    )


@torch.inference_mode()
def perplexity(model, ids: torch.Tensor, windows: int, make_cache=None, length: int = 2048) -> float:
    """The reference protocol on `windows` windows; with `make_cache`, each window runs through a
    fresh cache in one call, so every attention read (all keys, all values) goes through it."""
    total = 0.0
    for i in range(windows):
        w = ids[i * length : (i + 1) * length][None]
        extra = dict(cache=make_cache(), use_cache=True) if make_cache else {}
        total += float(model(input_ids=w, labels=w, **extra).loss) * (length - 1)
    return math.exp(total / (windows * (length - 1)))


def prepare(folder: Path, budgets: list[int]) -> dict[str, Path]:
    """Source path and the MLA conversions saved under `folder`, by row name."""
    source = fetch_model("smollm2-135m")
    paths = {"source": source}
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    for budget in budgets:
        log.info("converting at KV budget %d", budget)
        paths[f"mla-{budget}"] = folder / f"mla-{budget}"
        convert_to_mla(model, conversion(budget)).save_pretrained(paths[f"mla-{budget}"])
    # Every dim rotary at full rank: the source's function exactly, so int8 alone moves its perplexity.
    paths["mla-exact"] = folder / "mla-exact"
    exact = MLAConversionConfig(rope_strategy="all", kv_lora_rank=192)
    convert_to_mla(model, exact).save_pretrained(paths["mla-exact"])
    return paths


def rows_to_run(budgets: list[int], int8_budget: int) -> list[tuple[str, str, type]]:
    """(row name, saved model, cache class)."""
    rows = [("source", "source", DynamicCache)] + [(f"mla-{b}", f"mla-{b}", DynamicCache) for b in budgets]
    if int8_budget:
        rows.append((f"mla-{int8_budget}-int8", f"mla-{int8_budget}", Int8LatentCache))
    return rows


def ppl_rows(budgets: list[int], int8_budget: int) -> list[tuple[str, str, type]]:
    """The speed rows, plus the int8 cache at every budget (perplexity is cheap next to decoding)."""
    rows = rows_to_run(budgets, 0) + [("mla-exact", "mla-exact", None)]
    if int8_budget:
        rows.append(("mla-exact-int8", "mla-exact", Int8LatentCache))
        rows += [
            (f"mla-{b}-int8", f"mla-{b}", Int8LatentCache)
            for b in sorted({*budgets, int8_budget}, reverse=True)
        ]
    return rows


def table(results: list[dict]) -> str:
    head = (
        "| context | batch | model | prefill s | x src | decode tok/s | x src | KV MiB held (alloc) | x src "
        "| peak RSS MiB | x src | MiB read/step | bound x |\n"
    )
    lines = [head + "|" + "---|" * 13]
    src = {(r["context"], r["batch"]): r for r in results if r["model"] == "source"}
    mib = 2**20
    for r in results:
        s = src.get((r["context"], r["batch"]))

        def ratio(key: str, invert: bool = False, r: dict = r, s: dict | None = s) -> str:
            if s is None:
                return "-"
            return f"{(s[key] / r[key] if invert else r[key] / s[key]):.2f}"

        lines.append(
            f"| {r['context']} | {r['batch']} | {r['model']} | {r['prefill_s']:.2f} | {ratio('prefill_s')} "
            f"| {r['decode_tok_s']:.1f} | {ratio('decode_tok_s')} "
            f"| {r['kv_bytes'] / mib:.1f} ({r['kv_bytes_allocated'] / mib:.1f}) | {ratio('kv_bytes')} "
            f"| {r['peak_rss_bytes'] / mib:.0f} | {ratio('peak_rss_bytes')} "
            f"| {r['bytes_per_step'] / mib:.0f} | {ratio('bytes_per_step', invert=True)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--budgets", type=int, nargs="+", default=[192, 96, 48])
    parser.add_argument("--int8-budget", type=int, default=96, help="budget of the int8-cache row; 0: none")
    parser.add_argument("--runs", type=int, default=3, help="timed decodes per row (median)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--ppl-windows", type=int, default=4, help="WikiText-2 windows for the int8 check; 0: skip"
    )
    parser.add_argument("--name", default="decode", help="output file stem in benchmarks/results/")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("MLAIFY_CACHE", str(ROOT / ".cache"))
    torch.set_grad_enabled(False)
    budgets = sorted(set(args.budgets + ([args.int8_budget] if args.int8_budget else [])), reverse=True)

    results, perplexities = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = prepare(Path(tmp), budgets)
        rows = rows_to_run(args.budgets, args.int8_budget)
        for context in args.contexts:
            for batch in args.batches:
                for name, saved, cache_class in rows:
                    model = AutoModelForCausalLM.from_pretrained(paths[saved], dtype=torch.float32).eval()
                    make_cache = (
                        cache_class
                        if cache_class is Int8LatentCache
                        else partial(DynamicCache, config=model.config)
                    )
                    r = measure(
                        model, make_cache, batch, context - args.new_tokens, args.new_tokens, args.runs
                    )
                    r.update(model=name, context=context, batch=batch, weight_bytes=weight_bytes(model))
                    r["bytes_per_step"] = r["weight_bytes"] + r["kv_bytes"]
                    results.append(r)
                    log.info("%s", {k: v for k, v in r.items() if k != "decode_runs_s"})
                    del model
                    gc.collect()
        if args.ppl_windows:
            ids = AutoTokenizer.from_pretrained(paths["source"])(
                WIKI.read_text(), return_tensors="pt"
            ).input_ids[0]
            for name, saved, cache_class in ppl_rows(args.budgets, args.int8_budget):
                model = AutoModelForCausalLM.from_pretrained(paths[saved], dtype=torch.float32).eval()
                cache = Int8LatentCache if cache_class is Int8LatentCache else None
                perplexities[name] = perplexity(model, ids, args.ppl_windows, cache)
                log.info("perplexity %s: %.3f", name, perplexities[name])

    text = table(results)
    if perplexities:
        text += (
            f"\n\nWikiText-2 perplexity, {args.ppl_windows} windows of 2048 (the first windows of the "
            "reference protocol; weight-only conversions, which is why the truncated ones are far off; "
            "the int8 rows show the cost of the int8 cache): "
            + ", ".join(f"{name} {ppl:.2f}" for name, ppl in perplexities.items())
        )
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), args=vars(args))
    (RESULTS / f"{args.name}.json").write_text(
        json.dumps(dict(meta=meta, rows=results, perplexity=perplexities), indent=1)
    )
    (RESULTS / f"{args.name}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
