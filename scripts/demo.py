"""`make demo`: fetch SmolLM2-135M, convert it to MLA with a 75% smaller KV cache, show before/after.
`make demo-heal` (`--heal-tokens N`) also heals the conversion on N tokens and shows it beside both.

The conversion is `mlaify convert --calib-text wiki.valid.tokens` (128 x 512 tokens of WikiText-2
validation, the best preset, the refit on 64 of those windows: the figures the README quotes);
healing is `mlaify heal` with its defaults on the training text of `../shared/traindata/` (nothing
from WikiText-2). Then one
`mlaify compare` table (reference perplexity: WikiText-2 test, 32 x 2048 tokens; piqa and arc_easy
on their first DEMO_LIMIT documents) and a short greedy generation from each model.
"""

import argparse
import logging
import os
from pathlib import Path

import torch

from mlaify.cli import main as mlaify
from mlaify.fetch import fetch_model
from mlaify.loading import load_model, load_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared"
DATA = Path(os.environ.get("MLAIFY_DATA", SHARED / "evaldata"))
TRAIN = [
    SHARED / "traindata" / "gutenberg_train.txt",
    SHARED / "traindata" / "wikipedia_vital_summaries_en.txt",
]
OUT = Path(os.environ.get("MLAIFY_CACHE", ".cache")) / "demo" / "smollm2-135m-mla75"
DEMO_LIMIT = 200
PROMPTS = ["The history of the Roman Empire", "What is the capital of France?"]


def generate(model, tokenizer, prompt: str) -> str:
    """Greedy continuation: a raw-text prompt as is, a question through the chat template."""
    if prompt.endswith("?"):
        chat = [{"role": "user", "content": prompt}]
        inputs = tokenizer.apply_chat_template(
            chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=32, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heal-tokens", type=int, default=0, help="also heal on this many tokens")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    src = fetch_model("smollm2-135m")
    convert = ["convert", str(src), str(OUT), "--kv-reduction", "0.75", "--overwrite"]
    assert mlaify([*convert, "--calib-text", str(DATA / "wikitext2" / "wiki.valid.tokens")]) == 0
    models = [("source", src), ("MLA, 75% smaller KV cache", OUT)]
    if args.heal_tokens:
        healed = OUT.with_name(f"{OUT.name}-healed")
        heal = ["heal", str(OUT), str(healed), "--teacher", str(src), "--train-text", *map(str, TRAIN)]
        assert mlaify([*heal, "--tokens", str(args.heal_tokens), "--overwrite"]) == 0
        models.append((f"MLA, 75% smaller KV cache, healed on {args.heal_tokens:,} tokens", healed))
    compare = [
        "compare",
        str(src),
        *(str(path) for _, path in models[1:]),
        "--out",
        str(OUT.parent / "report"),
    ]
    compare += ["--data-dir", str(DATA), "--tasks", "piqa,arc_easy", "--limit", str(DEMO_LIMIT)]
    assert mlaify([*compare, "--batch-size", "8"]) == 0
    tokenizer = load_tokenizer(src)
    for name, path in models:
        model = load_model(path)
        print(f"\n== {name}: {path}")
        for prompt in PROMPTS:
            print(f"> {prompt}\n{generate(model, tokenizer, prompt)}")
