"""Perplexity against KV budget on a real model (SmolLM2-135M, Gemma-3-270M) for every conversion
method worth showing.

Reference protocol (DESIGN.md section 4): WikiText-2 raw test read as one string, tokenized once,
windows `ids[i*2048:(i+1)*2048]` for i < 32, `exp(mean NLL)` in float32; SmolLM2 scores 21.84, and
the other models' source figure is measured in the same run. Calibration statistics come from
wiki.valid.tokens, measured once and reused for every row. Writes `quality.md`, `quality.json` and
`ppl_vs_kv.png` into benchmarks/results/ (`quality_gemma3.*` for Gemma-3-270M).

    python benchmarks/quality.py                     # the default table (about 2 hours on 2 cores)
    python benchmarks/quality.py --windows 4 --budgets 96 --rows attention/rotate/adaptive
    python benchmarks/quality.py --model gemma3-270m --rows attention/rotate/adaptive+refit+qfit

Rows already in `{name}.json` (same windows) are kept and not measured again; delete it to start over.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from mlaify.convert.queryfit import QUERY_FIT_SEQUENCES, QUERY_FIT_STEPS
from mlaify.convert.refit import REFIT_SEQUENCES

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MLAIFY_DATA", ROOT.parent / "shared" / "evaldata")) / "wikitext2"
RESULTS = ROOT / "benchmarks" / "results"
# Training-free figures published for SmolLM2-135M at budget 192 by the methods we compare against.
TRANSMLA_192 = 39.9


@dataclass(frozen=True)
class Model:
    title: str
    source_values: int  # KV values per token per layer of the source
    budgets: tuple[int, ...]  # -50 / -75 (/ -87.5) %
    name: str  # results file stem
    source_ppl: float | None = None  # the reference figure, where one is established; else measured


MODELS = {
    "smollm2-135m": Model("SmolLM2-135M-Instruct", 384, (192, 96, 48), "quality", 21.84),
    "gemma3-270m": Model("Gemma-3-270M", 512, (256, 128), "quality_gemma3"),
}

# lowrank / rope strategy / rank allocation [/ rope dim] [+refit [+qfit]]. "weight/high/uniform" is
# the weight-only path (MHA2MLA-style partial RoPE with a joint SVD, no training); the others read
# calibration statistics. Explored on 2-4 windows but not in this default table (each 32-window row
# costs about 4 minutes on 2 cores): activation/high, attention/norm, attention/rotate with other
# rope dims.
ROWS = (
    "weight/high/uniform",
    "attention/high/uniform",
    "attention/rotate/uniform",
    "attention/rotate/adaptive",
    "attention/rotate/adaptive+refit",
    "attention/rotate/adaptive+refit+qfit",
)

log = logging.getLogger("quality")


def parse_row(row: str) -> tuple[dict, bool, int]:
    """Conversion config fields of a row name, whether it refits (refit.py) and on how many windows
    it fits the queries first (`+qfit`, queryfit.py); `+keep` keeps the sliding-window layers'
    attention (`--keep-sliding`)."""
    methods, *extras = row.split("+")
    keep = "keep" in extras
    extras = [e for e in extras if e != "keep"]
    if not set(extras) <= {"refit", "qfit"} or extras == ["qfit"]:
        raise SystemExit(f"bad row suffixes in {row!r}: +refit, optionally followed by +qfit, and +keep")
    parts = methods.split("/")
    fields = dict(lowrank=parts[0], rope_strategy=parts[1], rank_allocation=parts[2])
    if keep:
        fields["keep_sliding"] = True
    if len(parts) > 3:
        fields["qk_rope_head_dim"] = int(parts[3])
    return fields, "refit" in extras, QUERY_FIT_SEQUENCES if "qfit" in extras else 0


def cli_conversion_cost(src: Path, budget: int) -> dict:
    """Wall time and peak RSS of `mlaify convert --calib-text ...` end to end, in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "mla"
        cmd = [sys.executable, "-m", "mlaify.cli", "convert", str(src), str(out), "--kv-budget", str(budget)]
        cmd += ["--calib-text", str(DATA / "wiki.valid.tokens"), "--preset", "best"]
        wrapper = "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
        wrapper += "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, check=True
        )
        seconds = time.perf_counter() - start
    return {
        "budget": budget,
        "seconds": round(seconds, 1),
        "peak_rss_mib": int(done.stdout.split()[-1]) // 1024,
    }


