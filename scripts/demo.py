"""`make demo`: fetch SmolLM2-135M, convert it to MLA at a 75% smaller KV cache, and show before/after.

Prints the KV geometry of both models and a short greedy generation from each.
"""

import logging
import os
from pathlib import Path

import torch

from mlaify.cli import main as mlaify
from mlaify.fetch import fetch_model
from mlaify.loading import load_model, load_tokenizer

PROMPTS = ["What is the capital of France?", "Write one sentence about the ocean."]
OUT = Path(os.environ.get("MLAIFY_CACHE", ".cache")) / "demo" / "smollm2-135m-mla75"


def generate(model, tokenizer, question: str) -> str:
    chat = [{"role": "user", "content": question}]
    inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    src = fetch_model("smollm2-135m")
    assert mlaify(["convert", str(src), str(OUT), "--kv-reduction", "0.75", "--overwrite"]) == 0
    tokenizer = load_tokenizer(src)
    for name, path in (("source", src), ("MLA, 75% smaller KV cache", OUT)):
        model = load_model(path)
        print(f"\n== {name}: {path}")
        for question in PROMPTS:
            print(f"Q: {question}\nA: {generate(model, tokenizer, question)}")
