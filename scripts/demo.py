"""`make demo`: fetch SmolLM2-135M, convert it to MLA with a 75% smaller KV cache, show before/after.

One `mlaify convert --eval` run with the default calibration (128 x 512 tokens of WikiText-2
validation), the best preset and the refit on 64 of those windows, then the comparison table
(reference perplexity: WikiText-2 test, 32 x 2048 tokens; piqa and arc_easy on their first
DEMO_LIMIT documents). Then a short greedy generation from each model.
"""

import logging
import os
from pathlib import Path

import torch

from mlaify.cli import main as mlaify
from mlaify.fetch import fetch_model
from mlaify.loading import load_model, load_tokenizer

DATA = Path(os.environ.get("MLAIFY_DATA", Path(__file__).resolve().parents[2] / "shared" / "evaldata"))
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
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    src = fetch_model("smollm2-135m")
    convert = ["convert", str(src), str(OUT), "--kv-reduction", "0.75", "--overwrite"]
    convert += ["--calib-text", str(DATA / "wikitext2" / "wiki.valid.tokens")]
    convert += ["--eval", "--data-dir", str(DATA), "--tasks", "piqa,arc_easy", "--limit", str(DEMO_LIMIT)]
    assert mlaify([*convert, "--batch-size", "8"]) == 0
    tokenizer = load_tokenizer(src)
    for name, path in (("source", src), ("MLA, 75% smaller KV cache", OUT)):
        model = load_model(path)
        print(f"\n== {name}: {path}")
        for prompt in PROMPTS:
            print(f"> {prompt}\n{generate(model, tokenizer, prompt)}")