def plot(results: list[dict], path: Path, model: Model, source_ppl: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))

    def curve(r: dict) -> tuple:
        return r["row"], r["kv_balance"], r["forward_dtype"]

    for row, balance, forward in dict.fromkeys(map(curve, results)):
        points = sorted((r["kv_budget"], r["ppl"]) for r in results if curve(r) == (row, balance, forward))
        label = f"{row}, K/V balance {balance:g}" + (f", {forward}" if forward else "")
        ax.plot(*zip(*points, strict=True), marker="o", label=label)
    label = f"source ({model.source_values} values) {source_ppl:.2f}"
    ax.axhline(source_ppl, color="k", ls="--", lw=1, label=label)
    if model.name == "quality":
        label = f"TransMLA training-free {TRANSMLA_192}"
        ax.scatter([192], [TRANSMLA_192], marker="x", color="r", zorder=3, label=label)
    ax.set_xlabel("KV values per token per layer")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_yscale("log")
    ax.set_title(f"{model.title} converted to MLA, no training")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2-135m")
    parser.add_argument(
        "--windows", type=int, default=32, help="2048-token windows of the test set (32: reference)"
    )
    parser.add_argument(
        "--budgets", type=int, nargs="+", help="default: -50 / -75 (/ -87.5) %% of the source"
    )
    parser.add_argument(
        "--rows", nargs="+", default=ROWS, help="lowrank/rope/allocation[/rope dim][+refit[+qfit]]"
    )
    parser.add_argument("--stats", type=Path, help="default: .cache/{model}-wikitext2-valid-stats.pt")
    parser.add_argument("--name", help="output file stem in benchmarks/results (default: the model's)")
    parser.add_argument(
        "--no-cli-timing", action="store_true", help="keep the last end-to-end calibrated CLI timing"
    )
    args = parser.parse_args()
    model = MODELS[args.model]
    args.budgets = args.budgets or model.budgets
    args.name = args.name or model.name
    args.stats = args.stats or ROOT / ".cache" / f"{args.model}-wikitext2-valid-stats.pt"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(0)

    from mlaify import MLAConversionConfig, convert_to_mla
    from mlaify.convert.calibration import CalibrationConfig, calibration_windows, load_or_collect
    from mlaify.convert.config import NEEDS_CALIBRATION
    from mlaify.eval.perplexity import perplexity_of_ids, tokenize_text
    from mlaify.fetch import fetch_model
    from mlaify.geometry import kv_geometry
    from mlaify.loading import load_model, load_tokenizer

    os.environ.setdefault("MLAIFY_CACHE", str(ROOT / ".cache"))
    src = fetch_model(args.model)
    source, tokenizer = load_model(str(src)), load_tokenizer(str(src))
    args.stats.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    calib = CalibrationConfig()
    stats = load_or_collect(source, tokenizer, DATA / "wiki.valid.tokens", calib, args.stats)
    log.info("calibration statistics ready in %.1f s", time.perf_counter() - start)
    ids = tokenize_text(DATA / "wiki.test.raw", tokenizer)
    refit_windows = calibration_windows(tokenizer, DATA / "wiki.valid.tokens", calib)
    refit_windows = refit_windows[:REFIT_SEQUENCES]

    results, cli, source_ppl = previous_report(args.name, args.windows)
    if source_ppl is None and args.windows == 32:  # the reference figure, where one is established
        source_ppl = model.source_ppl
    if source_ppl is None:
        source_ppl = round(perplexity_of_ids(source, ids, args.windows).perplexity, 4)
        log.info("source: ppl %.4f (%d windows)", source_ppl, args.windows)
    report = partial(write_report, model=model, source_ppl=source_ppl, windows=args.windows, stats=stats)
    for row in args.rows:  # row-major: a cut run has whole curves
        for budget in args.budgets:
            fields, refit, query_fit = parse_row(row)
            try:
                cfg = MLAConversionConfig(kv_budget=budget, **fields)
                balance = cfg.resolve(calibrated=True).kv_balance
            except ValueError as err:  # a bad row name
                raise SystemExit(f"{row}: {err}") from None
            # Precision of the calibration and refit forward passes, where the row uses them.
            forward = calib.compute_dtype if NEEDS_CALIBRATION & {*fields.values()} or refit else None
            key = (row, budget, balance, forward)
            if any((r["row"], r["kv_budget"], r["kv_balance"], r["forward_dtype"]) == key for r in results):
                continue
            try:
                start = time.perf_counter()
                mla = convert_to_mla(
                    source,
                    cfg,
                    stats,
                    refit_windows if refit else None,
                    compute_dtype=calib.compute_dtype,
                    query_fit=query_fit,
                )
                seconds = time.perf_counter() - start
            except ValueError as err:  # e.g. the rope keys alone exceed the budget
                log.info("%s at %d: skipped (%s)", row, budget, err)
                continue
            ppl = perplexity_of_ids(mla, ids, args.windows).perplexity
            ranks = mla.config.kv_lora_rank
            ranks = ranks if isinstance(ranks, int) else [r for r in ranks if r]  # 0: a kept layer
            geometry = kv_geometry(mla.config)
            results.append(
                {
                    "row": row,
                    "kv_budget": budget,
                    "kv_balance": balance,
                    "forward_dtype": forward,
                    "ppl": round(ppl, 3),
                    "kv_lora_rank": ranks
                    if isinstance(ranks, int)
                    else f"{min(ranks)}-{max(ranks)} (mean {sum(ranks) / len(ranks):g})",
                    "rope": f"{mla.config.n_rope_heads} x {mla.config.qk_rope_head_dim}",
                    "values_per_token_per_layer": geometry["kv_values_per_token_per_layer"],
                    # the whole cache at 32k context against the source's (sliding layers hold their window)
                    "cache_32k_vs_source": round(
                        geometry["kv_bytes_at_32768"] / geometry["source_kv_bytes_at_32768"], 4
                    ),
                    "convert_seconds": round(seconds, 1),
                }
            )
            log.info(
                "%s at %d: ppl %.3f (%d windows), converted in %.1f s",
                row,
                budget,
                ppl,
                args.windows,
                seconds,
            )
            del mla
            report(results, cli, name=args.name)

    if not args.no_cli_timing:
        cli = [cli_conversion_cost(src, b) for b in args.budgets[:1]]
    print(report(results, cli, name=args.name))


