"""Real model: SmolLM2-135M-Instruct (llama GQA, from its PyPI wheel). Slow; the `ci` ones run in CI."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
from conftest import EVALDATA
from transformers import DynamicCache

from mlaify import MLAConversionConfig, convert_to_mla
from mlaify.cli import main
from mlaify.convert.calibration import CalibrationConfig, calibration_windows, collect_statistics
from mlaify.geometry import kv_geometry
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
    assert main(["convert", str(gguf), str(out), "--kv-budget", "96", "--rope-dim", "16", "--no-calib"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and "quantization_config" not in config["text_config"]
    assert (out / "tokenizer.json").is_file()
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.split("saved to")[-1].split("\n", 1)[1])
    assert info["kv_values_per_token_per_layer"] == 96 and info["kv_lora_rank"] == 96 - 3 * 16


PROMPTS = ["The history of the Roman Empire", "Photosynthesis is the process by which", "The Eiffel Tower is"]


def fluency(model, source, tokenizer) -> tuple[float, float]:
    """(median source-model perplexity of the greedy continuations, mean share of distinct trigrams).

    The source judges whether the converted model's text is likely language; the trigram share
    catches the loops ("of the Roman Empire of the Roman Empire ...") a broken model falls into.
    The source itself scores about 2 and 0.93 on these prompts.
    """
    ppls, distinct = [], []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=32, do_sample=False)
            labels = out.clone()
            labels[:, : ids.shape[1]] = -100
            ppls.append(math.exp(float(source(out, labels=labels).loss)))
        new = out[0, ids.shape[1] :].tolist()
        trigrams = [tuple(new[i : i + 3]) for i in range(len(new) - 2)]
        distinct.append(len(set(trigrams)) / max(len(trigrams), 1))
    return statistics.median(ppls), statistics.mean(distinct)


@pytest.fixture(scope="module")
def calibrated(smollm2_path):
    """Source, tokenizer, calibration statistics on 32 x 512 tokens of WikiText-2 validation, and those
    windows for the refit (as `mlaify convert --calib-text` does, on fewer windows)."""
    source, tokenizer = load_model(smollm2_path), load_tokenizer(smollm2_path)
    text = EVALDATA / "wikitext2" / "wiki.valid.tokens"
    cfg = CalibrationConfig(num_sequences=32)
    stats = collect_statistics(source, tokenizer, text, cfg)
    return source, tokenizer, stats, calibration_windows(tokenizer, text, cfg)


@pytest.fixture(scope="module")
def quarter_cache(calibrated):
    """SmolLM2 converted with calibration (best preset) at `--kv-reduction 0.75`."""
    source, _, stats, windows = calibrated
    return convert_to_mla(source, MLAConversionConfig(kv_reduction=0.75), stats, windows)


@pytest.mark.ci
def test_calibrated_half_cache_generates_fluent_text(calibrated):
    source, tokenizer, stats, windows = calibrated
    mla = convert_to_mla(source, MLAConversionConfig(kv_reduction=0.5), stats, windows)
    assert kv_geometry(mla.config)["kv_values_per_token_per_layer"] == 192
    ppl, distinct = fluency(mla, source, tokenizer)
    assert ppl < 30 and distinct > 0.6, (ppl, distinct)


@pytest.mark.ci
def test_quarter_cache_holds_96_values_per_token_per_layer(quarter_cache, calibrated):
    """Adaptive allocation varies the rank per layer; the cache rows average exactly the budget."""
    assert kv_geometry(quarter_cache.config)["kv_values_per_token_per_layer"] == 96
    ids = calibrated[1](SENTENCE, return_tensors="pt").input_ids
    cache = DynamicCache(config=quarter_cache.config)
    with torch.inference_mode():
        quarter_cache(ids, cache=cache, use_cache=True)
    widths = [layer.stores[0].shape[-1] for layer in cache.layers]
    assert sum(widths) == 96 * len(widths) and len(set(widths)) > 1


# -87.5%: where the fit gained most on the reference protocol (198 -> 132). -50%: where the refit
# after it was once ill-conditioned (layer 18's o_proj at 130x the source's norm; with the fit on
# 16 windows, 47.08 against 24.08 on this window) until refit.py bounded it.
@pytest.mark.parametrize("reduction, ratio", [(0.875, 0.9), (0.5, 0.99)])
def test_query_fit_lowers_the_perplexity(calibrated, reduction, ratio):
    """`--query-fit-sequences` on the first test window, with the fit on only 4 of the refit windows."""
    from mlaify.eval.perplexity import perplexity_of_ids, tokenize_text

    source, tokenizer, stats, windows = calibrated
    ids = tokenize_text(EVALDATA / "wikitext2" / "wiki.test.raw", tokenizer)
    cfg = MLAConversionConfig(kv_reduction=reduction)
    plain, fitted = (convert_to_mla(source, cfg, stats, windows, query_fit=n) for n in (0, 4))
    before, after = (perplexity_of_ids(m, ids, 1, progress=False).perplexity for m in (plain, fitted))
    assert after < ratio * before, (before, after)


@pytest.mark.ci
def test_healing_lowers_the_perplexity_at_a_quarter_of_the_cache(quarter_cache, calibrated):
    """`heal` on 16k tokens of the Wikipedia training text (nothing from WikiText-2), the source as
    teacher: the -75% model's perplexity on the first two reference windows falls by over 5%."""
    import copy

    from mlaify.eval.perplexity import perplexity_of_ids, tokenize_text
    from mlaify.heal import HealConfig, heal

    source, tokenizer, _, _ = calibrated
    ids = tokenize_text(EVALDATA / "wikitext2" / "wiki.test.raw", tokenizer)
    student = copy.deepcopy(quarter_cache)
    before = perplexity_of_ids(student, ids, 2, progress=False).perplexity
    text = EVALDATA.parent / "traindata" / "wikipedia_vital_summaries_en.txt"
    heal(student, source, text, HealConfig(tokens=16_384, batch_size=4), tokenizer=tokenizer, progress=False)
    after = perplexity_of_ids(student, ids, 2, progress=False).perplexity
    assert after < 0.95 * before, (before, after)


@pytest.mark.ci
def test_deepseek_v3_export_scores_the_same_perplexity(quarter_cache, calibrated):
    """The stock DeepSeek-V3 export of the calibrated -75% model (adaptive ranks, one rotated rope
    key): reference perplexity on the first two windows within 0.1%, as issue 15 asks."""
    from mlaify.eval.perplexity import perplexity_of_ids, tokenize_text
    from mlaify.export import to_deepseek_v3

    ids = tokenize_text(EVALDATA / "wikitext2" / "wiki.test.raw", calibrated[1])
    exported = to_deepseek_v3(quarter_cache)
    ours, theirs = (
        perplexity_of_ids(m, ids, 2, progress=False).perplexity for m in (quarter_cache, exported)
    )
    assert abs(theirs / ours - 1) < 1e-3, (ours, theirs)
