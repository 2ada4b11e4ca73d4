"""`--device`: `auto` takes CUDA only where it is visible, `cuda` without it is one line before any work,
and naming the CPU changes nothing. (The CUDA runs themselves need a GPU: benchmarks/device.py.)"""

from __future__ import annotations

import pytest
import torch
from conftest import char_tokenizer, tiny_model
from transformers import AutoModelForCausalLM

from mlaify import MLAConversionConfig, convert_to_mla
from mlaify.cli import main
from mlaify.convert.calibration import CalibrationConfig, calibration_windows, collect_statistics
from mlaify.convert.convert import convert_to_folder
from mlaify.convert.source import ModelLayers, SafetensorsLayers
from mlaify.devices import resolve_device
from mlaify.errors import MlaifyError
from mlaify.loading import load_model


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_takes_cuda_only_where_it_is_visible(monkeypatch, no_cuda):
    assert resolve_device("auto") == resolve_device(None) == resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(MlaifyError, match="no CUDA device is visible; use --device cpu or auto"):
        resolve_device("cuda")
    with pytest.raises(MlaifyError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


def test_cuda_without_a_gpu_is_one_line_before_any_work(tmp_path, capsys, no_cuda):
    tiny_model("llama-gqa").save_pretrained(tmp_path / "src")
    capsys.readouterr()
    code = main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--no-calib", "--device", "cuda"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--device cuda but no CUDA device" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(MlaifyError, match="no CUDA device"):
        load_model(tmp_path / "src", device="cuda")


def test_a_source_loaded_off_the_cpu_is_refused_with_the_way_out():
    with pytest.raises(MlaifyError, match="load it on the CPU and pass the device"):
        convert_to_mla(tiny_model("llama-gqa").to("meta"), MLAConversionConfig(kv_budget=40))


def test_the_cpu_named_gives_the_default_conversion_bit_for_bit(tmp_path):
    """Calibration, refit and query fit with `device="cpu"` (in memory and streamed) equal the default
    path's, and a model in memory is left where it was."""
    source = tiny_model("gemma3", num_hidden_layers=3)
    source.save_pretrained(tmp_path / "src")
    text = tmp_path / "text.txt"
    g = torch.Generator().manual_seed(0)
    text.write_text("".join(chr(32 + i) for i in torch.randint(0, 95, (4000,), generator=g).tolist()))
    calib = CalibrationConfig(num_sequences=4, seq_len=64, batch_size=2)
    layers = ModelLayers(source, torch.device("cpu"))
    stats = collect_statistics(layers, char_tokenizer, text, calib)
    default_stats = collect_statistics(source, char_tokenizer, text, calib)
    assert torch.equal(stats.input_moment, default_stats.input_moment)
    windows = calibration_windows(char_tokenizer, text, calib)[:2]
    cfg = MLAConversionConfig(kv_budget=40)
    default = convert_to_mla(source, cfg, stats, windows, query_fit=1).state_dict()
    named = convert_to_mla(source, cfg, stats, windows, query_fit=1, device="cpu").state_dict()
    (tmp_path / "out").mkdir()
    streamed = SafetensorsLayers(tmp_path / "src", source.config, torch.device("cpu"))
    convert_to_folder(streamed, tmp_path / "out", cfg, stats, windows, query_fit=1, device="cpu")
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert all(torch.equal(default[k], named[k]) and torch.equal(default[k], written[k]) for k in default)
    assert {p.device.type for p in source.parameters()} == {"cpu"}
