"""Evaluation: the perplexity protocol, local lm-eval tasks equal to the standard ones, reports, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import EVALDATA, tiny_model
from transformers import AutoModelForCausalLM, LlamaConfig

from mlaify.errors import MlaifyError
from mlaify.eval import EvalOptions, compare, evaluate_model
from mlaify.eval.harness import DEFAULT_TASKS
from mlaify.eval.perplexity import perplexity, perplexity_of_ids, tokenize_text

WIKI = EVALDATA / "wikitext2" / "wiki.test.raw"
needs_data = pytest.mark.skipif(not WIKI.is_file(), reason="needs ../shared/evaldata")

# First 16 hex digits of each data file's sha256, from evaldata/README.md.
README_SHA = {"wikitext2/wiki.test.raw": "173c87a53759e020", "piqa/validation.jsonl": "61533005e22f1755"}


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    from mlaify.loading import load_tokenizer

    return load_tokenizer(str(smollm2_path))


def tiny_lm(vocab: int, kv_heads: int = 2, seed: int = 0):
    """A random llama over the real SmolLM2 vocabulary, small enough for lm-eval runs in seconds."""
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny") / "src"
    tiny_lm(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ---------------------------------------------------------------- perplexity protocol


def test_perplexity_is_exp_mean_nll_over_windows():
    model = tiny_model("llama-gqa")
    ids = torch.randint(0, 96, (35,), generator=torch.Generator().manual_seed(0))
    result = perplexity_of_ids(model, ids, windows=3, seq_len=10, progress=False)
    nll = []
    with torch.no_grad():
        for i in range(3):
            w = ids[i * 10 : (i + 1) * 10]
            logp = model(w[None]).logits[0, :-1].log_softmax(-1)
            nll += (-logp.gather(1, w[1:, None])[:, 0]).tolist()
    assert len(nll) == result.predicted_tokens == 27
    assert result.perplexity == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)
    # fewer windows than asked when the text is short; none at all is a user error
    assert perplexity_of_ids(model, ids, windows=9, seq_len=10, progress=False).windows == 3
    with pytest.raises(MlaifyError, match="seq-len"):
        perplexity_of_ids(model, ids, windows=1, seq_len=64)


@needs_data
def test_text_is_tokenized_once_without_bos(tokenizer):
    ids = tokenize_text(WIKI, tokenizer)
    assert ids.numel() == 303_415
    assert ids[0].item() != tokenizer.bos_token_id
    assert tokenize_text(WIKI, tokenizer) is ids  # cached for the next model of a comparison
    with pytest.raises(MlaifyError, match="not found"):
        tokenize_text(WIKI.parent / "missing.txt", tokenizer)


@needs_data
def test_smollm2_two_windows(smollm2_path, tokenizer):
    """The first 2 windows of the reference protocol (the 32-window figure is a slow test)."""
    from mlaify.loading import load_model

    result = perplexity(load_model(str(smollm2_path)), tokenizer, WIKI, windows=2, progress=False)
    assert result.predicted_tokens == 2 * 2047
    assert result.perplexity == pytest.approx(18.9775, abs=2e-3)


# ---------------------------------------------------------------- local tasks


def _first_docs(name: str, n: int = 6) -> list[dict]:
    from mlaify.eval.tasks import local_data_file

    with open(local_data_file(name, EVALDATA)) as fh:
        return [json.loads(next(fh)) for _ in range(n)]


def _standard_task_on(name: str, docs: list[dict]):
    """lm-eval's own definition of `name`, fed `docs` instead of the hub dataset."""
    import datasets
    from lm_eval.api.task import ConfigurableTask

    from mlaify.eval.tasks import standard_task_config

    config = standard_task_config(name)
    for key in ("tag", "group"):
        config.pop(key, None)
    splits = {config.get(k) for k in ("training_split", "validation_split", "test_split", "fewshot_split")}
    dataset = datasets.DatasetDict({s: datasets.Dataset.from_list(docs) for s in splits if s})
    config["custom_dataset"] = lambda **_: dataset
    return ConfigurableTask(config=config)


def _rendered(task, n: int) -> list[tuple]:
    docs = list(task.eval_docs)[:n]
    choice = task.config.output_type == "multiple_choice"
    return [
        (task.doc_to_text(d), task.doc_to_choice(d) if choice else None, task.doc_to_target(d)) for d in docs
    ]


@needs_data
@pytest.mark.parametrize("name", DEFAULT_TASKS)
def test_local_task_renders_like_the_standard_task(name):
    from lm_eval.api.task import ConfigurableTask

    from mlaify.eval.tasks import local_task_config

    local = ConfigurableTask(config=local_task_config(name, EVALDATA))
    standard = _standard_task_on(name, _first_docs(name))
    assert _rendered(local, 6) == _rendered(standard, 6)
    assert local.config.output_type == standard.config.output_type
    assert local.config.metric_list == standard.config.metric_list
    assert local.config.metadata["version"] == standard.config.metadata["version"]
    assert local.config.metadata["local_data"].endswith(".jsonl")


@needs_data
def test_piqa_prompt_by_hand():
    """An independent check of the data schema: the prompt the piqa paper setup describes."""
    from lm_eval.api.task import ConfigurableTask

    from mlaify.eval.tasks import local_task_config

    doc = _first_docs("piqa", 1)[0]
    task = ConfigurableTask(config=local_task_config("piqa", EVALDATA))
    first = next(iter(task.eval_docs))
    assert task.doc_to_text(first) == f"Question: {doc['goal']}\nAnswer:"
    assert task.doc_to_choice(first) == [doc["sol1"], doc["sol2"]]


