"""Step 3, the least-squares refit of W_UV and o_proj (refit.py), on tiny random models."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, tokens
from test_calibration import char_tokenizer

from mlaify import MLAConversionConfig, convert_to_mla
from mlaify.convert.calibration import CalibrationConfig, calibration_windows, collect_statistics
from mlaify.convert.refit import RIDGES, fit_readout

WINDOWS = CalibrationConfig(num_sequences=32, seq_len=64, batch_size=4)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    """Calibration text, statistics config and its token windows."""
    path = tmp_path_factory.mktemp("refit") / "text.txt"
    g = torch.Generator().manual_seed(0)
    path.write_text("".join(chr(32 + i) for i in torch.randint(0, 95, (20000,), generator=g).tolist()))
    return path, calibration_windows(char_tokenizer, path, WINDOWS)


def first_layer_output_error(source, mla, ids) -> float:
    """Mean squared error of layer 0's attention output (both read the same embeddings there)."""
    outputs = []
    hooks = [
        m.model.layers[0].self_attn.register_forward_hook(lambda mod, a, out: outputs.append(out[0]))
        for m in (source, mla)
    ]
    with torch.no_grad():
        source(ids), mla(ids)
    for hook in hooks:
        hook.remove()
    return float((outputs[0] - outputs[1]).pow(2).mean())


# Exact in float32; bfloat16 forward passes leave their rounding (8-bit mantissa, 0.4%) in the fit.
@pytest.mark.parametrize("compute_dtype, tolerance", [("float32", 1e-3), ("bfloat16", 2e-2)])
@pytest.mark.parametrize("name", ["llama-gqa", "llama-mqa", "qwen2-bias", "qwen3-sliding", "gemma3", "phi3"])
def test_refit_keeps_an_exact_conversion_exact(name, compute_dtype, tolerance, calib):
    path, windows = calib
    model = tiny_model(name)
    stats = collect_statistics(model, char_tokenizer, path, WINDOWS)
    n_kv = model.config.num_key_value_heads
    cfg = MLAConversionConfig(kv_lora_rank=n_kv * 16, rope_strategy="all", lowrank="attention")
    mla = convert_to_mla(model, cfg, stats, refit_windows=windows, compute_dtype=compute_dtype)
    ids = tokens()
    with torch.no_grad():
        ref, got = model(ids).logits, mla(ids).logits
    assert (got - ref).abs().max() < tolerance * ref.abs().max()


@pytest.mark.parametrize("name", ["llama-gqa", "llama-mha", "qwen2-bias"])
def test_refit_lowers_the_attention_output_error(name, calib):
    """With r <= d_v the refit is the least-squares optimum over all linear read-outs of the latents,
    so on its own calibration windows the first layer's output error can only go down."""
    path, windows = calib
    model = tiny_model(name)
    stats = collect_statistics(model, char_tokenizer, path, WINDOWS)
    cfg = MLAConversionConfig(kv_budget=16, qk_rope_head_dim=4)  # r = 8 or 12 <= d_v = 16
    plain = convert_to_mla(model, cfg, stats)
    refit = convert_to_mla(model, cfg, stats, refit_windows=windows)
    before, after = (
        first_layer_output_error(model, plain, windows),
        first_layer_output_error(model, refit, windows),
    )
    assert after < 0.9 * before, (before, after)
    # The cache is what steps 1-2 made it: the refit changes only what reads it.
    for a, b in zip(plain.model.layers, refit.model.layers, strict=True):
        assert torch.equal(a.self_attn.kv_a_proj_with_mqa.weight, b.self_attn.kv_a_proj_with_mqa.weight)


def readout_moments(collinear: float, leak: float, seed: int = 0):
    """Moments of a 2-head read-out `o = W_O [A_1 z_1; A_2 z_2] + leak M e` with `z_2 = z_1 + collinear * e`:
    when `collinear` is small the heads attend almost alike, yet the target depends on the little
    that tells them apart (as rounding noise does in a bfloat16 refit). Returns them, A and W_O."""
    g = torch.Generator().manual_seed(seed)
    n, r, dv, d = 4096, 4, 4, 6
    z1, e = torch.randn(2, n, r, generator=g, dtype=torch.float64)
    z = torch.cat([z1, z1 + collinear * e], 1)
    a = torch.randn(2, dv, r, generator=g, dtype=torch.float64)
    u = torch.einsum("hdr,nhr->nhd", a, z.view(n, 2, r))
    w_o = torch.randn(d, 2 * dv, generator=g, dtype=torch.float64)
    o = u.reshape(n, -1) @ w_o.T + leak * e @ torch.randn(d, r, generator=g, dtype=torch.float64).T
    moments = z.T @ z / n, torch.einsum("nhd,nhr->hdr", u, z.view(n, 2, r)) / n, o.T @ z / n
    return moments, a, w_o


def test_fit_readout_is_least_squares_where_the_heads_differ():
    (zz, uz, oz), a, w_o = readout_moments(collinear=1.0, leak=0.0)
    w_uv, got, ridge = fit_readout(zz, uz, oz, torch.zeros_like(a), torch.zeros_like(w_o), 2 * w_o.norm())
    assert ridge == RIDGES[0]
    # exact data: only the 1e-6 ridge (toward zero here) separates the fit from the truth
    assert (w_uv - a).norm() < 1e-4 * a.norm() and (got - w_o).norm() < 1e-3 * w_o.norm()


def test_fit_readout_bounds_o_proj_where_the_heads_attend_alike():
    """Nearly collinear heads leave W_O ill-determined: the weakest ridge fits the leak into an o_proj
    many times the true one; the bound picks the weakest stronger ridge that keeps it within."""
    (zz, uz, oz), a, w_o = readout_moments(collinear=1e-2, leak=0.1)
    free = fit_readout(zz, uz, oz, a, w_o, float("inf"))[1]
    assert free.norm() > 10 * w_o.norm()
    bound = 2 * w_o.norm()
    _, got, ridge = fit_readout(zz, uz, oz, a, w_o, bound)
    assert ridge > RIDGES[0] and got.norm() <= bound
    weaker = fit_readout(zz, uz, oz, a, w_o, float("inf"), ridges=RIDGES[: RIDGES.index(ridge)])[1]
    assert weaker.norm() > bound


def test_a_strong_ridge_keeps_the_converted_weights():
    """Where the data say nothing, the refit leaves the converted weights (the prior) as they are."""
    (zz, uz, oz), a, w_o = readout_moments(collinear=1.0, leak=0.1)
    prior_uv, prior_o = torch.ones_like(a), torch.ones_like(w_o)
    w_uv, got, _ = fit_readout(zz, uz, oz, prior_uv, prior_o, float("inf"), ridges=(1e9,))
    torch.testing.assert_close(w_uv, prior_uv, rtol=0, atol=1e-6)
    torch.testing.assert_close(got, prior_o, rtol=0, atol=1e-6)
