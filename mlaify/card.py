"""The model card (`README.md`) in every output folder: what the checkpoint is, how it was made, what
its KV cache costs against the source's, how well it scores where that was measured, how to load it.

Everything comes from the folder itself (config.json with its `conversion` record, heal_log.json
when the model was healed) and from the source's own card (its license), so the same command
writes the same card.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from . import __version__
from .geometry import CONTEXTS, kv_geometry, sliding_windows

CARD_FILE = "README.md"


def _front_matter(src: str, key: str) -> str | None:
    """`key:` of a local model's card front matter, if it has one."""
    card = Path(src) / CARD_FILE if Path(src).is_dir() else Path(src).with_name(CARD_FILE)
    if not card.is_file():
        return None
    front = re.match(r"---\n(.*?)\n---", card.read_text(encoding="utf-8", errors="replace"), re.S)
    found = re.search(rf"^{key}:\s*(\S+)", front.group(1), re.M) if front else None
    return found.group(1).strip("'\"") if found else None


def source_license(src: str) -> str | None:
    """The `license:` of a local source's model card front matter, if it has one."""
    return _front_matter(src, "license")


def _geometry_rows(config) -> list[str]:
    geo = kv_geometry(config)
    layers, nbytes = geo["num_layers"], geo["kv_bytes_per_token"] / geo["kv_values_per_token"]
    source_values = geo["source_kv_values_per_token_per_layer"] * layers
    rows = [
        (
            "values / token / layer",
            geo["source_kv_values_per_token_per_layer"],
            geo["kv_values_per_token_per_layer"],
        ),
        (
            f"bytes / token ({geo['dtype']})",
            f"{source_values * nbytes:,.0f}",
            f"{geo['kv_bytes_per_token']:,}",
        ),
    ]
    rows += [
        (
            f"MiB at {context // 1024}k context",
            f"{geo[f'source_kv_bytes_at_{context}'] / 2**20:.1f}",
            f"{geo[f'kv_bytes_at_{context}'] / 2**20:.1f}",
        )
        for context in CONTEXTS
    ]
    lines = ["| KV cache | source | this model |", "|---|---|---|"]
    lines += [f"| {name} | {a} | {b} |" for name, a, b in rows]
    ranks = config.kv_lora_rank
    if isinstance(ranks, list):  # per layer; 0 where a layer kept the source's attention
        ranks = [r for r in ranks if r] or [0]
        rank = f"{min(ranks)}-{max(ranks)} by layer" if len(set(ranks)) > 1 else str(ranks[0])
    else:
        rank = str(ranks)
    windows = [w for w in sliding_windows(config.get_text_config(decoder=True)) if w is not None]
    saved = f"{geo['kv_reduction']:.1%} smaller cache"
    if windows:  # windowed layers hold at most their window: the saving depends on the context
        shares = " / ".join(f"{geo[f'kv_reduction_at_{c}']:.1%}" for c in CONTEXTS)
        saved = f"{shares} smaller cache at {' / '.join(f'{c // 1024}k' for c in CONTEXTS)} context"
    lines += [
        "",
        f"{saved}. Per token and layer it holds the latent `c_kv` "
        f"(`kv_lora_rank` {rank}) and {getattr(config, 'n_rope_heads', 1)} rope key(s) of "
        f"{config.qk_rope_head_dim} dims (`k_rope`)"
        + (
            f", and {config.num_key_scales} key scale(s) `1 / RMS(k)` that carry the source's key norm."
            if getattr(config, "qk_norm", False)
            else "."
        ),
    ]
    kept = getattr(config, "source_attention_layers", None)
    if kept:
        lines.append(
            f"Layers {', '.join(map(str, kept))} (sliding-window ones) keep the source's attention and its "
            "cache; the others are MLA."
        )
    if windows:
        lines.append(
            f"{len(windows)} of {layers} layers attend in a sliding window of {max(windows)} tokens and keep "
            "only that many in their cache, so the cache is quoted at two context lengths."
        )
    exported = getattr(config, "mlaify_export", None)
    if exported:
        ours = exported["mlaify_kv_values_per_token"] / layers
        lines.append(
            f"The mlaify checkpoint it was exported from caches {ours:g} values per token and layer; the "
            "export holds the same, plus any latent slots that pad every layer to the largest rank and "
            "any rope slots needed to give every layer's rope frequencies a place in one shared table."
        )
    return lines


