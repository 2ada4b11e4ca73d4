"""Real-model and end-to-end evaluation checks (minutes on 2 cores): marked slow, run in CI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import EVALDATA
from transformers import AutoModelForCausalLM, LlamaConfig

import mlaify
from mlaify.eval.tasks import TASKS_DIR

WIKI = EVALDATA / "wikitext2" / "wiki.test.raw"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.ci,
    pytest.mark.skipif(not WIKI.is_file(), reason="needs ../shared/evaldata"),
]


def test_smollm2_reference_perplexity(smollm2_path):
    """DESIGN.md section 4: 32 windows x 2048 tokens of WikiText-2 test give 21.8373."""
    from mlaify.eval.perplexity import perplexity
    from mlaify.loading import load_model, load_tokenizer

    model, tokenizer = load_model(str(smollm2_path)), load_tokenizer(str(smollm2_path))
    result = perplexity(model, tokenizer, WIKI)
    assert (result.windows, result.seq_len, result.text_tokens) == (32, 2048, 303_415)
    assert result.perplexity == pytest.approx(21.8373, abs=0.01)


def test_lm_eval_cli_runs_local_tasks_on_a_converted_model(tmp_path, smollm2_path):
    """The shipped YAMLs drive the stock lm-eval CLI on an MLA checkpoint, data dir from MLAIFY_DATA."""
    from mlaify.loading import load_tokenizer

    tokenizer = load_tokenizer(str(smollm2_path))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    source = AutoModelForCausalLM.from_config(config).eval()
    out = tmp_path / "mla"
    mlaify.convert_to_mla(source, mlaify.MLAConversionConfig(kv_reduction=0.5)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    assert json.loads((out / "config.json").read_text())["model_type"] == "mlaify"
    env = {**os.environ, "MLAIFY_DATA": str(EVALDATA), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [
        *(sys.executable, "-m", "lm_eval", "--model", "hf"),
        *("--model_args", f"pretrained={out},trust_remote_code=True"),
        *("--tasks", "mlaify_piqa,mlaify_winogrande", "--include_path", str(TASKS_DIR), "--limit", "20"),
    ]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    table = run.stdout
    assert "|mlaify_piqa" in table and "|mlaify_winogrande" in table and "acc_norm" in table
