"""Healing (mlaify/heal/): distillation of a lossy tiny conversion toward its source, and its CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import char_tokenizer, tiny_model
from transformers import DynamicCache, TrainerCallback

from mlaify import MLAConversionConfig, convert_to_mla
from mlaify.cli import main
from mlaify.errors import MlaifyError
from mlaify.geometry import kv_geometry
from mlaify.heal import HealConfig, heal
from mlaify.heal.distill import distillation_loss, hidden_state_loss

# 32 steps of 4 x 32 tokens; lr high enough that a tiny model moves visibly in that many steps.
CFG = HealConfig(
    tokens=32 * 128, seq_len=32, batch_size=4, lr=3e-3, warmup=0.0, eval_windows=4, eval_seq_len=32
)


def random_text(n: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    return "".join(chr(32 + i) for i in torch.randint(0, 95, (n,), generator=g).tolist())


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """A training text and a held-out text that shares none of its windows."""
    root = tmp_path_factory.mktemp("heal")
    (root / "train.txt").write_text(random_text(8000, 0))
    (root / "heldout.txt").write_text(random_text(2000, 1))
    return root / "train.txt", root / "heldout.txt"


def pair(name: str = "llama-gqa"):
    """A tiny source (teacher) and its lossy weight-only conversion (student)."""
    teacher = tiny_model(name)
    student = convert_to_mla(teacher, MLAConversionConfig(kv_budget=24, qk_rope_head_dim=4))
    return student, teacher


def held_out_kd(student, teacher, path) -> float:
    ids = torch.tensor(char_tokenizer(path.read_text())["input_ids"][: 16 * 32]).view(16, 32)
    with torch.no_grad():
        return float(distillation_loss(student(ids).logits, teacher(ids).logits, ids, "kd"))


def healed(cfg=CFG, texts=None, **kw):
    student, teacher = pair()
    return heal(student, teacher, texts, cfg, tokenizer=char_tokenizer, progress=False, **kw), teacher


# kd+lm gains less: on random text the LM term pulls toward the text, not toward the teacher.
@pytest.mark.parametrize(
    "name, loss, hidden, ratio",
    [
        ("llama-gqa", "kd", 0.0, 0.9),
        ("llama-gqa", "kd+lm", 0.0, 0.99),
        ("llama-gqa", "kd", 1.0, 0.9),
        ("llama-gqa", "lm", 1.0, 0.99),
        ("gemma3", "kd", 0.0, 0.9),  # qk-norm, sliding layers, tied embeddings
    ],
)
def test_healing_lowers_the_distillation_loss_on_held_out_text(texts, name, loss, hidden, ratio):
    student, teacher = pair(name)
    before = held_out_kd(student, teacher, texts[1])
    cfg = replace(CFG, loss=loss, hidden_weight=hidden)
    heal(student, teacher, texts[0], cfg, tokenizer=char_tokenizer, progress=False)
    after = held_out_kd(student, teacher, texts[1])
    assert after < ratio * before, (before, after)


def plain_distillation_loss(student_logits, teacher_logits, ids, kind, t):
    """The loss written with plain autograd ops, to check the fused one against."""
    terms = []
    if "kd" in kind:
        log_p_s = F.log_softmax(student_logits.float() / t, dim=-1).flatten(0, 1)
        log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1).flatten(0, 1)
        terms.append(F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * t * t)
    if "lm" in kind:
        logits = student_logits[:, :-1].float().flatten(0, 1)
        terms.append(F.cross_entropy(logits, ids[:, 1:].flatten()))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("kind", ["kd", "lm", "kd+lm"])
@pytest.mark.parametrize("t", [1.0, 2.0])
def test_fused_loss_and_gradient_equal_plain_autograd(kind, t, monkeypatch):
    """The fused loss (closed-form gradient, chunks of rows) equals the textbook formula in value and
    gradient, with chunks that do not divide the rows; under no_grad it gives the same value."""
    from mlaify.heal import distill

    monkeypatch.setattr(distill, "CHUNK_VALUES", 7 * 50)  # 7 rows of a 50-token vocabulary
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (3, 11), generator=g)
    student = (torch.randn(3, 11, 50, generator=g, dtype=torch.float64) * 3).requires_grad_()
    teacher = torch.randn(3, 11, 50, generator=g, dtype=torch.float64) * 3
    want = plain_distillation_loss(student, teacher, ids, kind, t)
    (want_grad,) = torch.autograd.grad(want * 0.5, student)
    got = distillation_loss(student, teacher, ids, kind, t)
    (got_grad,) = torch.autograd.grad(got * 0.5, student)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-6, atol=1e-9)
    with torch.no_grad():  # loss only, no gradient: the same value
        assert torch.equal(distillation_loss(student, teacher, ids, kind, t), got.detach())


def test_hidden_state_loss_is_zero_on_the_teachers_own_states_and_scale_free():
    teacher = tiny_model("llama-gqa")
    student, _ = pair()
    ids = torch.randint(0, teacher.config.vocab_size, (2, 16))
    with torch.no_grad():
        t = teacher(ids, output_hidden_states=True).hidden_states
        s = student(ids, output_hidden_states=True).hidden_states
    assert float(hidden_state_loss(t, t)) == 0.0
    loss = hidden_state_loss(s, t)
    assert loss > 0
    torch.testing.assert_close(hidden_state_loss([3 * h for h in s], [3 * h for h in t]), loss)


@pytest.mark.parametrize(
    "train, learns",
    [
        ("attention", (".self_attn.",)),
        ("attention+norms", (".self_attn.", "norm.")),
        ("all", ("",)),
    ],
)
def test_only_the_chosen_parameters_learn(texts, train, learns):
    student, teacher = pair()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    student.lm_head.requires_grad_(False)  # the caller's own choice, restored after healing
    flags = {name: p.requires_grad for name, p in student.named_parameters()}
    heal(student, teacher, texts[0], replace(CFG, train=train), tokenizer=char_tokenizer, progress=False)
    assert {name: p.requires_grad for name, p in student.named_parameters()} == flags
    for name, value in student.state_dict().items():
        if name.endswith("rope_dims"):
            continue
        changed = not torch.equal(value, before[name])
        assert changed == any(k in name for k in learns), name
    # The cache content learns too: training changes what it writes, not how much.
    assert not torch.equal(
        student.model.layers[0].self_attn.kv_a_proj_with_mqa.weight,
        before["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"],
    )


def test_geometry_and_cache_size_are_unchanged(texts):
    student, teacher = pair()
    geometry = kv_geometry(student.config, student.num_parameters())
    heal(student, teacher, texts[0], CFG, tokenizer=char_tokenizer, progress=False)
    assert kv_geometry(student.config, student.num_parameters()) == geometry
    cache = DynamicCache(config=student.config)
    with torch.no_grad():
        student(torch.zeros(1, 10, dtype=torch.long), cache=cache, use_cache=True)
    assert [layer.stores[0].shape[-1] for layer in cache.layers] == [24, 24]  # r + rope values per token


def test_the_same_seed_gives_the_same_weights(texts):
    a, b = (healed(texts=texts[0])[0].state_dict() for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = healed(replace(CFG, seed=1), texts[0])[0].state_dict()
    assert not all(torch.equal(a[k], c[k]) for k in a)


class StopAt(TrainerCallback):
    """Interrupts training after `step` (its checkpoint is written first)."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(texts, tmp_path):
    cfg = replace(CFG, save_every=12 * CFG.tokens_per_step)
    whole = healed(cfg, texts[0], checkpoint_dir=tmp_path / "whole")[0].state_dict()
    healed(cfg, texts[0], checkpoint_dir=tmp_path / "cut", callbacks=[StopAt(12)])
    assert (tmp_path / "cut" / "checkpoint-12").is_dir()
    # a save cut off by a kill: no trainer_state.json, so the resume takes checkpoint-12
    (tmp_path / "cut" / "checkpoint-24").mkdir()
    (tmp_path / "cut" / "checkpoint-24" / "model.safetensors").write_bytes(b"cut off")
    resumed = healed(cfg, texts[0], checkpoint_dir=tmp_path / "cut", resume=True)[0]
    assert resumed.heal_log["history"][-1]["step"] == 32
    assert all(torch.allclose(whole[k], v, atol=1e-6, rtol=0) for k, v in resumed.state_dict().items())