def _made_lines(conversion: dict | None, command: list[str] | None, heal_log: dict | None) -> list[str]:
    lines = []
    if command:
        lines += ["```bash", "mlaify " + shlex.join(command), "```", ""]
    if conversion:
        method = conversion["method"]
        lines.append(
            f"- Conversion: low-rank `{method.get('lowrank')}`, rope `{method.get('rope_strategy')}`, "
            f"ranks `{method.get('rank_allocation')}` (mlaify {conversion['mlaify_version']})."
        )
        calib = conversion.get("calibration")
        if calib:
            from .convert.calibration import DEFAULT_CALIB_TEXT, text_digest

            bundled = calib["text_sha256"] == text_digest(DEFAULT_CALIB_TEXT)
            text = "mlaify's bundled Gutenberg text" if bundled else "a text"
            lines.append(
                f"- Calibration: {calib['num_sequences']} windows of {calib['seq_len']} tokens (seed "
                f"{calib['seed']}) of {text} with sha256 `{calib['text_sha256'][:16]}...`; refit on "
                f"{conversion['refit_windows']} windows, query fit on {conversion['query_fit_windows']}."
            )
        else:
            lines.append("- Weight-only conversion: no calibration, no refit.")
    if heal_log:
        cfg = heal_log["config"]
        lines.append(
            f"- Healed (`mlaify heal`): {heal_log['tokens']:,} tokens, loss `{cfg['loss']}`, "
            f"training `{cfg['train']}`, lr {cfg['lr']:g} ({cfg['schedule']}), seed {cfg['seed']}; "
            "log and curve in `heal_log.json` / `heal_curve.png`."
        )
        curve = [r for r in heal_log["history"] if "eval_perplexity" in r]
        if curve:
            points = ", ".join(f"{r['tokens']:,}: {r['eval_perplexity']:.2f}" for r in curve)
            lines.append(
                f"- Eval perplexity while healing ({cfg['eval_windows']} x {cfg['eval_seq_len']} tokens; "
                f"tokens: perplexity): {points}."
            )
    return lines


def _loading_lines(config, name: str) -> list[str]:
    if config.model_type == "mlaify":
        return [
            "```python",
            "import mlaify  # registers the MLA classes with transformers",
            "from transformers import AutoModelForCausalLM",
            f'model = AutoModelForCausalLM.from_pretrained("{name}")',
            "# without mlaify installed, with the modeling files in this folder:",
            f'model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)',
            "```",
            "",
            "Generation caches only `c_kv` and `k_rope`, and decodes in the absorbed form.",
        ]
    from .export import vllm_obstacles  # the export module imports transformers' DeepSeek-V3 classes

    obstacles = vllm_obstacles(config)
    serving = (
        "Its geometry, projections and RoPE table are ones vLLM's and SGLang's DeepSeek attention "
        f"reads (`vllm serve {name}`; not run on this project's machines)."
        if not obstacles
        else "vLLM and SGLang cannot serve it exactly: " + "; ".join(obstacles) + "."
    )
    return [
        f"The stock DeepSeek-V3 layout (`{config.model_type}`): no custom code, no mlaify needed.",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        f'model = AutoModelForCausalLM.from_pretrained("{name}")',
        "```",
        "",
        "transformers computes this model's function with it (the export is exact to float32 "
        "round-off). " + serving,
    ]


def model_card(
    folder: str | Path,
    source: str,
    command: list[str] | None = None,
    evaluation: str | None = None,
    name: str | None = None,
) -> str:
    """The card of the checkpoint in `folder` (to be called `name`, default the folder's), converted
    from (or healed toward) `source`; for an export, `source` is the mlaify checkpoint it came from,
    whose card names the original source and its license."""
    from transformers import AutoConfig

    import mlaify  # noqa: F401  (registers the config class)

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    log_file = folder / "heal_log.json"
    heal_log = json.loads(log_file.read_text()) if log_file.is_file() else None
    license_ = source_license(source)
    base = Path(source).name if Path(source).exists() else source
    name = name or folder.name
    exported = getattr(config, "mlaify_export", None) is not None
    if exported:
        base = _front_matter(source, "base_model") or base
    lines = [
        "---",
        f"base_model: {base}",
        f"license: {license_ or 'other'}",
        "library_name: transformers",
        "tags: [mlaify, mla, multi-head-latent-attention]",
        "---",
        "",
        f"# {name}",
        "",
        f"`{base}` converted to Multi-head Latent Attention (MLA, DeepSeek-V2/V3 style) by "
        f"[mlaify](https://pypi.org/project/mlaify/) {__version__}: the KV cache holds a small latent and a "
        "decoupled RoPE key per token instead of the source's keys and values."
        + (
            f" Exported from the mlaify checkpoint `{Path(source).name}` to the stock DeepSeek-V3 layout."
            if exported
            else ""
        ),
        "",
        *_geometry_rows(config),
        "",
        "## How it was made",
        "",
        *_made_lines(getattr(config, "conversion", None), command, heal_log),
    ]
    if evaluation:
        lines += ["", "## Evaluation", "", evaluation.strip()]
    lines += ["", "## How to load", "", *_loading_lines(config, name), ""]
    lines += [
        "## License",
        "",
        f"The source's: {license_}."
        if license_
        else "The source's (not recorded here: see the source's own card).",
    ]
    return "\n".join(lines) + "\n"


def write_model_card(folder: str | Path, source: str, **options) -> None:
    """`model_card(folder, source, **options)` written to `folder/README.md`."""
    (Path(folder) / CARD_FILE).write_text(model_card(folder, source, **options), encoding="utf-8")