@needs_data
def test_shipped_yamls_load_through_lm_eval(monkeypatch):
    from lm_eval.tasks import TaskManager

    from mlaify.eval.tasks import LOCAL_DATA, TASKS_DIR, local_task_config

    names = sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))
    assert names == sorted(f"mlaify_{t}" for t in LOCAL_DATA)
    monkeypatch.delenv("MLAIFY_DATA", raising=False)
    manager = TaskManager(
        include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_dir": str(EVALDATA)}
    )
    task = manager.load("mlaify_arc_easy")["tasks"]["mlaify_arc_easy"]
    from lm_eval.api.task import ConfigurableTask

    local = ConfigurableTask(config=local_task_config("arc_easy", EVALDATA))
    assert task.config.task == "mlaify_arc_easy"
    assert _rendered(task, 4) == _rendered(local, 4)
    bare = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    with pytest.raises(MlaifyError, match="MLAIFY_DATA"):
        bare.load("mlaify_piqa")


# ---------------------------------------------------------------- harness, report, CLI


@needs_data
def test_run_tasks_on_a_tiny_model(tokenizer):
    from mlaify.eval.harness import run_tasks

    out = run_tasks(tiny_lm(len(tokenizer)), tokenizer, "piqa,lambada_openai", limit=3, data_dir=EVALDATA)
    piqa, lambada = out["tasks"]["piqa"], out["tasks"]["lambada_openai"]
    assert piqa["metric"] == "acc_norm" and 0 <= piqa["value"] <= 1 and piqa["samples"] == 3
    assert lambada["metric"] == "acc" and "perplexity" in lambada["metrics"]
    assert piqa["version"] == 1.0
    assert out["data_files"]["piqa/validation.jsonl"].startswith(README_SHA["piqa/validation.jsonl"])


@needs_data
def test_compare_writes_report(tmp_path, tiny_folder, tokenizer):
    vocab = len(tokenizer)
    smaller = [tiny_lm(vocab, kv_heads=1, seed=1), tiny_lm(vocab, kv_heads=1, seed=2)]
    options = EvalOptions(windows=2, seq_len=32, tasks="piqa", limit=2, data_dir=str(EVALDATA))
    report = compare(str(tiny_folder), smaller, tmp_path / "report", options, names=["mla-a", "mla-b"])
    rows = report["rows"]
    assert [r["model"] for r in rows] == [str(tiny_folder), "mla-a", "mla-b"]
    assert rows[0]["kv_reduction"] == 0 and rows[1]["kv_reduction"] == pytest.approx(0.5)
    assert rows[0]["kv_values_per_token_per_layer"] == 2 * 2 * 8
    source = report["source"]
    assert source["data_files"]["wikitext2/wiki.test.raw"].startswith(README_SHA["wikitext2/wiki.test.raw"])
    assert source["protocol"]["windows"] == 2 and source["task_versions"] == {"piqa": 1.0}
    assert {"torch", "transformers", "lm_eval", "mlaify"} <= set(source["versions"])
    assert source["wall_time_s"] > 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert md.count("\n| `") == 3 and "piqa (acc_norm, n=2)" in md and "50.0%" in md
    assert json.loads((tmp_path / "report" / "report.json").read_text())["rows"][2]["model"] == "mla-b"
    assert (tmp_path / "report" / "ppl_vs_kv.png").stat().st_size > 1000


@needs_data
def test_cli_eval_compare_and_convert_eval(tmp_path, tiny_folder, capsys):
    from mlaify.cli import main

    common = ["--windows", "1", "--seq-len", "16", "--data-dir", str(EVALDATA)]
    assert main(["eval", str(tiny_folder), *common, "--json", str(tmp_path / "r.json")]) == 0
    assert "| `src` | 32 |" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["perplexity"]["windows"] == 1
    assert main(["compare", str(tiny_folder), str(tiny_folder), *common, "--out", str(tmp_path / "c")]) == 0
    assert (tmp_path / "c" / "report.md").is_file() and not (tmp_path / "c" / "ppl_vs_kv.png").exists()
    capsys.readouterr()
    out = tmp_path / "mla"
    assert main(["convert", str(tiny_folder), str(out), "--kv-reduction", "0.5", "--eval", *common]) == 0
    table = capsys.readouterr().out.split("saved to")[-1]
    assert "| `src` | 32 |" in table and "| `mla` | 16 |" in table
    assert (tmp_path / "mla-eval" / "report.json").is_file()
    assert main(["eval", str(out), *common]) == 0  # one converted model: its reduction, not 0%
    assert "| `mla` | 16 | 128 | 50.0% |" in capsys.readouterr().out
    assert main(["tasks"]) == 0 and capsys.readouterr().out.strip().endswith("mlaify/eval/tasks")
    assert main(["eval", str(tiny_folder), "--limit", "0"]) == 2
    assert "--limit" in capsys.readouterr().err


def test_user_errors(tmp_path, monkeypatch):
    from mlaify.eval.tasks import local_task_config

    monkeypatch.delenv("MLAIFY_DATA", raising=False)
    model = tiny_model("llama-gqa")
    with pytest.raises(MlaifyError, match="--ppl-text"):
        evaluate_model(model, EvalOptions(), tokenizer=object())
    with pytest.raises(MlaifyError, match="data dir does not exist"):
        evaluate_model(model, EvalOptions(data_dir=str(tmp_path / "nope")), tokenizer=object())
    with pytest.raises(MlaifyError, match="needs its tokenizer"):
        evaluate_model(model, EvalOptions(windows=0))
    with pytest.raises(MlaifyError, match="no local data"):
        local_task_config("mmlu_nonexistent", EVALDATA)
    with pytest.raises(MlaifyError, match="--windows"):
        EvalOptions(windows=-1)