def test_eval_text_is_scored_at_the_start_every_n_tokens_and_the_end(texts):
    cfg = replace(CFG, eval_every=12 * CFG.tokens_per_step, eval_at=(CFG.tokens_per_step,))
    student, _ = healed(cfg, texts[0], eval_texts=texts[1])
    steps = [row["step"] for row in student.heal_log["history"] if "eval_perplexity" in row]
    assert steps == [0, 1, 12, 24, 32]
    ppl = [row["eval_perplexity"] for row in student.heal_log["history"] if "eval_perplexity" in row]
    assert ppl[-1] < ppl[0]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(train="mlp"), "unknown heal train 'mlp'"),
        (dict(loss="mse"), "unknown heal loss"),
        (dict(tokens=100), "less than one optimizer step"),
        (dict(warmup=1.5), "fraction"),
        (dict(lr=0.0), "must be > 0"),
    ],
)
def test_bad_config_is_refused(change, message):
    with pytest.raises(MlaifyError, match=message):
        replace(CFG, **change)


def test_bad_pairs_and_texts_are_refused(texts, tmp_path):
    student, teacher = pair()
    other = tiny_model("llama-gqa", vocab_size=128)
    with pytest.raises(MlaifyError, match="vocabulary"):
        heal(student, other, texts[0], CFG, tokenizer=char_tokenizer)
    with pytest.raises(MlaifyError, match="not found"):
        heal(student, teacher, tmp_path / "missing.txt", CFG, tokenizer=char_tokenizer)
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(MlaifyError, match="no window of 32 tokens"):
        heal(student, teacher, tmp_path / "short.txt", CFG, tokenizer=char_tokenizer)
    with pytest.raises(MlaifyError, match="no checkpoint to resume"):
        heal(student, teacher, texts[0], CFG, tokenizer=char_tokenizer, checkpoint_dir=tmp_path, resume=True)


