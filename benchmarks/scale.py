"""Streamed conversion of an 8B-class checkpoint on this machine: peak memory, time, size.

Writes (once, into the cache) a synthetic checkpoint with Llama-3-8B's exact geometry (32 layers,
d 4096, 32 query / 8 KV heads of 128, MLP 14336, vocabulary 128256, llama3 RoPE scaling; random
bfloat16 weights from a fixed seed, 5 GB shards, 16 GB), then runs `mlaify convert SRC OUT
--no-calib --kv-budget B` in a subprocess for each budget, which reports its own peak RSS. The
conversion's cost depends on the shapes only, so random weights measure it exactly. `--calibrated`
runs the calibrated path instead (statistics, adaptive ranks, refit) on a few windows of the bundled
text, tokenized by SmolLM2's tokenizer (its 49,152 ids lie inside the vocabulary).

    python benchmarks/scale.py                        # Llama-3-8B geometry, budgets 1024 and 576
    python benchmarks/scale.py --calibrated --budgets 576
    python benchmarks/scale.py --geometry small       # the CI test's 1 GB geometry

Writes benchmarks/results/scale.md and scale.json (with the extrapolation to Llama-3-70B).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from mlaify.fetch import fetch_model
from mlaify.loading import load_tokenizer
from mlaify.synthetic import LLAMA3_8B, SMALL_1GB, write_synthetic_checkpoint

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CACHE = Path(os.environ.get("MLAIFY_CACHE", ROOT / ".cache"))
GEOMETRIES = {"llama3-8b": (LLAMA3_8B, 5 << 30), "small": (SMALL_1GB, 256 << 20)}
# Llama-3-70B, for the extrapolation: 80 layers, d 8192, MLP 28672, 64 query / 8 KV heads of 128.
LLAMA3_70B = dict(
    LLAMA3_8B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64
)

WEIGHT_ONLY = ["--no-calib"]
# A few windows: the cost per layer is what is measured, not the quality of random weights.
CALIBRATED = ["--calib-sequences", "8", "--calib-length", "512", "--refit-sequences", "8"]

PEAK = r"""
import re, sys, time
from mlaify.cli import main
start = time.perf_counter()
code = main(sys.argv[1:])
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork and exec
hwm = re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)
print("RESULT", hwm, time.perf_counter() - start)
sys.exit(code)
"""


def layer_bytes(g: dict, bytes_per_value: int = 2) -> int:
    d, h = g["hidden_size"], g["head_dim"]
    attention = d * h * (2 * g["num_attention_heads"] + 2 * g["num_key_value_heads"])
    return (attention + 3 * d * g["intermediate_size"] + 2 * d) * bytes_per_value


def checkpoint_bytes(g: dict) -> int:
    return g["num_hidden_layers"] * layer_bytes(g) + 2 * 2 * g["vocab_size"] * g["hidden_size"]


def render(data: dict) -> str:
    g = data["geometry"]
    lines = [
        f"# Streamed conversion of a {data['name']} checkpoint on this machine",
        "",
        f"Synthetic checkpoint with the exact geometry ({g['num_hidden_layers']} layers, "
        f"d {g['hidden_size']}, {g['num_attention_heads']} query / {g['num_key_value_heads']} KV heads "
        f"of {g['head_dim']}, MLP {g['intermediate_size']}, vocabulary {g['vocab_size']}), random "
        f"bfloat16 weights, {data['source_bytes'] / 1e9:.2f} GB in {data['source_shards']} shards "
        f"(written in {data['write_s']:.0f} s). `mlaify convert SRC OUT --kv-budget B` and the flags "
        f"below, in a subprocess; machine: {os.cpu_count()} cores.",
        "",
        "| conversion | KV budget | values / token / layer (source) | peak RSS GiB "
        "| weight-only bound GiB (25% + 1 GiB) | wall s | s / layer | output GB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    bound = f"{(0.25 * data['source_bytes'] + 2**30) / 2**30:.2f}"  # issue 14's, for the weight-only path
    for r in data["rows"]:
        lines.append(
            f"| `{' '.join(r.get('flags', WEIGHT_ONLY))}` | {r['budget']} "
            f"| {2 * g['num_key_value_heads'] * g['head_dim']} | {r['peak_rss'] / 2**30:.2f} "
            f"| {bound if r.get('flags', WEIGHT_ONLY) == WEIGHT_ONLY else '-'} | {r['wall_s']:.0f} "
            f"| {r['wall_s'] / g['num_hidden_layers']:.1f} | {r['output_bytes'] / 1e9:.2f} |"
        )
    x = data.get("extrapolation_70b")
    lines += (
        []
        if x is None
        else [
            "",
            "Extrapolation to Llama-3-70B (arithmetic, not a run): its layer holds "
            f"{x['layer_ratio']:.2f}x the bytes of this one and it has {x['layers']} layers, so a streamed "
            f"conversion reads and writes {x['checkpoint_gb']:.0f} GB in about {x['wall_s'] / 60:.0f} min "
            f"at the {x['s_per_layer_here']:.1f} s per layer measured here (scaled by bytes; the "
            "factorisation grows as d^2 per layer but stays a small share). Peak memory: the peak "
            "measured here less this model's largest buffers, plus the 70B's "
            f"({x['peak_gib']:.1f} GiB: a shard buffer of {x['shard_gib']:.1f} GiB, the 2.1 GB embedding, "
            "one layer's attention in float64).",
            "",
            "The calibrated path streams the same way (statistics, conversion, refit and query fit a layer "
            "at a time, tests/test_stream.py) and holds in addition the statistics (L d^2 float64: "
            f"{g['num_hidden_layers'] * g['hidden_size'] ** 2 * 8 / 1e9:.1f} GB "
            "for this geometry), one source layer in float32, the windows' hidden states and the refit's "
            "normal equations (H r x H r in float64).",
        ]
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--geometry", choices=GEOMETRIES, default="llama3-8b")
    parser.add_argument("--budgets", default="1024,576")
    parser.add_argument("--keep", action="store_true", help="keep the converted folders")
    parser.add_argument(
        "--calibrated", action="store_true", help=f"the calibrated path ({' '.join(CALIBRATED)})"
    )
    args = parser.parse_args()
    geometry, shard = GEOMETRIES[args.geometry]
    src = CACHE / "scale" / args.geometry
    if not (src / "config.json").is_file():
        shutil.rmtree(src, ignore_errors=True)
        start = time.perf_counter()
        write_synthetic_checkpoint(src, geometry, shard_bytes=shard)
        (src / "written_s.txt").write_text(f"{time.perf_counter() - start:.1f}\n")  # kept for reruns
    if not (src / "tokenizer.json").is_file():
        load_tokenizer(str(fetch_model("smollm2-135m"))).save_pretrained(src)
    write_s = float((src / "written_s.txt").read_text())
    name = "scale" if args.geometry == "llama3-8b" else f"scale_{args.geometry}"
    stored = RESULTS / f"{name}.json"
    flags = CALIBRATED if args.calibrated else WEIGHT_ONLY
    files = sorted(src.glob("*.safetensors"))
    data = {
        "name": args.geometry,
        "geometry": geometry,
        "source_bytes": sum(f.stat().st_size for f in files),
        "source_shards": len(files),
        "write_s": write_s,
        # rows of the other conversion kind (or budgets) measured before are kept
        "rows": json.loads(stored.read_text())["rows"] if stored.is_file() else [],
    }
    for budget in (int(b) for b in args.budgets.split(",")):
        out = CACHE / "scale" / f"{args.geometry}-mla{budget}"
        shutil.rmtree(out, ignore_errors=True)
        argv = ["convert", str(src), str(out), "--kv-budget", str(budget), *flags]
        done = subprocess.run([sys.executable, "-c", PEAK, *argv], capture_output=True, text=True, check=True)
        peak_kb, wall = done.stdout.split("RESULT")[-1].split()
        row = {
            "flags": flags,
            "budget": budget,
            "peak_rss": int(peak_kb) * 1024,
            "wall_s": float(wall),
            "output_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
        }
        data["rows"] = [
            r for r in data["rows"] if (r["budget"], r.get("flags", WEIGHT_ONLY)) != (budget, flags)
        ] + [row]
        print(json.dumps(row))
        if not args.keep:
            shutil.rmtree(out)
    weight_only = [r for r in data["rows"] if r.get("flags", WEIGHT_ONLY) == WEIGHT_ONLY]
    if weight_only:  # the extrapolation reads the weight-only path
        data["extrapolation_70b"] = extrapolate(data, geometry, weight_only)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(render(data))
    print(render(data))


def extrapolate(data: dict, geometry: dict, rows: list[dict]) -> dict:
    """Llama-3-70B's time and peak memory from this geometry's weight-only rows, by arithmetic."""
    here = rows[-1]
    per_layer = here["wall_s"] / geometry["num_hidden_layers"]
    ratio = layer_bytes(LLAMA3_70B) / layer_bytes(geometry)
    shard_now = 2 * min(max(data["source_bytes"] // 16, 64 << 20), 1 << 30)  # held twice
    size_70b = checkpoint_bytes(LLAMA3_70B)
    shard_70b = 2 * min(max(size_70b // 16, 64 << 20), 1 << 30)
    embed_now = 2 * geometry["vocab_size"] * geometry["hidden_size"]
    embed_70b = 2 * LLAMA3_70B["vocab_size"] * LLAMA3_70B["hidden_size"]
    attention_70b = 8 * LLAMA3_70B["hidden_size"] ** 2 * 2  # q and o in float64, the largest pieces
    attention_now = 8 * geometry["hidden_size"] ** 2 * 2
    peak = max(r["peak_rss"] for r in rows)
    return {
        "layers": LLAMA3_70B["num_hidden_layers"],
        "layer_ratio": ratio,
        "checkpoint_gb": size_70b / 1e9,
        "s_per_layer_here": per_layer,
        "wall_s": per_layer * ratio * LLAMA3_70B["num_hidden_layers"],
        "shard_gib": shard_70b / 2**30,
        "peak_gib": (peak - shard_now - embed_now - attention_now + shard_70b + embed_70b + attention_70b)
        / 2**30,
    }


if __name__ == "__main__":
    main()