def previous_report(name: str, windows: int) -> tuple[list[dict], list[dict], float | None]:
    """Rows, CLI timings and source figure an earlier run of the same table measured: a cut run
    continues where it stopped, and a run with --no-cli-timing keeps the last timing."""
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        return [], [], None
    report = json.loads(path.read_text())
    if report["windows"] != windows:
        return [], [], None
    return report["rows"], report["calibrated_cli_conversion"], report["source_ppl"]


def write_report(
    results: list[dict], cli: list[dict], *, model: Model, source_ppl: float, windows: int, stats, name: str
) -> str:
    """Write `{name}.json`, `{name}.md` and the plot; called after every row so a cut run keeps its rows."""
    report = {
        "model": model.title,
        "source_ppl": source_ppl,
        "source_kv_values_per_token_per_layer": model.source_values,
        "windows": windows,
        "calibration": {**stats.meta, "num_tokens": stats.num_tokens},
        "rows": results,
        "calibrated_cli_conversion": cli,
        "peak_rss_mib_this_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        "torch_threads": torch.get_num_threads(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2))
    lines = [
        f"# Perplexity vs KV budget: {model.title}, WikiText-2 test, {windows} windows of 2048",
        "",
        f"Source: {source_ppl:.2f} at {model.source_values} values/token/layer."
        + (f" TransMLA training-free at 192: {TRANSMLA_192}." if model.name == "quality" else ""),
        "",
        "| KV budget | lowrank / rope / allocation [+refit [+qfit]] | K/V balance | forward dtype "
        "| kv_lora_rank | rope heads x dim | values/token/layer | cache at 32k vs source | ppl | convert s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        forward = r["forward_dtype"] or "-"
        values, at_32k = r.get("values_per_token_per_layer", r["kv_budget"]), r.get("cache_32k_vs_source")
        lines.append(
            f"| {r['kv_budget']} | {r['row']} | {r['kv_balance']:g} | {forward} | {r['kv_lora_rank']} "
            f"| {r['rope']} | {values} | {'-' if at_32k is None else f'{at_32k:.1%}'} "
            f"| {r['ppl']:.2f} "
            f"| {r['convert_seconds']} |"
        )
    lines += [
        "",
        f"`+refit`: step 3 (refit.py), per-head W_UV and o_proj refit on the first {REFIT_SEQUENCES} "
        f"calibration windows; `+qfit`: first the queries are fit to the source's attention "
        f"probabilities (queryfit.py) on the first {QUERY_FIT_SEQUENCES} of them, {QUERY_FIT_STEPS} L-BFGS "
        "steps per layer. `+keep`: the sliding-window layers keep the source's attention "
        "(`--keep-sliding`) and the budget applies to the other layers; `values/token/layer` is then "
        "the mean over all layers, and `cache at 32k` counts each sliding layer's window. "
        "`convert s`: the conversion from cached calibration statistics, the refit "
        "included; calibrating takes under a minute more (bfloat16 forward passes; 2 minutes in float32).",
    ]
    for c in cli:
        lines += [
            "",
            f"`mlaify convert --calib-text wiki.valid.tokens --preset best --kv-budget {c['budget']}`, "
            f"end to end (load, calibrate, convert, refit on {REFIT_SEQUENCES} windows, save): "
            f"{c['seconds']} s, peak RSS {c['peak_rss_mib']} MiB.",
        ]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    if results:
        path = RESULTS / ("ppl_vs_kv.png" if name == "quality" else f"{name}_ppl_vs_kv.png")
        plot(results, path, model, source_ppl)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