# --- the command line -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory, texts):
    """A tiny source folder with a saveable character tokenizer, and its converted folder."""
    root = tmp_path_factory.mktemp("heal-cli")
    src, mla = root / "src", root / "mla"
    tiny_model("llama-gqa").save_pretrained(src)
    char_tokenizer.save_pretrained(src)
    assert main(["convert", str(src), str(mla), "--kv-budget", "24", "--rope-dim", "4"]) == 0
    return src, mla


HEAL_FLAGS = ["--tokens", "1024", "--seq-len", "32", "--batch-size", "4", "--lr", "3e-3"]


def test_heal_cli_writes_the_model_its_log_and_curve(folders, texts, tmp_path, capsys):
    src, mla = folders
    out = tmp_path / "healed"
    argv = [
        "heal",
        mla,
        out,
        "--teacher",
        src,
        "--train-text",
        texts[0],
        "--eval-text",
        texts[1],
        *HEAL_FLAGS,
    ]
    argv += ["--eval-seq-len", "32", "--save-every", "512"]
    assert main([str(a) for a in argv]) == 0
    assert "eval perplexity" in capsys.readouterr().out
    assert {"model.safetensors", "config.json", "heal_log.json", "heal_curve.png"} <= {
        p.name for p in out.iterdir()
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["healed"]  # no checkpoints or temporary folder left
    log = json.loads((out / "heal_log.json").read_text())
    assert log["tokens"] == 1024 and log["config"]["train"] == "attention"
    card = (out / "README.md").read_text()
    assert "Healed (`mlaify heal`): 1,024 tokens" in card and "Eval perplexity while healing" in card
    infos = []
    for folder in (out, mla):
        assert main(["info", str(folder), "--json"]) == 0
        infos.append(json.loads(capsys.readouterr().out))
    assert infos[0] == infos[1]


def test_convert_can_heal_before_saving(folders, texts, tmp_path):
    src, _ = folders
    out = tmp_path / "mla-healed"
    argv = ["convert", src, out, "--kv-budget", "24", "--rope-dim", "4", "--heal-text", texts[0]]
    assert main([str(a) for a in [*argv, "--heal-tokens", "4096"]]) == 0
    assert json.loads((out / "heal_log.json").read_text())["tokens"] == 4096


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--train", "mlp"], "unknown heal train 'mlp'"),
        (["--tokens", "16"], "less than one optimizer step"),
        (["--train-text", "missing.txt"], "text file not found"),
    ],
)
def test_heal_cli_bad_input_is_one_line_and_writes_nothing(folders, texts, tmp_path, capsys, extra, message):
    src, mla = folders
    out = tmp_path / "out"
    argv = ["heal", mla, out, "--teacher", src, "--train-text", texts[0], *HEAL_FLAGS, *extra]
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not out.exists()


def test_heal_cli_refuses_a_teacher_with_another_vocabulary(folders, texts, tmp_path, capsys):
    _, mla = folders
    other = tmp_path / "other"
    tiny_model("llama-gqa", vocab_size=128).save_pretrained(other)
    out = tmp_path / "out"
    argv = ["heal", mla, out, "--teacher", other, "--train-text", texts[0], *HEAL_FLAGS]
    assert main([str(a) for a in argv]) == 2
    assert "vocabulary" in capsys.readouterr().err and not out.exists()


def test_blockwise_stage_lowers_every_layers_attention_error_and_trains_only_attention(texts):
    from mlaify.heal.blockwise import blockwise_distill
    from mlaify.heal.data import training_windows

    student, teacher = pair()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    windows = training_windows(texts[0], char_tokenizer, 32)[:16]
    errors = blockwise_distill(student, teacher, windows, epochs=4, lr=3e-3, progress=False)
    assert len(errors) == 2 and all(after < 0.9 * first for first, after in errors), errors
    for name, value in student.state_dict().items():
        assert torch.equal(value, before[name]) != (".self_attn." in name and "rope_dims" not in name), name


def test_blockwise_alone_is_a_heal_run_with_no_tokens(texts):
    cfg = replace(CFG, tokens=0, blockwise_windows=16, blockwise_lr=3e-3)
    student, teacher = healed(cfg, texts[0], eval_texts=texts[1])
    log = student.heal_log
    assert log["tokens"] == 0 and len(log["blockwise_errors"]) == 2
    assert [row["step"] for row in log["history"] if "eval_perplexity" in row] == [0]
    with pytest.raises(MlaifyError, match="trains nothing"):
        replace(CFG, tokens=0)
