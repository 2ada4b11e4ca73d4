"""What a latent normalised per token would cost: SmolLM2-135M's default calibrated conversion at KV
budget 96 with `c_kv` replaced by `RMSNorm(c_kv)` (DeepSeek's `kv_a_layernorm`, its weight set to each
layer's mean latent RMS on calibration windows so the average scale is kept), against the same model
without it.

That is the layout vLLM's and SGLang's DeepSeek attention would need if the export's norm could not
be made linear (mlaify/export.py, section 1); this measures why it is not the way taken. Perplexity:
WikiText-2 test, first `--windows` windows of 2048 (float32); no refit after the norm.
Writes benchmarks/results/latent_norm.md and latent_norm.json.

    python benchmarks/latent_norm.py --windows 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from mlaify.eval.perplexity import perplexity_of_ids, tokenize_text
from mlaify.fetch import fetch_model
from mlaify.loading import load_model, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
EVALDATA = Path(os.environ.get("MLAIFY_DATA", ROOT.parent / "shared" / "evaldata"))
RESULTS = ROOT / "benchmarks" / "results"
CACHE = Path(os.environ.get("MLAIFY_CACHE", ROOT / ".cache"))


def converted(src: Path, budget: int) -> Path:
    """The default calibrated conversion at `budget` (benchmarks/heal.py's, shared through the cache)."""
    out = CACHE / "heal" / f"mla{budget}"
    if not (out / "config.json").is_file():
        cmd = [sys.executable, "-m", "mlaify.cli", "convert", str(src), str(out), "--kv-budget", str(budget)]
        subprocess.run([*cmd, "--calib-text", str(EVALDATA / "wikitext2" / "wiki.valid.tokens")], check=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=96)
    parser.add_argument("--windows", type=int, default=4)
    args = parser.parse_args()
    src = fetch_model("smollm2-135m")
    model, tokenizer = load_model(converted(src, args.budget)), load_tokenizer(str(src))
    test = tokenize_text(EVALDATA / "wikitext2" / "wiki.test.raw", tokenizer)
    calib = tokenize_text(EVALDATA / "wikitext2" / "wiki.valid.tokens", tokenizer)[: 4 * 512].view(4, 512)
    attns = [layer.self_attn for layer in model.model.layers]

    rms = {i: [] for i in range(len(attns))}  # each token's latent RMS, per layer

    def record(i):
        def hook(module, args, out):
            rms[i].append(out[..., : attns[i].kv_lora_rank].float().pow(2).mean(-1).sqrt().flatten())

        return hook

    handles = [a.kv_a_proj_with_mqa.register_forward_hook(record(i)) for i, a in enumerate(attns)]
    with torch.no_grad():
        model(calib)
    for handle in handles:
        handle.remove()
    rms = {i: torch.cat(v) for i, v in rms.items()}
    cv = [float(v.std() / v.mean()) for v in rms.values()]
    plain = perplexity_of_ids(model, test, args.windows).perplexity

    def normed(i):
        def hook(module, args, out):
            r = attns[i].kv_lora_rank
            c = out[..., :r]
            c = c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + 1e-6) * rms[i].mean()
            return torch.cat([c, out[..., r:]], dim=-1)

        return hook

    for i, a in enumerate(attns):
        a.kv_a_proj_with_mqa.register_forward_hook(normed(i))
    with_norm = perplexity_of_ids(model, test, args.windows).perplexity
    report = {
        "budget": args.budget,
        "windows": args.windows,
        "latent_rms_cv_by_layer": cv,
        "perplexity": plain,
        "perplexity_latent_normed": with_norm,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latent_norm.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# A per-token latent norm on SmolLM2-135M at KV budget {args.budget} (no refit)",
        "",
        f"Perplexity: WikiText-2 test, first {args.windows} windows of 2048, float32.",
        "",
        "| model | perplexity |",
        "|---|---|",
        f"| default calibrated conversion | {plain:.2f} |",
        f"| same, `c_kv` through RMSNorm (weight: the layer's mean latent RMS) | {with_norm:.2f} |",
        "",
        f"The latent's RMS varies across tokens (4 x 512 of WikiText-2 validation) with a coefficient of "
        f"variation of {min(cv):.2f} to {max(cv):.2f} over the {len(cv)} layers.",
    ]
    (RESULTS / "latent_norm.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
