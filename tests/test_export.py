"""Export to the stock DeepSeek-V3 layout (mlaify/export.py): the export computes our model's function."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import char_tokenizer, tiny_model, tokens
from transformers import AutoConfig, DeepseekV3ForCausalLM

from mlaify import MLAConversionConfig, convert_to_mla
from mlaify.cli import main
from mlaify.convert.calibration import CalibrationConfig, calibration_windows, collect_statistics
from mlaify.convert.convert import check_convertible
from mlaify.errors import MlaifyError
from mlaify.export import (
    NORM_ERROR_BITS,
    _linear_norm,
    rope_parameters,
    shared_rope_slots,
    to_deepseek_v3,
    vllm_obstacles,
)
from mlaify.geometry import kv_geometry

CALIB = CalibrationConfig(num_sequences=8, seq_len=64, batch_size=4)
TOL = 1e-4  # fp32, tiny models: logits of the export against ours (and exact conversions' against the source)


def converted(name: str, how: str, calib_text=None, **overrides):
    """A tiny source and its conversion: `exact` (every dim rotary, full rank), `weight` (lossy,
    per-head rope keys), `calibrated` (the best calibrated method: one rotated rope key, adaptive
    ranks, refit) or `target` (calibrated with `target="deepseek_v3"`); a `-folded` suffix folds
    the rope key's frequency pairs in twos (`rope_fold=2`)."""
    source = tiny_model(name, **overrides)
    if how == "exact":
        n_kv = source.config.num_key_value_heads
        cfg = MLAConversionConfig(rope_strategy="all", kv_lora_rank=n_kv * 16)
        return source, convert_to_mla(source, cfg)
    if how == "weight":
        return source, convert_to_mla(source, MLAConversionConfig(kv_budget=24, qk_rope_head_dim=4))
    stats = collect_statistics(source, char_tokenizer, calib_text, CALIB)
    windows = calibration_windows(char_tokenizer, calib_text, CALIB)[:4]
    how, folded, _ = how.partition("-folded")
    cfg = MLAConversionConfig(
        kv_budget=40, target="deepseek_v3" if how == "target" else "mlaify", rope_fold=2 if folded else 1
    )
    return source, convert_to_mla(source, cfg, stats, windows)


CASES = [
    ("llama-mha", "exact"),
    ("llama-gqa", "exact"),
    ("llama-mqa", "exact"),
    ("llama-gqa", "weight"),
    ("llama-mqa", "weight"),
    ("mistral", "weight"),
    ("llama-gqa", "calibrated"),
    ("llama-mha", "calibrated"),
    ("llama-gqa", "target"),
    ("llama-mha", "target"),
    ("llama-gqa", "calibrated-folded"),
    ("llama-mqa", "calibrated-folded"),
    ("llama-gqa", "target-folded"),
]


@pytest.mark.parametrize("name, how", CASES)
def test_export_computes_the_same_logits(name, how, calib_text):
    source, mla = converted(name, how, calib_text)
    exported = to_deepseek_v3(mla)
    assert type(exported) is DeepseekV3ForCausalLM
    ids = tokens(length=48)
    with torch.no_grad():
        ours, theirs = mla(ids).logits, exported(ids).logits
        assert (theirs - ours).abs().max() < TOL
        if how == "exact":
            assert (theirs - source(ids).logits).abs().max() < TOL
    # One latent (padded to the largest rank) and the shared rope slots; no bias for a source without.
    ranks = mla.config.kv_lora_rank
    assert exported.config.kv_lora_rank == (max(ranks) if isinstance(ranks, list) else ranks)
    assert not exported.config.attention_bias and not any(n.endswith(".bias") for n in exported.state_dict())
    assert exported.config.first_k_dense_replace == exported.config.num_hidden_layers


@pytest.mark.parametrize("name", ["llama-gqa", "llama-mha", "llama-mqa"])
def test_target_deepseek_v3_exports_at_exactly_the_budget(name, calib_text):
    """One rope frequency set and one rank for every layer: the export caches what ours does."""
    _, mla = converted(name, "target", calib_text, num_hidden_layers=3)
    pairs = mla.config.rope_pairs
    assert all(sorted(layer[0]) == sorted(pairs[0][0]) for layer in pairs)
    assert kv_geometry(mla.config)["kv_values_per_token_per_layer"] == 40
    assert kv_geometry(to_deepseek_v3(mla).config)["kv_values_per_token_per_layer"] == 40
    with pytest.raises(MlaifyError, match="--rank-allocation uniform"):
        MLAConversionConfig(kv_budget=40, target="deepseek_v3", rank_allocation="adaptive").resolve(True)


