"""lm-eval tasks that read local jsonl files but keep the standard task's prompts and metrics.

A local task is built FROM lm-eval's own definition of the standard task: we load its YAML (with
its includes and `!function` helpers) and override only where the documents come from
(`dataset_path: json` plus `data_files`) and which split is evaluated. Nothing about prompts,
answer choices or metrics is written here, so they cannot drift from the standard task.

The YAML files next to this module make the same tasks usable from the lm-eval CLI:

    lm_eval --model hf --model_args pretrained=OUT,trust_remote_code=True \
        --include_path $(mlaify tasks) \
        --tasks mlaify_piqa --metadata '{"data_dir": "/path/to/evaldata"}'

Each YAML names `LocalTask` as its class; the data dir comes from `--metadata` or `$MLAIFY_DATA`.
The `mlaify_` prefix keeps the names apart from the standard tasks, which keep working online.
"""

from __future__ import annotations

import copy
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from lm_eval.api.task import ConfigurableTask

from ...errors import MlaifyError

TASKS_DIR = Path(__file__).resolve().parent
PREFIX = "mlaify_"

# standard task -> (jsonl file inside the data dir, the split the standard task evaluates)
LOCAL_DATA: dict[str, tuple[str, str]] = {
    "hellaswag": ("hellaswag/validation.jsonl", "validation"),
    "piqa": ("piqa/validation.jsonl", "validation"),
    "arc_easy": ("arc/arc_easy_test.jsonl", "test"),
    "arc_challenge": ("arc/arc_challenge_test.jsonl", "test"),
    "winogrande": ("winogrande/winogrande_xl_validation.jsonl", "validation"),
    "openbookqa": ("openbookqa/main_test.jsonl", "test"),
    "boolq": ("boolq/validation.jsonl", "validation"),
    "lambada_openai": ("lambada/lambada_openai_test.jsonl", "test"),
}
# Where lm-eval keeps each standard task's YAML: reading it directly skips indexing thousands of
# task files (~30 s on 2 cores); the index is the fallback if a file has moved.
STANDARD_YAML: dict[str, str] = {
    "hellaswag": "hellaswag/hellaswag.yaml",
    "piqa": "piqa/piqa.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "winogrande": "winogrande/default.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "lambada_openai": "lambada/lambada_openai.yaml",
}

_SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")


@lru_cache(maxsize=1)
def _standard_index() -> dict:
    """lm-eval's registry of its built-in tasks (name -> entry with the YAML path)."""
    from lm_eval.tasks import TaskManager

    return TaskManager().task_index


def standard_yaml(name: str) -> Path:
    """Path of lm-eval's own YAML for standard task `name`."""
    import lm_eval.tasks

    known = Path(lm_eval.tasks.__file__).parent / STANDARD_YAML.get(name, "-")
    if known.is_file() and _task_name(known) == name:
        return known
    entry = _standard_index().get(name)
    if entry is None or entry.yaml_path is None:
        raise MlaifyError(f"lm-eval has no task named {name!r}; check the name with `lm_eval ls tasks`")
    return Path(entry.yaml_path)


def _task_name(path: Path) -> str | None:
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(path, resolve_func=False).get("task")


def standard_task_config(name: str) -> dict[str, Any]:
    """The standard task's config as lm-eval loads it: includes merged, `!function`s resolved."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return copy.deepcopy(load_yaml(standard_yaml(name), resolve_func=True))


def local_data_file(name: str, data_dir: str | Path) -> Path:
    """The jsonl file that feeds task `name` inside `data_dir`."""
    if name not in LOCAL_DATA:
        raise MlaifyError(f"no local data for task {name!r}; tasks with local data: {', '.join(LOCAL_DATA)}")
    path = Path(data_dir).expanduser().resolve() / LOCAL_DATA[name][0]
    if not path.is_file():
        raise MlaifyError(
            f"{path} not found; point --data-dir (or MLAIFY_DATA) at a folder laid out like evaldata"
        )
    return path


def local_task_config(name: str, data_dir: str | Path, task_name: str | None = None) -> dict[str, Any]:
    """Config of standard task `name` reading its split from the local jsonl file in `data_dir`."""
    path = local_data_file(name, data_dir)
    split = LOCAL_DATA[name][1]
    config = standard_task_config(name)
    for key in ("tag", "group", "task_list"):  # registry keys, not task settings
        config.pop(key, None)
    config.update({key: None for key in _SPLIT_KEYS})
    config.update(
        task=task_name or name,
        dataset_path="json",
        dataset_name=None,
        dataset_kwargs={"data_files": {split: str(path)}},
        **{f"{split}_split": split},
    )
    config["metadata"] = {**(config.get("metadata") or {}), "local_data": str(path), "standard_task": name}
    return config


class LocalTask(ConfigurableTask):
    """The class the YAMLs here name: a standard task on local data, built when lm-eval loads it."""

    def __init__(self, config: dict[str, Any]) -> None:
        task_name = config["task"]
        meta = dict(config.get("metadata") or {})
        name = task_name.removeprefix(PREFIX)
        data_dir = meta.get("data_dir") or os.environ.get("MLAIFY_DATA")
        if not data_dir:
            raise MlaifyError(
                f"{task_name} needs the evaluation data: set MLAIFY_DATA=DIR "
                'or pass --metadata \'{"data_dir": "DIR"}\' to lm_eval'
            )
        full = local_task_config(name, data_dir, task_name=task_name)
        meta.pop("config_source", None)
        full["metadata"] = {**meta, **full["metadata"], "data_dir": str(data_dir)}
        super().__init__(config=full)
