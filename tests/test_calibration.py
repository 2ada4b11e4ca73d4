"""Calibrated conversion on tiny random models: statistics, low-rank methods, rope strategies, allocation."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from conftest import tiny_model, tokens

from mlaify import MLAConversionConfig, MlaifyError, convert_to_mla
from mlaify.convert.allocation import allocate_ranks
from mlaify.convert.calibration import (
    CalibrationConfig,
    CalibrationStats,
    collect_statistics,
    load_or_collect,
)
from mlaify.convert.convert import SourceGeometry, layer_problem, plan_geometry, split_heads
from mlaify.geometry import kv_geometry


def char_tokenizer(text: str) -> dict:
    """Stands in for a real tokenizer: one id per character, inside the tiny models' vocabulary of 96."""
    return {"input_ids": [ord(c) % 96 for c in text]}


CALIB = CalibrationConfig(num_sequences=8, seq_len=64, batch_size=4)


def stats_for(model, path, cfg=CALIB) -> CalibrationStats:
    return collect_statistics(model, char_tokenizer, path, cfg)


def test_calibration_is_deterministic_and_reusable(calib_text, tmp_path):
    model = tiny_model("llama-gqa")
    a, b = stats_for(model, calib_text), stats_for(model, calib_text)
    assert torch.equal(a.input_moment, b.input_moment) and torch.equal(a.k_pair_norm, b.k_pair_norm)
    other = stats_for(model, calib_text, CalibrationConfig(num_sequences=8, seq_len=64, seed=1))
    assert not torch.equal(a.input_moment, other.input_moment)
    assert (
        a.input_moment.shape == (2, 64, 64)
        and a.q_pair_norm.shape == (2, 4, 8)
        and a.k_pair_norm.shape == (2, 2, 8)
    )
    assert torch.allclose(a.input_moment, a.input_moment.transpose(1, 2))

    path = tmp_path / "stats.pt"
    saved = load_or_collect(model, char_tokenizer, calib_text, CALIB, path)
    assert path.is_file()
    reused = load_or_collect(None, char_tokenizer, calib_text, CALIB, path)  # no model needed: read from disk
    assert torch.equal(saved.input_moment, reused.input_moment) and reused.num_tokens == 8 * 64


def test_bfloat16_forward_measures_what_float32_does(calib_text):
    """Autocast only speeds up the forward passes: every statistic stays float64 and within bfloat16
    rounding of the float32 measurement, and the model keeps its float32 weights."""
    model = tiny_model("llama-gqa")
    fast = stats_for(model, calib_text)
    exact = stats_for(model, calib_text, dataclasses.replace(CALIB, compute_dtype="float32"))
    assert not torch.equal(fast.input_moment, exact.input_moment)  # autocast was on
    # Layer 0 reads the embeddings through its norm, computed in float32 either way: its moment must
    # match to float32 accuracy, which fails if the products ran in bfloat16 inside the autocast.
    assert torch.allclose(fast.input_moment[0], exact.input_moment[0], rtol=1e-5, atol=1e-7)
    for name in ("input_moment", "q_pair_norm", "k_pair_norm", "distance_mass"):
        a, b = getattr(fast, name), getattr(exact, name)
        assert a.dtype == torch.float64 and (a - b).norm() < 1e-2 * b.norm(), name
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with pytest.raises(MlaifyError, match="unknown calibration dtype"):
        CalibrationConfig(compute_dtype="float16")


def test_calibration_needs_enough_text(calib_text):
    with pytest.raises(MlaifyError, match="lower --calib-sequences"):
        stats_for(tiny_model("llama-gqa"), calib_text, CalibrationConfig(num_sequences=1000, seq_len=512))


