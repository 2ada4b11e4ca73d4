"""The SmolLM2-135M calibrated conversion (`mlaify convert --calib-text wiki.valid.tokens`, refit on
64 windows) on each device, timed, with the reference perplexity of each result (issue 14 item 3: the
GPU gives the CPU's figure to 0.5%).

Each device runs the CLI in a subprocess, as a user would (`--device cpu`, `--device cuda`); every
result is then scored on the same device by the reference protocol (WikiText-2 test, 32 x 2048,
float32). Writes `device.md` and `device.json` into benchmarks/results/.

    python benchmarks/device.py --devices cpu,cuda --budget 96
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MLAIFY_DATA", ROOT.parent / "shared" / "evaldata")) / "wikitext2"
RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="cpu,cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budget", type=int, default=96)
    parser.add_argument("--windows", type=int, default=32, help="perplexity windows of 2048 tokens")
    args = parser.parse_args()

    from mlaify.eval.perplexity import perplexity_of_ids, tokenize_text
    from mlaify.fetch import fetch_model
    from mlaify.loading import load_model, load_tokenizer

    os.environ.setdefault("MLAIFY_CACHE", str(ROOT / ".cache"))
    src = fetch_model("smollm2-135m")
    ids = tokenize_text(DATA / "wiki.test.raw", load_tokenizer(str(src)))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for device in args.devices.split(","):
            out = Path(tmp) / device
            cmd = [sys.executable, "-m", "mlaify.cli", "convert", str(src), str(out)]
            cmd += ["--kv-budget", str(args.budget), "--calib-text", str(DATA / "wiki.valid.tokens")]
            start = time.perf_counter()
            subprocess.run([*cmd, "--device", device], check=True)
            seconds = time.perf_counter() - start
            model = load_model(str(out), device=device)
            ppl = perplexity_of_ids(model, ids, args.windows).perplexity
            rows.append({"device": device, "convert_s": round(seconds, 1), "perplexity": ppl})
            print(rows[-1], flush=True)
    first = rows[0]
    for row in rows:
        row["time_vs_first"] = round(row["convert_s"] / first["convert_s"], 3)
        row["ppl_vs_first"] = row["perplexity"] / first["perplexity"] - 1
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    report = {"budget": args.budget, "windows": args.windows, "gpu": gpu, "cpu_threads": os.cpu_count()}
    report["rows"] = rows
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "device.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# SmolLM2-135M calibrated conversion at KV budget {args.budget} on each device",
        "",
        f"GPU: {gpu or 'none visible'}; {os.cpu_count()} CPU threads. Perplexity: WikiText-2 test, "
        f"{args.windows} x 2048, float32, scored on the conversion's device.",
        "",
        f"| device | convert s | time / {first['device']} | perplexity | vs {first['device']} |",
        "|---|---|---|---|---|",
        *(
            f"| {r['device']} | {r['convert_s']} | {r['time_vs_first']}x | {r['perplexity']:.3f} "
            f"| {r['ppl_vs_first']:+.3%} |"
            for r in rows
        ),
    ]
    (RESULTS / "device.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
