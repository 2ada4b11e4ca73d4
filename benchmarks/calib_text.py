"""Which calibration text generalises: SmolLM2-135M converted with each candidate, scored on
WikiText-2 test (the reference protocol) and on novels from neither calibration domain (LAMBADA).

Candidates: WikiText-2 validation (the protocol's own domain), the Gutenberg slice bundled with the
package (mlaify/data/, public domain), and the two concatenated (calibration draws its windows at
random, so about half from each). Every conversion is the CLI's calibrated default (`mlaify
convert --calib-text F`: 128 x 512 windows, refit on 64). LAMBADA's passages (BookCorpus novels,
the lm-eval task's test file) are joined by blank lines and read like the reference protocol:
the first windows of 2048 tokens, float32. Nothing here calibrates or trains on either eval text.

    python benchmarks/calib_text.py --budgets 96        # about 4 minutes per conversion on 2 cores

Writes `calib_text.md` and `calib_text.json` into benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from itertools import zip_longest
from pathlib import Path

from heal import CACHE, EVALDATA, RESULTS, lambada_text

from mlaify.convert.calibration import DEFAULT_CALIB_TEXT
from mlaify.eval.perplexity import perplexity_of_ids, tokenize_text
from mlaify.fetch import fetch_model
from mlaify.loading import load_model, load_tokenizer

WIKI_VALID = EVALDATA / "wikitext2" / "wiki.valid.tokens"
WORK = CACHE / "calib_text"


def _pieces(text: str, size: int = 7_500) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def candidates() -> dict[str, Path]:
    """Calibration text by name (the mixes are written once into the cache).

    "mix" is the two files one after the other: its windows are drawn from both, but the refit
    reads the first 64 chosen windows in text order, so it refits on the WikiText half only.
    "mix-interleaved" alternates 7,500-character pieces of the two, so the refit sees both too.
    """
    WORK.mkdir(parents=True, exist_ok=True)
    wiki, books = WIKI_VALID.read_text(encoding="utf-8"), DEFAULT_CALIB_TEXT.read_text(encoding="utf-8")
    mix, interleaved = WORK / "mix.txt", WORK / "mix_interleaved.txt"
    if not mix.is_file():
        mix.write_text(wiki + "\n\n" + books, encoding="utf-8")
    if not interleaved.is_file():
        pairs = zip_longest(_pieces(wiki), _pieces(books), fillvalue="")
        interleaved.write_text("\n\n".join(a + "\n\n" + b for a, b in pairs), encoding="utf-8")
    return {
        "wikitext2-valid": WIKI_VALID,
        "gutenberg (bundled)": DEFAULT_CALIB_TEXT,
        "mix": mix,
        "mix-interleaved": interleaved,
    }


def eval_texts() -> dict[str, Path]:
    """Perplexity text by name: WikiText-2 test, and LAMBADA's passages as one text file."""
    return {"wikitext2-test": EVALDATA / "wikitext2" / "wiki.test.raw", "lambada (novels)": lambada_text()}


def converted(src: Path, name: str, text: Path, budget: int) -> Path:
    out = WORK / f"{name.split()[0]}{budget}"
    if not (out / "config.json").is_file():
        cmd = [sys.executable, "-m", "mlaify.cli", "convert", str(src), str(out), "--kv-budget", str(budget)]
        subprocess.run([*cmd, "--calib-text", str(text)], check=True)
    return out


def render(data: dict) -> str:
    names = list(data["source"])
    lines = [
        "# Calibration text: SmolLM2-135M perplexity on text from inside and outside its domain",
        "",
        f"First {data['windows']} windows of 2048 tokens, float32. Source: "
        + ", ".join(f"{n} {p:.2f}" for n, p in data["source"].items())
        + ". Conversion: `mlaify convert --kv-budget B --calib-text F` (128 x 512 windows, refit on 64).",
        "",
        "| KV budget | calibration text | " + " | ".join(f"{n} (x source)" for n in names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for r in data["rows"]:
        cells = [f"{r['ppl'][n]:.2f} ({r['ppl'][n] / data['source'][n]:.2f}x)" for n in names]
        lines.append(f"| {r['budget']} | {r['calib']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="96")
    parser.add_argument("--only", help="comma-separated calibration texts to run (default: all)")
    parser.add_argument("--windows", type=int, default=32)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    src = fetch_model("smollm2-135m")
    tokenizer = load_tokenizer(src)
    ids = {n: tokenize_text(p, tokenizer) for n, p in eval_texts().items()}
    path = RESULTS / "calib_text.json"
    data = json.loads(path.read_text()) if path.is_file() else {"windows": args.windows, "rows": []}
    if data["windows"] != args.windows:
        raise SystemExit(f"{path} holds {data['windows']}-window figures; delete it to change --windows")

    def score(model) -> dict[str, float]:
        return {n: perplexity_of_ids(model, t, args.windows).perplexity for n, t in ids.items()}

    if "source" not in data:
        data["source"] = score(load_model(src))
    texts = candidates()
    chosen = args.only.split(",") if args.only else list(texts)
    for budget in (int(b) for b in args.budgets.split(",")):
        for name in chosen:
            if any(r["budget"] == budget and r["calib"] == name for r in data["rows"]):
                continue
            model = load_model(converted(src, name, texts[name], budget))
            data["rows"].append({"budget": budget, "calib": name, "ppl": score(model)})
            path.write_text(json.dumps(data, indent=2) + "\n")
            (RESULTS / "calib_text.md").write_text(render(data))
            print(render(data), flush=True)


if __name__ == "__main__":
    main()
