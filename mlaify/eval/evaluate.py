"""One evaluation of one model: reference perplexity plus lm-eval tasks, with everything needed to
reproduce it (data hashes, protocol, task and library versions, wall time) in one JSON-able dict."""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from ..errors import MlaifyError
from .data import default_ppl_text, resolve_data_dir, sha256
from .harness import parse_tasks, run_tasks
from .perplexity import DEFAULT_SEQ_LEN, DEFAULT_WINDOWS, perplexity

log = logging.getLogger(__name__)


@dataclass
class EvalOptions:
    """The protocol, shared by every model of a comparison so their figures compare."""

    ppl_text: str | None = None  # None: WikiText-2 test inside the data dir
    windows: int = DEFAULT_WINDOWS  # 0 skips perplexity
    seq_len: int = DEFAULT_SEQ_LEN
    tasks: list[str] = field(default_factory=list)  # lm-eval task names; "all" = the default set
    limit: int | None = None  # first N documents per task; None = all
    data_dir: str | None = None  # None: $MLAIFY_DATA, else the standard hub datasets
    batch_size: int = 1
    device: str = "auto"  # where a model loaded from a path runs (devices.py); not part of the protocol

    def __post_init__(self) -> None:
        self.tasks = parse_tasks(self.tasks)
        if self.windows < 0 or self.seq_len < 2:
            raise MlaifyError(
                f"--windows must be >= 0 and --seq-len >= 2, got {self.windows} and {self.seq_len}"
            )
        if self.limit is not None and self.limit < 1:
            raise MlaifyError(f"--limit must be >= 1, got {self.limit}")
        if self.batch_size < 1:
            raise MlaifyError(f"--batch-size must be >= 1, got {self.batch_size}")

    def protocol(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "device"}


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "lm_eval", "datasets", "mlaify"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def kv_geometry_of(config) -> dict[str, Any]:
    from ..geometry import kv_geometry  # imported late: the geometry module belongs to the converter side

    return kv_geometry(config)


def model_name(model, name: str | None = None) -> str:
    if name:
        return name
    if isinstance(model, (str, Path)):
        return str(model)
    return getattr(model.config, "name_or_path", None) or type(model).__name__


def evaluate_model(
    model,
    options: EvalOptions | None = None,
    tokenizer=None,
    name: str | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Evaluate `model` (a path, hub id, .gguf or loaded model) under `options`; returns the result dict.

    `tokenizer` defaults to the one saved with `model`; pass it for in-memory models.
    `trust_remote_code` lets a path load through the Python code its repository ships.
    """
    from ..loading import load_model, load_tokenizer

    options = options or EvalOptions()
    start = time.perf_counter()
    label = model_name(model, name)
    if tokenizer is None:
        if not isinstance(model, (str, Path)):
            raise MlaifyError("an in-memory model needs its tokenizer: pass tokenizer=")
        tokenizer = load_tokenizer(str(model), trust_remote_code)
    model = load_model(model, trust_remote_code=trust_remote_code, device=options.device)
    result: dict[str, Any] = {
        "model": label,
        "model_type": model.config.model_type,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "geometry": kv_geometry_of(model.config),
        "protocol": options.protocol(),
        "perplexity": None,
        "tasks": {},
        "data_files": {},
    }
    if options.windows > 0:
        text = Path(options.ppl_text) if options.ppl_text else default_ppl_text(options.data_dir)
        if result["dtype"] != "float32":
            log.warning("perplexity protocol is defined in float32; %s runs in %s", label, result["dtype"])
        log.info("%s: perplexity on %s (%d x %d tokens)", label, text.name, options.windows, options.seq_len)
        ppl = perplexity(model, tokenizer, text, options.windows, options.seq_len)
        result["perplexity"] = {**ppl.to_dict(), "text": str(text)}
        result["data_files"][_data_key(text, options.data_dir)] = sha256(text)
    if options.tasks:
        log.info("%s: lm-eval tasks %s (limit %s)", label, ",".join(options.tasks), options.limit)
        harness = run_tasks(
            model,
            tokenizer,
            options.tasks,
            limit=options.limit,
            data_dir=options.data_dir,
            batch_size=options.batch_size,
        )
        result["tasks"] = harness["tasks"]
        result["data_files"].update(harness["data_files"])
    result["task_versions"] = {task: info["version"] for task, info in result["tasks"].items()}
    result["versions"] = library_versions()
    result["device"] = str(next(model.parameters()).device)
    result["wall_time_s"] = round(time.perf_counter() - start, 2)
    return result


def _data_key(path: Path, data_dir: str | None) -> str:
    """A data file named relative to the data dir when it lies inside it (hashes compare across machines)."""
    root = resolve_data_dir(data_dir)
    try:
        return str(path.resolve().relative_to(root)) if root else str(path)
    except ValueError:
        return str(path)


def write_json(obj: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    return path