def _output_error(problem, factors, moment, k_balance) -> float:
    """E ||k_balance * dK h||^2 + E ||dV h||^2 on the calibration inputs (C = E[h h^T])."""
    dk = factors.w_uk @ factors.w_dkv - problem.w_k
    dv = factors.w_uv @ factors.w_dkv - problem.w_v
    d = torch.cat([k_balance * dk, dv])
    return float(torch.einsum("nd,de,ne->", d, moment, d))


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-bias", "llama-mha"])
@torch.no_grad()
def test_activation_output_error_never_above_weight_at_equal_rank(name, calib_text):
    model = tiny_model(name)
    stats = stats_for(model, calib_text)
    src = SourceGeometry.of(model.config)
    for layer, attn in enumerate(model.model.layers):
        attn = attn.self_attn
        by = {}
        for method in ("weight", "activation"):
            cfg = MLAConversionConfig(kv_lora_rank=8, qk_rope_head_dim=4, lowrank=method).resolve(
                calibrated=True
            )
            split = split_heads(attn, src, plan_geometry(src, cfg), cfg, stats, layer)
            by[method] = layer_problem(attn, split, src, cfg, stats, layer)
        moment = stats.input_moment[layer]
        a = by["activation"].balance
        for rank in range(1, by["activation"].max_rank + 1):
            act = _output_error(by["activation"], by["activation"].factor(rank), moment, a)
            wgt = _output_error(by["weight"], by["weight"].factor(rank), moment, a)
            assert act <= wgt * (1 + 1e-9) + 1e-12, (layer, rank, act, wgt)


@pytest.mark.parametrize(
    "name", ["llama-gqa", "llama-mqa", "llama-mha", "qwen2-bias", "llama3-rope", "qwen3", "gemma3", "phi3"]
)
@pytest.mark.parametrize("lowrank", ["weight", "attention"])
def test_rotate_keeping_every_component_is_exact(name, lowrank, calib_text):
    model = tiny_model(name)
    stats = stats_for(model, calib_text)
    n_kv = model.config.num_key_value_heads
    cfg = MLAConversionConfig(
        kv_lora_rank=min(64, 2 * n_kv * 16),
        rope_strategy="rotate",
        qk_rope_head_dim=n_kv * 16,
        lowrank=lowrank,
    )
    ids = tokens()
    with torch.no_grad():
        mla = convert_to_mla(model, cfg, stats)
        assert (mla.config.n_rope_heads, mla.config.qk_nope_head_dim) == (1, 16)
        assert (mla(ids).logits - model(ids).logits).abs().max() < 1e-4


@pytest.mark.parametrize("target", ["mlaify", "deepseek_v3"])
def test_a_rope_key_with_room_for_every_component_does_not_fold(target, calib_text):
    model = tiny_model("llama-gqa")  # 2 KV heads x 8 pairs: 16 rotate components, 32 rope dims
    cfg = MLAConversionConfig(
        kv_lora_rank=64, rope_strategy="rotate", qk_rope_head_dim=32, rope_fold=2, target=target
    )
    ids = tokens()
    with torch.no_grad():
        mla = convert_to_mla(model, cfg, stats_for(model, calib_text))
        assert (mla(ids).logits - model(ids).logits).abs().max() < 1e-4


