"""What a healed checkpoint carries beside its weights: the training log as JSON and the eval curve."""

from __future__ import annotations

import json
from pathlib import Path

LOG_FILE = "heal_log.json"
CURVE_FILE = "heal_curve.png"


def eval_curve(heal_log: dict) -> list[tuple[int, float]]:
    """(tokens, eval perplexity) at every evaluation of the run."""
    return [
        (row["tokens"], row["eval_perplexity"]) for row in heal_log["history"] if "eval_perplexity" in row
    ]


def write_heal_log(folder: Path, heal_log: dict) -> None:
    """`heal_log.json`, and `heal_curve.png` when the run was evaluated."""
    (folder / LOG_FILE).write_text(json.dumps(heal_log, indent=2) + "\n")
    curve = eval_curve(heal_log)
    if curve:
        plot_curves({"eval text": curve}, folder / CURVE_FILE)


def plot_curves(
    curves: dict[str, list[tuple[int, float]]],
    path: Path,
    title: str = "healing",
    reference: float | None = None,
) -> None:
    """Eval perplexity against training tokens, one line per named curve (and the source's, if given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        ax.plot([t for t, _ in points], [p for _, p in points], marker="o", label=name)
    if reference is not None:
        ax.axhline(reference, color="black", linestyle="--", label=f"source ({reference})")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("eval perplexity")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")  # beside: never over a curve
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
