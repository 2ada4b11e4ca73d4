"""The command line: convert and info on tiny models; one clear line, no output folder, for each bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import char_tokenizer, tiny_model

from mlaify.cli import main


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "tiny-llama"
    tiny_model("llama-gqa").save_pretrained(path)
    (path / "README.md").write_text("---\nlicense: apache-2.0\ntags: [tiny]\n---\n# tiny llama\n")
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_convert_calibrates_on_the_bundled_text_by_default(tmp_path, capsys):
    """Without --calib-text the conversion calibrates (one shared rotated rope key, adaptive ranks);
    --no-calib gives the weight-only one (a rope key per KV head, one rank)."""
    src = tmp_path / "src"
    tiny_model("llama-gqa").save_pretrained(src)
    char_tokenizer.save_pretrained(src)
    configs = {}
    for name, extra in (("default", []), ("weight-only", ["--no-calib"])):
        assert (
            run(capsys, "convert", src, tmp_path / name, "--kv-budget", 24, "--rope-dim", 4, *extra)[0] == 0
        )
        configs[name] = json.loads((tmp_path / name / "config.json").read_text())
    assert configs["default"]["n_rope_heads"] == 1 and isinstance(configs["default"]["kv_lora_rank"], list)
    assert configs["weight-only"]["n_rope_heads"] == 2 and configs["weight-only"]["kv_lora_rank"] == 16


def test_calibration_statistics_are_saved_then_reused_alone(tmp_path, capsys):
    """--calib-stats F: measured on the bundled text and saved when F is new; reused as it is (no
    text, so no refit) when F exists."""
    src, stats = tmp_path / "src", tmp_path / "stats.pt"
    tiny_model("llama-gqa").save_pretrained(src)
    char_tokenizer.save_pretrained(src)
    flags = ["--kv-budget", 24, "--rope-dim", 4, "--calib-stats", stats, "--refit-sequences", 4]
    assert run(capsys, "convert", src, tmp_path / "a", *flags)[0] == 0 and stats.is_file()
    assert run(capsys, "convert", src, tmp_path / "b", *flags[:-2])[0] == 0
    made = [json.loads((tmp_path / n / "config.json").read_text())["conversion"] for n in ("a", "b")]
    assert made[0]["calibration"] == made[1]["calibration"]
    assert [m["refit_windows"] for m in made] == [4, 0]


def test_the_same_conversion_twice_writes_the_same_bytes(tmp_path, capsys):
    """Calibrated (bundled text, refit) conversions are deterministic, and the config says how they
    were made: the calibration text's sha256 and seed, the refit windows."""
    import hashlib

    from mlaify.convert.calibration import DEFAULT_CALIB_TEXT

    src = tmp_path / "src"
    tiny_model("llama-gqa").save_pretrained(src)
    char_tokenizer.save_pretrained(src)
    for name in ("a", "b"):
        argv = ["convert", src, tmp_path / name, "--kv-budget", 24, "--rope-dim", 4, "--refit-sequences", 8]
        assert run(capsys, *argv)[0] == 0
    for file in ("model.safetensors", "config.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file
    made = json.loads((tmp_path / "a" / "config.json").read_text())["conversion"]
    assert made["calibration"]["text_sha256"] == hashlib.sha256(DEFAULT_CALIB_TEXT.read_bytes()).hexdigest()
    assert made["calibration"]["seed"] == 0 and made["refit_windows"] == 8
    assert made["method"]["rope_strategy"] == "rotate"


def test_convert_then_info_reports_the_budget(source_dir, tmp_path, capsys):
    out = tmp_path / "mla"
    code, stdout, _ = run(
        capsys, "convert", source_dir, out, "--kv-budget", 24, "--rope-dim", 4, "--no-calib"
    )
    assert code == 0 and "| MLA | mlaify (float32) | 24 |" in stdout
    assert "| source | llama (float32) | 64 |" in stdout
    code, stdout, _ = run(capsys, "info", out, "--json")
    info = json.loads(stdout)
    assert code == 0
    assert info["kv_values_per_token_per_layer"] == 24 and info["kv_lora_rank"] == 16
    assert info["kv_reduction"] == pytest.approx(1 - 24 / 64)
    assert info["kv_reduction_at_4096"] == info["kv_reduction_at_32768"] == info["kv_reduction"]  # no windows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mla"]  # no temporary folder left beside it
    card = (out / "README.md").read_text()
    assert (
        "| values / token / layer | 64 | 24 |" in card and "62.5% smaller cache" in card and "# mla\n" in card
    )
    assert "Weight-only conversion" in card and f"mlaify convert {source_dir} {out}" in card
    assert "license: apache-2.0" in card  # the source's, from its own card


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
        (lambda src, out: ["convert", src, out, "--kv-budget", 24], "pass --no-calib"),  # no tokenizer
        (lambda src, out: ["convert", src, out, "--no-calib", "--query-fit-sequences", 4], "weights alone"),
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
    code, _, err = run(capsys, "convert", source_dir, out, "--kv-budget", 24, "--no-calib")
    assert code == 2 and "--overwrite" in err
    assert run(capsys, "convert", source_dir, out, "--kv-budget", 24, "--no-calib", "--overwrite")[0] == 0
    assert (out / "model.safetensors").is_file()


def test_unsupported_model_type(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    src = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(src)
    code, _, err = run(capsys, "convert", src, tmp_path / "out")
    assert code == 2 and "supported: llama, mistral, qwen2" in err
    assert not (tmp_path / "out").exists()


def _lie_about_a_shape(folder: Path) -> None:
    """Double the first dim of one tensor in the safetensors header (the data stays as it was)."""
    path = folder / "model.safetensors"
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"][0] *= 2
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + size :])


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _poison(folder: Path, value: float) -> None:
    """One value of one key projection set to NaN or Inf, saved back."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    weights = load_file(path)
    weights["model.layers.0.self_attn.k_proj.weight"][0, 0] = value
    save_file(weights, path, metadata={"format": "pt"})


WEIGHT_ONLY = ["--kv-budget", "24", "--rope-dim", "4", "--no-calib"]

# Damage done to a copy of a good source folder (with a tokenizer), the convert flags, what the one
# error line must say.
DAMAGES = {
    "no weights file": (lambda f: (f / "model.safetensors").unlink(), WEIGHT_ONLY, "no weights file"),
    "truncated weights": (
        lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:100]),
        WEIGHT_ONLY,
        "corrupt",
    ),
    "garbage header": (
        lambda f: (f / "model.safetensors").write_bytes(
            (f / "model.safetensors").read_bytes()[:8]
            + b"{not json"
            + (f / "model.safetensors").read_bytes()[17:]
        ),
        WEIGHT_ONLY,
        "corrupt",
    ),
    "header lies about a shape": (_lie_about_a_shape, WEIGHT_ONLY, "corrupt"),
    "config disagrees with the weights": (
        lambda f: _edit_config(f, intermediate_size=128),
        WEIGHT_ONLY,
        "do not have the shapes its config.json",
    ),
    "unsupported model_type": (lambda f: _edit_config(f, model_type="gpt2"), WEIGHT_ONLY, "supported: llama"),
    "NaN weight": (lambda f: _poison(f, float("nan")), WEIGHT_ONLY, "NaN or Inf"),
    "Inf weight, calibrated": (
        lambda f: _poison(f, float("inf")),
        ["--kv-budget", "24", "--rope-dim", "4"],
        "NaN or Inf",
    ),
    "calibration text shorter than one window": (
        lambda f: (f / "short.txt").write_text("too short"),
        ["--kv-budget", "24", "--rope-dim", "4", "--calib-text", "SRC/short.txt"],
        "0 windows of 512",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_source_is_one_line_and_writes_nothing(tmp_path, capsys, damage):
    import shutil

    do, flags, message = DAMAGES[damage]
    src = tmp_path / "src"
    tiny_model("llama-gqa").save_pretrained(src)
    char_tokenizer.save_pretrained(src)
    do(src)
    flags = [flag.replace("SRC", str(src)) for flag in flags]
    code, _, err = run(capsys, "convert", src, tmp_path / "out", *flags)
    assert code == 2 and message in err, err
    assert err.count("mlaify: error: ") == 1 and err.endswith("\n") and "Traceback" not in err
    assert "LOAD REPORT" not in err  # transformers' report of a failed load is not shown
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no temporary folder
    shutil.rmtree(src)


def test_an_unwritable_output_folder_is_refused_before_any_work(source_dir, tmp_path, capsys, monkeypatch):
    import os

    monkeypatch.setattr(os, "access", lambda path, mode: False)  # tests run as root, who may write anywhere
    code, _, err = run(capsys, "convert", source_dir, tmp_path / "new" / "out", *WEIGHT_ONLY)
    assert code == 2 and "choose a writable output folder" in err and "Loading" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "failure, code, message",
    [
        (OSError(28, "No space left on device"), 2, "No space left on device"),
        (PermissionError(13, "Permission denied"), 2, "Permission denied"),
        (KeyboardInterrupt(), 130, "interrupted"),  # Ctrl-C while the weights are being written
    ],
)
@pytest.mark.parametrize("layout", [[], ["--format", "deepseek_v3"]])  # streamed shards, save_pretrained
def test_a_failed_or_interrupted_write_leaves_nothing(
    source_dir, tmp_path, capsys, monkeypatch, failure, code, message, layout
):
    from transformers import PreTrainedModel

    import mlaify.shards

    def fail(folder):
        (Path(folder) / "model.safetensors").write_bytes(b"half")  # the write had begun
        raise failure

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", lambda self, folder, **kw: fail(folder))
    monkeypatch.setattr(mlaify.shards, "save_file", lambda tensors, path, **kw: fail(Path(path).parent))
    got, _, err = run(capsys, "convert", source_dir, tmp_path / "out", *WEIGHT_ONLY, *layout)
    assert got == code and message in err and err.count("mlaify: ") == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_source_repository_s_code_never_runs_unasked(source_dir, tmp_path, capsys):
    """A config whose auto_map points at the repository's own Python: refused with one line naming
    --trust-remote-code, and the code never runs; with the flag it does."""
    import shutil

    src, ran = tmp_path / "custom", tmp_path / "RAN"
    shutil.copytree(source_dir, src)
    char_tokenizer.save_pretrained(src)
    config = json.loads((src / "config.json").read_text())
    auto_map = {"AutoConfig": "configuration_custom.CustomLlamaConfig"}
    (src / "config.json").write_text(
        json.dumps({**config, "model_type": "custom_llama", "auto_map": auto_map})
    )
    (src / "configuration_custom.py").write_text(
        "from pathlib import Path\nfrom transformers import LlamaConfig\n"
        f"Path({str(ran)!r}).write_text('the repository code ran')\n"
        "class CustomLlamaConfig(LlamaConfig):\n    model_type = 'custom_llama'\n"
    )
    for argv in (["convert", src, tmp_path / "out", "--no-calib"], ["info", src], ["eval", src]):
        code, _, err = run(capsys, *argv)
        assert code == 2 and err.count("\n") == 1 and "--trust-remote-code" in err, argv
    assert not ran.exists() and not (tmp_path / "out").exists()
    run(capsys, "info", src, "--trust-remote-code")
    assert ran.exists()


def test_unreachable_hub_id_is_explained(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # no network wait in the test
    code, _, err = run(capsys, "convert", "someone/not-a-local-model", tmp_path / "out")
    assert code == 2 and "hub" in err and err.count("\n") == 1