@pytest.mark.parametrize(("n_kv", "n_slots"), [(1, 3), (2, 5), (2, 11)])
def test_folded_rope_key_is_exact_where_folded_pairs_turn_alike(n_kv, n_slots):
    """Folding (rope.py) only approximates the slower pair of a fold by its faster one: where the two
    turn at one frequency, the rope slots plus what stays of every key (turned at its own pair's
    frequency) give the source's scores at every distance, whichever components are kept."""
    from mlaify.convert.rope import split_rotated

    g = torch.Generator().manual_seed(0)
    n_h, d_h, d = 2 * n_kv, 16, 12
    w_q = torch.randn(n_h, d_h, d, generator=g, dtype=torch.float64)
    w_k = torch.randn(n_kv, d_h, d, generator=g, dtype=torch.float64)
    x = torch.randn(64, d, generator=g, dtype=torch.float64)
    split = split_rotated(w_q, w_k, x.T @ x / 64, n_slots, fold=2)
    theta = (1e-1 ** torch.arange(d_h // 4, dtype=torch.float64)).repeat_interleave(2)  # pairs 2m, 2m+1 alike

    def turned(v: torch.Tensor, freqs: torch.Tensor, t: int) -> torch.Tensor:  # RoPE by distance t, HF layout
        a, b = v.chunk(2, dim=-1)
        c, s = (freqs * t).cos(), (freqs * t).sin()
        return torch.cat([a * c - b * s, a * s + b * c], dim=-1)

    h_q, h_k = torch.randn(2, d, generator=g, dtype=torch.float64)
    slot_freqs = theta[split.rope_pairs[0]]
    for t in (0, 3, 17):
        for h in range(n_h):
            kv = h // 2
            q, k = w_q[h] @ h_q, w_k[kv] @ h_k
            want = q @ turned(k, theta, t)
            got = (split.q_rope[h] @ h_q) @ turned(split.k_rope[0] @ h_k, slot_freqs, t)
            got = got + q @ turned(split.k_nope[kv] @ h_k, theta, t)
            assert torch.allclose(got, want, rtol=1e-9, atol=1e-9), (t, h)


@pytest.mark.parametrize("strategy", ["high", "low", "uniform", "norm", "rotate"])
@pytest.mark.parametrize("lowrank", ["weight", "activation", "attention"])
def test_every_combination_converts_within_budget(strategy, lowrank, calib_text):
    model = tiny_model("qwen2-bias")
    stats = stats_for(model, calib_text)
    cfg = MLAConversionConfig(kv_budget=24, qk_rope_head_dim=4, rope_strategy=strategy, lowrank=lowrank)
    with torch.no_grad():
        mla = convert_to_mla(model, cfg, stats)
        assert torch.isfinite(mla(tokens()).logits).all()
    assert kv_geometry(mla.config)["kv_values_per_token"] == 24 * model.config.num_hidden_layers


def test_norm_strategy_keeps_the_pairs_with_the_largest_measured_contribution(calib_text):
    model = tiny_model("llama-gqa")
    stats = stats_for(model, calib_text)
    mla = convert_to_mla(
        model, MLAConversionConfig(kv_budget=32, qk_rope_head_dim=4, rope_strategy="norm"), stats
    )
    q = stats.q_pair_norm[0].view(2, 2, 8).sum(1)
    for g, pairs in enumerate(mla.config.rope_pairs[0]):
        score = stats.k_pair_norm[0, g] * q[g]
        assert sorted(pairs) == sorted(score.topk(2).indices.tolist())


def test_adaptive_allocation_spends_exactly_the_budget(calib_text):
    model = tiny_model("llama-gqa", num_hidden_layers=4)
    stats = stats_for(model, calib_text)
    # kv_balance 1: this tiny random model's error curves then differ enough across layers to give
    # unequal ranks (at the default 0.5 they come out equal, which would not test the split).
    cfg = MLAConversionConfig(
        kv_budget=28, qk_rope_head_dim=4, lowrank="attention", rank_allocation="adaptive", kv_balance=1.0
    )
    mla = convert_to_mla(model, cfg, stats)
    ranks = mla.config.kv_lora_rank
    assert len(set(ranks)) > 1 and sum(ranks) == 4 * (
        28 - mla.config.n_rope_heads * mla.config.qk_rope_head_dim
    )
    assert kv_geometry(mla.config)["kv_values_per_token"] == 4 * 28
    with torch.no_grad():
        assert torch.isfinite(mla(tokens()).logits).all()


def test_greedy_allocation_is_optimal_and_exact():
    g = torch.Generator().manual_seed(0)
    curves = [torch.rand(6, generator=g).sort(descending=True).values * s for s in (1.0, 3.0, 0.5)]
    for total in range(3, 19):
        ranks = allocate_ranks(curves, total)
        assert sum(ranks) == total

        def left(rs):
            return sum(float(c[r:].sum()) for c, r in zip(curves, rs, strict=True))

        best = min((rs for rs in itertools.product(range(1, 7), repeat=3) if sum(rs) == total), key=left)
        assert left(ranks) <= left(best) + 1e-9
    with pytest.raises(MlaifyError, match="cannot be split"):
        allocate_ranks(curves, 19)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rope_strategy="norm"), "needs calibration statistics"),
        (dict(lowrank="activation"), "needs calibration statistics"),
        (dict(rank_allocation="adaptive"), "needs calibration statistics"),
        (dict(lowrank="svd"), "unknown lowrank"),
        (dict(rank_allocation="greedy"), "unknown rank allocation"),
    ],
)
def test_method_options_raise_one_clear_error(kwargs, message):
    with pytest.raises(MlaifyError, match=message):
        convert_to_mla(tiny_model("llama-gqa"), MLAConversionConfig(**kwargs))


