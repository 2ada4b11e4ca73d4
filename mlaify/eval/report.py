"""Source vs converted models on one protocol: `report.json`, `report.md` and `ppl_vs_kv.png`.

KV reduction is measured in cached values (dtype-independent) against the source; bytes per token
are shown at each model's own dtype.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

from ..errors import MlaifyError
from .evaluate import EvalOptions, evaluate_model, library_versions, model_name, write_json

log = logging.getLogger(__name__)


def compare(
    src,
    models: list,
    out_dir: str | Path,
    options: EvalOptions | None = None,
    names: list[str] | None = None,
    tokenizer=None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Evaluate `src` and each of `models` (paths or loaded models) on one protocol and write the report.

    The source's tokenizer is used for every model (conversion keeps the vocabulary). Models given
    as paths are loaded one at a time and freed after their evaluation.
    """
    from ..loading import load_tokenizer

    if not models:
        raise MlaifyError("compare needs at least one converted model besides the source")
    if names is not None and len(names) != len(models):
        raise MlaifyError(f"got {len(names)} names for {len(models)} models; give one name per model")
    options = options or EvalOptions()
    if tokenizer is None:
        if not isinstance(src, (str, Path)):
            raise MlaifyError("an in-memory source model needs its tokenizer: pass tokenizer=")
        tokenizer = load_tokenizer(str(src), trust_remote_code)
    source = evaluate_model(src, options, tokenizer, trust_remote_code=trust_remote_code)
    results = []
    for i, model in enumerate(models):
        name = names[i] if names else None
        results.append(
            evaluate_model(model, options, tokenizer, name=name, trust_remote_code=trust_remote_code)
        )
        gc.collect()
    return write_report(source, results, out_dir)


def write_report(
    source: dict[str, Any],
    results: list[dict[str, Any]],
    out_dir: str | Path,
    prefix: str = "report",
    notes: list[str] | None = None,
) -> dict[str, Any]:
    """Write `report.json`, `report.md` and (for two or more converted models) `ppl_vs_kv.png`.

    Another `prefix` names them `<prefix>.json`, `<prefix>.md` and `<prefix>_ppl_vs_kv.png`;
    `notes` are extra lines for the markdown (e.g. models that could not be built).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [_row(source, source)] + [_row(r, source) for r in results]
    report = {
        "source": source,
        "models": results,
        "rows": rows,
        "versions": library_versions(),
        "notes": notes or [],
    }
    write_json(report, out / f"{prefix}.json")
    (out / f"{prefix}.md").write_text(render_markdown(report))
    if len(results) >= 2:
        plot_ppl_vs_kv(rows, out / ("ppl_vs_kv.png" if prefix == "report" else f"{prefix}_ppl_vs_kv.png"))
    log.info("report written to %s", out)
    return report


def _row(result: dict[str, Any], source: dict[str, Any] | None) -> dict[str, Any]:
    """A table row; the KV reduction against `source`'s evaluation (compare), or with None (one model's
    `mlaify eval`) against the source cache its own geometry records."""
    geo = result["geometry"]
    if source is None:  # kv_geometry's figure, against the source the model was converted from
        reduction = geo["kv_reduction"]
    else:
        reduction = 1 - geo["kv_values_per_token"] / source["geometry"]["kv_values_per_token"]
    accs = {t: info["value"] for t, info in result["tasks"].items() if info["value"] is not None}
    return {
        "model": result["model"],
        "kv_values_per_token_per_layer": geo["kv_values_per_token_per_layer"],
        "kv_bytes_per_token": geo["kv_bytes_per_token"],
        "kv_reduction": reduction,
        "perplexity": (result.get("perplexity") or {}).get("perplexity"),
        "tasks": {
            t: (info["value"], info["stderr"], info["metric"], info["samples"])
            for t, info in result["tasks"].items()
        },
        "average": sum(accs.values()) / len(accs) if accs else None,
    }


def _pct(value: float | None, stderr: float | None = None) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f} ± {100 * stderr:.1f}" if stderr is not None else f"{100 * value:.1f}"


def render_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: one row per model, task cells as accuracy % ± stderr."""
    tasks = list(dict.fromkeys(t for row in rows for t in row["tasks"]))
    metric = {t: row["tasks"][t][2:] for row in rows for t in row["tasks"]}  # (metric, documents)
    head = ["model", "KV values/token/layer", "KV bytes/token", "KV reduction", "perplexity"]
    head += [f"{t} ({metric[t][0]}, n={metric[t][1]})" for t in tasks] + (["average"] if tasks else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        ppl = f"{row['perplexity']:.4f}" if row["perplexity"] is not None else "–"
        cells = [
            f"`{Path(row['model']).name or row['model']}`",
            str(row["kv_values_per_token_per_layer"]),
            f"{row['kv_bytes_per_token']:,}",
            f"{100 * row['kv_reduction']:.1f}%",
            ppl,
        ]
        cells += [_pct(*row["tasks"][t][:2]) if t in row["tasks"] else "–" for t in tasks]
        if tasks:
            cells.append(_pct(row["average"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_markdown(report: dict[str, Any]) -> str:
    source = report["source"]
    proto = source["protocol"]
    ppl = source.get("perplexity")
    notes = ["# MLA conversion report", "", render_table(report["rows"])]
    if ppl:
        notes.append(
            f"Perplexity: `{Path(ppl['text']).name}`, {ppl['windows']} windows x {ppl['seq_len']} tokens "
            f"({ppl['predicted_tokens']:,} predicted tokens), exp(mean NLL), float32."
        )
    if source["tasks"]:
        limit = f"the first {proto['limit']} documents of each task" if proto["limit"] else "all documents"
        notes.append(
            f"Tasks: lm-eval zero-shot, {limit}; accuracy in % ± stderr, `acc_norm` where the task has it. "
            f"Data: {'local files in ' + proto['data_dir'] if proto['data_dir'] else 'standard datasets'}."
        )
    notes.append(
        "KV reduction: cached values per token, relative to the source; bytes at each model's dtype."
    )
    notes += report.get("notes", [])
    notes.append("Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".")
    return "\n".join(notes[:3] + [f"- {line}" for line in notes[3:]]) + "\n"


def plot_ppl_vs_kv(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Perplexity and average accuracy against KV bytes per token; the source is a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    source, converted = rows[0], sorted(rows[1:], key=lambda r: r["kv_bytes_per_token"])
    panels = [(k, label) for k, label in (("perplexity", "perplexity"), ("average", "average accuracy"))]
    panels = [(k, label) for k, label in panels if source[k] is not None]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5 * max(len(panels), 1), 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels, strict=False):
        xs = [r["kv_bytes_per_token"] for r in converted]
        ys = [r[key] for r in converted]
        ax.plot(xs, ys, "o-", label="MLA")
        for r in converted:
            ax.annotate(f"-{100 * r['kv_reduction']:.0f}%", (r["kv_bytes_per_token"], r[key]), fontsize=8)
        ax.axhline(source[key], color="gray", linestyle="--", label="source")
        ax.set_xlabel("KV bytes per token")
        ax.set_ylabel(label)
        if key == "perplexity":
            ax.set_yscale("log")  # converted models can be orders of magnitude above the source
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def result_table(result: dict[str, Any]) -> str:
    """Table of one evaluation (what `mlaify eval` prints)."""
    return render_table([_row(result, None)])


__all__ = [
    "compare",
    "model_name",
    "plot_ppl_vs_kv",
    "render_markdown",
    "render_table",
    "result_table",
    "write_report",
]
