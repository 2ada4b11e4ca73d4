"""The command line: convert and info on tiny models; one clear line, no output folder, for each bad input."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_model

from mlaify.cli import main


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "tiny-llama"
    tiny_model("llama-gqa").save_pretrained(path)
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_convert_then_info_reports_the_budget(source_dir, tmp_path, capsys):
    out = tmp_path / "mla"
    code, stdout, _ = run(capsys, "convert", source_dir, out, "--kv-budget", 24, "--rope-dim", 4)
    assert code == 0 and "| MLA | mlaify (float32) | 24 |" in stdout
    assert "| source | llama (float32) | 64 |" in stdout
    code, stdout, _ = run(capsys, "info", out, "--json")
    info = json.loads(stdout)
    assert code == 0
    assert info["kv_values_per_token_per_layer"] == 24 and info["kv_lora_rank"] == 16
    assert info["kv_reduction"] == pytest.approx(1 - 24 / 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mla"]  # no temporary folder left beside it


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda src, out: ["convert", src.parent / "nope", out], "path does not exist"),
        (lambda src, out: ["convert", src, out, "--kv-lora-rank", 999], "above the maximum"),
        (lambda src, out: ["convert", src, out, "--rope-dim", 5], "even number"),
        (lambda src, out: ["convert", src, out, "--rope-dim", 64], "too large"),
        (lambda src, out: ["convert", src, out, "--rope-strategy", "middle"], "unknown rope strategy"),
        (lambda src, out: ["convert", src, out, "--refit-sequences", -1], "between 0 (no refit)"),
        (lambda src, out: ["convert", src, out, "--refit-sequences", 200], "--calib-sequences (128)"),
        (lambda src, out: ["convert", src, out, "--query-fit-sequences", 65], "--refit-sequences (64)"),
        (lambda src, out: ["convert", src, out, "--query-fit-sequences", 4], "needs --calib-text"),
        (lambda src, out: ["info", src.parent / "nope"], "path does not exist"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(source_dir, tmp_path, capsys, make_args, message):
    out = tmp_path / "out"
    code, _, err = run(capsys, *make_args(source_dir, out))
    assert code == 2
    assert err.count("\n") == 1 and message in err and err.startswith("mlaify: error: ")
    assert not out.exists()


def test_existing_output_needs_overwrite(source_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = run(capsys, "convert", source_dir, out, "--kv-budget", 24)
    assert code == 2 and "--overwrite" in err
    assert run(capsys, "convert", source_dir, out, "--kv-budget", 24, "--overwrite")[0] == 0
    assert (out / "model.safetensors").is_file()


def test_unsupported_model_type(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    src = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(src)
    code, _, err = run(capsys, "convert", src, tmp_path / "out")
    assert code == 2 and "supported: llama, mistral, qwen2" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_missing_or_corrupt_weights(source_dir, tmp_path, capsys, damage):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(source_dir, broken)
    weights = broken / "model.safetensors"
    if damage == "missing":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:100])
    code, _, err = run(capsys, "convert", broken, tmp_path / "out")
    assert code == 2 and err.count("\n") == 1
    assert ("no weights file" if damage == "missing" else "corrupt") in err
    assert not (tmp_path / "out").exists()


def test_unreachable_hub_id_is_explained(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # no network wait in the test
    code, _, err = run(capsys, "convert", "someone/not-a-local-model", tmp_path / "out")
    assert code == 2 and "hub" in err and err.count("\n") == 1