def test_calibrated_defaults_are_the_best_preset():
    from mlaify.convert.config import BEST

    cfg = MLAConversionConfig(kv_budget=32).resolve(calibrated=True)
    assert {k: getattr(cfg, k) for k in BEST} == BEST
    plain = MLAConversionConfig(kv_budget=32).resolve(calibrated=False)
    assert (plain.lowrank, plain.rope_strategy, plain.rank_allocation) == ("weight", "high", "uniform")
    src = SourceGeometry.of(tiny_model("llama-gqa").config)  # 2 KV heads x 16 dims: at most 32 rotary dims
    with pytest.raises(MlaifyError, match="'rotate' mixes at most 2 x 16"):
        plan_geometry(src, MLAConversionConfig(kv_budget=40, qk_rope_head_dim=34).resolve(calibrated=True))


def test_rope_fold_defaults_and_refusals():
    from mlaify.convert.convert import check_convertible

    assert MLAConversionConfig(kv_budget=32).resolve(calibrated=True).rope_fold == 1
    assert MLAConversionConfig(kv_budget=32, rope_fold=2).resolve(calibrated=True).rope_fold == 2
    for refused in (dict(rope_strategy="norm"), dict(target="vllm")):
        with pytest.raises(MlaifyError, match="--rope-fold folds the rotate strategy"):
            MLAConversionConfig(kv_budget=32, rope_fold=2, **refused).resolve(calibrated=True)
    with pytest.raises(MlaifyError, match="--rope-fold 3 does not divide the 8 frequency pairs"):
        cfg = MLAConversionConfig(kv_budget=32, rope_fold=3)
        check_convertible(tiny_model("llama-gqa").config, cfg, calibrated=True)
    with pytest.raises(MlaifyError, match="rope fold must be >= 1"):
        MLAConversionConfig(rope_fold=0)


def test_expected_rotation_is_exact_at_a_single_distance():
    """With all attention at distance t, the averaged NoPE score equals the RoPE score at that distance."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from mlaify.convert.rope import average_removed_rope, expected_rotation

    d_h, t, m = 16, 5, 9
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d_h, 2, dtype=torch.float64) / d_h))
    g = torch.Generator().manual_seed(0)
    q, k = (
        torch.randn(d_h, generator=g, dtype=torch.float64),
        torch.randn(d_h, generator=g, dtype=torch.float64),
    )
    angle = torch.tensor([m, m - t], dtype=torch.float64)[:, None] * inv_freq
    cos, sin = angle.cos().repeat(1, 2), angle.sin().repeat(1, 2)
    q_rot, _ = apply_rotary_pos_emb(q.view(1, 1, 1, d_h), q.view(1, 1, 1, d_h), cos[None, :1], sin[None, :1])
    _, k_rot = apply_rotary_pos_emb(k.view(1, 1, 1, d_h), k.view(1, 1, 1, d_h), cos[None, 1:], sin[None, 1:])
    mass = torch.zeros(1, 12, dtype=torch.float64)
    mass[0, t] = 1.0
    q_avg = average_removed_rope(q.view(1, d_h, 1), *expected_rotation(mass, inv_freq)).view(d_h)
    assert torch.allclose(q_avg @ k, (q_rot.flatten() @ k_rot.flatten()), atol=1e-12)


@torch.no_grad()
def test_distance_mass_matches_the_source_attention():
    from mlaify.convert.calibration import _LayerRecorder

    model = tiny_model("llama-gqa", attn_implementation="eager")
    ids = tokens(2, 32)
    inv_freq = model.model.rotary_emb.inv_freq
    recorders = [_LayerRecorder(layer.self_attn, model.config, inv_freq, 32) for layer in model.model.layers]
    attentions = model(ids, output_attentions=True).attentions  # per layer [B, H, S, S]
    for rec, attn in zip(recorders, attentions, strict=True):
        rec.remove()
        expected = torch.zeros(4, 32, dtype=torch.float64)
        for m in range(24, 32):  # the last quarter of the queries
            for n in range(m + 1):
                expected[:, m - n] += attn[:, :, m, n].sum(0).double()
        assert torch.allclose(rec.mass, expected, atol=1e-5)
