"""Zero-shot lm-eval benchmarks on an in-memory model, from local data or the standard hub datasets.

The loaded model goes straight into `HFLM(pretrained=model)`: no re-loading, and converted MLA
models evaluate exactly like their source. With a data dir each task is `mlaify.eval.tasks`'
local copy of the standard task (same prompts and metrics, local jsonl documents) and keeps the
standard name, so results read the same online and offline.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import MlaifyError
from .data import resolve_data_dir, sha256

log = logging.getLogger(__name__)

DEFAULT_TASKS = (
    "hellaswag",
    "piqa",
    "arc_easy",
    "arc_challenge",
    "winogrande",
    "openbookqa",
    "boolq",
    "lambada_openai",
)
# Bootstrap resamples for the stderr of non-mean metrics (lambada perplexity); lm-eval's 100k is slow on CPU.
BOOTSTRAP_ITERS = 1000


@lru_cache(maxsize=2)
def task_manager(standard: bool = True):
    """One lm-eval task registry per process; without `standard` it skips indexing the built-in
    tasks (~30 s on 2 cores), enough for local tasks, which are passed as full configs."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=standard)


def parse_tasks(tasks: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """`"piqa,boolq"`, a list, `"all"` (the default set) or None/"" (no tasks) -> task names."""
    if tasks is None:
        return []
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    names: list[str] = []
    for t in tasks:
        names.extend(DEFAULT_TASKS if t == "all" else [t])
    return list(dict.fromkeys(names))


def task_specs(tasks: list[str], data_dir: str | Path | None) -> tuple[list, dict[str, str]]:
    """What to hand `simple_evaluate` for each task, and the sha256 of each local data file used."""
    from .tasks import local_data_file, local_task_config

    root = resolve_data_dir(data_dir)
    if root is None:
        log.info("no data dir: tasks load the standard hub datasets")
        return list(tasks), {}
    specs, hashes = [], {}
    for name in tasks:
        specs.append(local_task_config(name, root))
        path = local_data_file(name, root)
        hashes[str(path.relative_to(root))] = sha256(path)
    return specs, hashes


def primary_metric(metrics: dict[str, Any]) -> str:
    """The accuracy a table shows: length-normalised when the task has it, else plain accuracy."""
    return "acc_norm" if "acc_norm" in metrics else "acc"


def run_tasks(
    model,
    tokenizer,
    tasks: str | list[str],
    *,
    limit: int | float | None = None,
    data_dir: str | Path | None = None,
    batch_size: int = 1,
) -> dict[str, Any]:
    """Zero-shot accuracy of `model` on `tasks`; `limit` caps the documents per task (the first ones).

    Returns `{"tasks": {name: {metric, value, stderr, metrics, version, samples}}, "data_files": {..}}`.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    names = parse_tasks(tasks)
    if not names:
        return {"tasks": {}, "data_files": {}}
    specs, hashes = task_specs(names, data_dir)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal")
    try:
        out = simple_evaluate(
            model=lm,
            tasks=specs,
            limit=limit,
            bootstrap_iters=BOOTSTRAP_ITERS,
            log_samples=False,
            task_manager=task_manager(standard=resolve_data_dir(data_dir) is None),
        )
    except KeyError as err:
        raise MlaifyError(
            f"lm-eval does not know a task in {names} ({str(err)[:160]}); check the names"
        ) from None
    except OSError as err:  # the hub (or a dataset on it) cannot be reached
        raise MlaifyError(
            f"lm-eval could not load the data of {names} ({str(err)[:160]}); "
            "pass --data-dir (or set MLAIFY_DATA) to evaluate offline"
        ) from None
    return {"tasks": summarise(out, names), "data_files": hashes}


def summarise(out: dict[str, Any], names: list[str]) -> dict[str, dict[str, Any]]:
    """lm-eval's `"acc,none"`-style keys -> one entry per task with its headline metric and stderr."""
    summary = {}
    for name in names:
        raw = out["results"].get(name, {})
        metrics, stderrs = {}, {}
        for key, value in raw.items():
            metric, _, _filter = key.partition(",")
            if metric in ("alias", "sample_len") or not isinstance(value, (int, float)):
                continue
            if metric.endswith("_stderr"):
                stderrs[metric.removesuffix("_stderr")] = value
            else:
                metrics[metric] = value
        head = primary_metric(metrics)
        summary[name] = {
            "metric": head,
            "value": metrics.get(head),
            "stderr": stderrs.get(head),
            "metrics": metrics,
            "stderrs": stderrs,
            "version": out.get("versions", {}).get(name),
            "samples": (out.get("n-samples", {}).get(name) or {}).get("effective"),
        }
    return summary