def test_biases_fold_and_query_biases_need_query_compression():
    source = tiny_model("qwen2-bias")
    mla = convert_to_mla(source, MLAConversionConfig(kv_budget=24, qk_rope_head_dim=4))
    with pytest.raises(MlaifyError, match="query biases .* pass --q-lora-rank 64"):
        to_deepseek_v3(mla)
    ids = tokens()
    with torch.no_grad():  # through q_b_proj at full rank: exact, key (rope), value and output biases too
        ours = mla(ids).logits
        assert (to_deepseek_v3(mla, q_lora_rank=64)(ids).logits - ours).abs().max() < TOL
        for layer in mla.model.layers:  # without query biases, no query compression is needed
            layer.self_attn.q_proj.bias.zero_()
        assert (to_deepseek_v3(mla)(ids).logits - mla(ids).logits).abs().max() < TOL


def test_query_compression_is_exact_at_full_rank_and_error_grows_below(calib_text):
    _, mla = converted("llama-gqa", "calibrated", calib_text)
    ids = tokens()
    with torch.no_grad():
        ours = mla(ids).logits
        errors = [(to_deepseek_v3(mla, q_lora_rank=q)(ids).logits - ours).abs().max() for q in (64, 48, 16)]
    assert errors[0] < TOL < errors[1] < errors[2], errors
    with pytest.raises(MlaifyError, match="between 1 and the hidden size 64"):
        to_deepseek_v3(mla, q_lora_rank=65)


def test_sliding_windows_are_refused():
    _, mla = converted("mistral", "weight", sliding_window=8)
    with pytest.raises(MlaifyError, match="sliding window of 8"):
        to_deepseek_v3(mla)


def test_tied_embeddings_are_written_out():
    _, mla = converted("llama-gqa", "weight", tie_word_embeddings=True)
    exported = to_deepseek_v3(mla)
    assert not exported.config.tie_word_embeddings
    assert torch.equal(exported.lm_head.weight, mla.model.embed_tokens.weight)


def test_rope_slots_share_frequencies_across_layers_and_heads():
    # layer 0 keeps pairs {0, 2} on head 0 and {0, 1} on head 1; layer 1 keeps {2, 2}.
    slots, placed = shared_rope_slots([[[0, 2], [0, 1]], [[2, 2]]])
    assert slots == [0, 0, 1, 2, 2]
    assert placed == [[[0, 3], [1, 2]], [[3, 4]]]
    # Plain RoPE where the slot frequencies are theta^(-2s/dr); per-pair factors otherwise.
    plain = 1e4 ** (-torch.arange(4, dtype=torch.float64) / 4)
    assert rope_parameters(plain, 512) == {"rope_type": "default", "rope_theta": pytest.approx(1e4)}
    assert rope_parameters(plain[[0, 0, 1, 2]], 512)["rope_type"] == "longrope"
    # a float32 table (as the source computes it) with a large base: plain with the source's exact theta
    table = (1 / 1e5 ** (torch.arange(0, 64, 2).float() / 64)).double()
    assert rope_parameters(table, 512, 1e5) == {"rope_type": "default", "rope_theta": 1e5}


LOAD_WITHOUT_MLAIFY = """
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    logits = model(ids).logits
gen = model.generate(ids[:1], max_new_tokens=16, do_sample=False)
assert "mlaify" not in sys.modules
torch.save({"logits": logits, "generated": gen}, sys.argv[3])
"""


@pytest.mark.parametrize("name, how", [("llama-gqa", "calibrated"), ("llama-mqa", "weight")])
def test_stock_transformers_loads_the_export_without_mlaify(name, how, calib_text, tmp_path):
    _, mla = converted(name, how, calib_text)
    mla.save_pretrained(tmp_path / "mla")
    char_tokenizer.save_pretrained(tmp_path / "mla")
    assert main(["export", str(tmp_path / "mla"), str(tmp_path / "ds")]) == 0
    files = {p.name for p in (tmp_path / "ds").iterdir()}
    assert not any(f.endswith(".py") for f in files) and "README.md" in files
    config = json.loads((tmp_path / "ds" / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("deepseek_v3", ["DeepseekV3ForCausalLM"])
    assert "auto_map" not in config

    ids = tokens(length=32)
    script = [sys.executable, "-c", LOAD_WITHOUT_MLAIFY, str(tmp_path / "ds"), json.dumps(ids.tolist())]
    subprocess.run([*script, str(tmp_path / "out.pt")], check=True, cwd=tmp_path)
    theirs = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        assert (theirs["logits"] - mla(ids).logits).abs().max() < TOL
    ours = mla.generate(ids[:1], max_new_tokens=16, do_sample=False)  # our latent cache, absorbed decode
    assert torch.equal(theirs["generated"], ours)


def test_cli_convert_format_and_info_report_the_exported_cache(tmp_path, capsys):
    source = tiny_model("llama-gqa")
    source.save_pretrained(tmp_path / "src")
    char_tokenizer.save_pretrained(tmp_path / "src")
    out = tmp_path / "ds"
    args = ["convert", str(tmp_path / "src"), str(out), "--kv-budget", "24", "--no-calib"]
    assert main([*args, "--format", "deepseek_v3"]) == 0
    config = AutoConfig.from_pretrained(out)
    assert config.model_type == "deepseek_v3"
    assert kv_geometry(config)["kv_values_per_token_per_layer"] == 24  # --target deepseek_v3 by default
    assert kv_geometry(config)["source_kv_values_per_token_per_layer"] == 64
    card = (out / "README.md").read_text()
    assert "no mlaify needed" in card and "--format deepseek_v3" in card
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert "| deepseek_v3 (float32) | 24 |" in capsys.readouterr().out
    # `mlaify eval` scores the export as it scores the checkpoint it came from.
    assert main([*args[:2], str(tmp_path / "mla"), *args[3:], "--target", "deepseek_v3"]) == 0
    assert main(["export", str(tmp_path / "mla"), str(tmp_path / "mla-ds")]) == 0
    text = tmp_path / "text.txt"
    text.write_text("".join(chr(32 + (7 * i) % 95) for i in range(600)))
    scores = []
    for folder in ("mla", "mla-ds", "ds"):
        report = tmp_path / f"{folder}.json"
        flags = ["--ppl-text", str(text), "--windows", "2", "--seq-len", "128", "--json", str(report)]
        assert main(["eval", str(tmp_path / folder), *flags]) == 0
        scores.append(json.loads(report.read_text())["perplexity"]["perplexity"])
    assert scores[0] == pytest.approx(scores[1], rel=1e-5) and scores[1] == pytest.approx(scores[2], rel=1e-5)
    assert main(["export", str(tmp_path / "src"), str(tmp_path / "again")]) == 2
    assert "export reads an mlaify conversion" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()
    # float16 is refused before any work, whether the export or the conversion asks for it.
    for argv in (
        ["export", str(tmp_path / "mla"), str(tmp_path / "again"), "--dtype", "float16"],
        [*args[:2], str(tmp_path / "again"), *args[3:], "--format", "deepseek_v3", "--dtype", "float16"],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "below float16's normal range" in err and err.count("\n") == 1
        assert not (tmp_path / "again").exists()


def test_the_latent_norm_is_linear_below_eps_for_every_input():
    """`kv_a_layernorm` of the scaled latent rows gives back `W h + b` to 2^-21, even for the input the
    bound is made for (the top singular direction at the largest norm the input RMSNorm can give)."""
    g = torch.Generator().manual_seed(0)
    w, b = (
        torch.randn(24, 64, generator=g, dtype=torch.float64),
        torch.randn(24, generator=g, dtype=torch.float64),
    )
    gamma, eps, slots = 1 + torch.rand(64, generator=g, dtype=torch.float64), 1e-5, 32
    w_out, b_out, norm = _linear_norm(w, b, slots, gamma, eps)
    top = torch.linalg.svd(w).Vh[0]
    inputs = torch.cat([torch.randn(100, 64, generator=g, dtype=torch.float64), top[None] * 8 * gamma.max()])
    x = inputs @ w_out.T + b_out  # [N, slots]
    normed = norm * x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    want = inputs @ w.T + b
    error = ((normed[:, :24] - want).norm(dim=-1) / want.norm(dim=-1)).max()
    assert 0 < error <= 2.0**-NORM_ERROR_BITS and normed[:, 24:].abs().max() == 0


def test_float16_is_refused():
    _, mla = converted("llama-gqa", "weight")
    with pytest.raises(MlaifyError, match="below float16's normal range"):
        to_deepseek_v3(mla.half())


VLLM_SIZED = dict(hidden_size=256, head_dim=128, num_attention_heads=4, num_key_value_heads=2)  # caches 512


def test_target_vllm_picks_a_kernel_geometry_or_names_the_nearest():
    config = tiny_model("llama-gqa", **VLLM_SIZED).config
    plan = check_convertible(config, MLAConversionConfig(kv_budget=400, target="vllm"), calibrated=True)
    assert (plan.kv_lora_rank, plan.qk_rope_head_dim, plan.n_rope_heads) == (256, 64, 1)
    refusals = [
        (
            dict(kv_budget=200),
            "a budget of 200 holds none of them; the nearest is --kv-budget 320 (38% smaller",
        ),
        (dict(kv_lora_rank=300), "a latent of 256 on this model, not 300"),
        (dict(kv_budget=320, qk_rope_head_dim=32), "rope key of 64 dims"),
        (
            dict(kv_budget=320, rank_allocation="adaptive"),
            "--rank-allocation uniform and a rope strategy of rotate",
        ),
    ]
    for fields, message in refusals:
        with pytest.raises(MlaifyError, match=re.escape(message)):
            check_convertible(config, MLAConversionConfig(target="vllm", **fields), calibrated=True)
    for name, problem in [
        ("qwen2-bias", "has attention biases"),
        ("qwen3", "normalises each key head"),
        ("llama3-rope", "scales its RoPE table (llama3)"),
        ("mistral-sliding", "sliding window of 8"),
    ]:
        with pytest.raises(MlaifyError, match=re.escape(problem)):
            check_convertible(tiny_model(name).config, MLAConversionConfig(kv_budget=24, target="vllm"), True)
    # what the stock DeepSeek-V3 model cannot hold either is refused for that target too, before any work
    for name, problem in [("qwen3", "normalises each key head"), ("mistral-sliding", "sliding window of 8")]:
        message = f"{problem}.*; use --target mlaify \\(our class\\)$"
        with pytest.raises(MlaifyError, match=message):
            config = MLAConversionConfig(kv_budget=24, target="deepseek_v3")
            check_convertible(tiny_model(name).config, config, True)


def test_target_vllm_exports_what_vllm_serves_and_stays_exact(calib_text):
    """256 + 64 with every other frequency pair in the rope key: one plain RoPE table of the source's
    theta, no bias, and the export still computes our model's function."""
    source = tiny_model("llama-gqa", **VLLM_SIZED)
    stats = collect_statistics(source, char_tokenizer, calib_text, CALIB)
    # no refit: its 256 tokens would not determine a rank-256 latent's up-projections
    mla = convert_to_mla(source, MLAConversionConfig(kv_budget=320, target="vllm"), stats)
    assert mla.config.rope_pairs == [[list(range(0, 64, 2))]] * 2
    exported = to_deepseek_v3(mla)
    assert vllm_obstacles(exported.config) == []
    assert exported.config.rope_parameters == {"rope_type": "default", "rope_theta": pytest.approx(10000.0)}
    assert (exported.config.kv_lora_rank, exported.config.qk_rope_head_dim) == (256, 64)
    ids = tokens(length=48)
    with torch.no_grad():
        assert (exported(ids).logits - mla(ids).logits).abs().max() < TOL
    # an export of a free conversion says why vLLM could not serve it
    _, free = converted("qwen2-bias", "weight")
    obstacles = vllm_obstacles(to_deepseek_v3(free, q_lora_rank=64).config)
    assert len(obstacles) == 3 and "--target vllm" in obstacles[0] and "no biases" in obstacles[1]


@pytest.mark.parametrize("eps", [1e-5, 1e-4])
def test_a_source_eps_other_than_the_latent_norms_is_kept_by_scaling_the_residual_stream(eps):
    """transformers' kv_a_layernorm always uses 1e-6 (vLLM's reads rms_norm_eps): the export's eps is
    1e-6 everywhere, and the residual stream is scaled so that the decoder norms act as with `eps`."""
    source, mla = converted("llama-gqa", "exact", rms_norm_eps=eps)
    exported = to_deepseek_v3(mla)
    assert exported.config.rms_norm_eps == 1e-6
    assert {m.variance_epsilon for m in exported.modules() if hasattr(m, "variance_epsilon")} == {1e-6}
    ids = tokens(length=48)
    with torch.no_grad():
        assert (exported(ids).logits - source(ids).logits).abs().max() < TOL
        assert (exported(ids).logits - mla(ids).logits).abs().max() < TOL
