"""Load a source or converted model from a local folder, a hub id or a `.gguf` file.

Every failure a user can cause (missing path, no weights, corrupt file, unreachable hub) becomes a
one-line `MlaifyError` instead of a traceback from deep inside transformers.

A source's own Python code (`auto_map` in its config) never runs unless the caller passes
`trust_remote_code=True` (the CLI's `--trust-remote-code`), the Hugging Face convention. Converted
mlaify checkpoints need no such code where mlaify is installed: importing it registers their classes.
"""

from __future__ import annotations

import json
import logging
import math
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import logging as hf_logging

from .devices import resolve_device
from .errors import MlaifyError

log = logging.getLogger(__name__)

TRUST_REMOTE_CODE_HELP = (
    "run the Python code a source repository ships (its config's auto_map); off by default"
)

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def _gguf_parts(src: str) -> tuple[str, dict]:
    """`(folder, kwargs)` for `from_pretrained`: a `.gguf` file is loaded through `gguf_file=`."""
    path = Path(src)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise MlaifyError(f"GGUF file not found: {src}; check the path")
        return str(path.parent), {"gguf_file": path.name}
    return src, {}


def _check_source(src: str) -> None:
    path = Path(src)
    looks_local = path.exists() or src.startswith((".", "/", "~")) or src.count("/") > 1
    if not looks_local:
        return  # a hub id: transformers resolves it (errors are translated by the caller)
    if not path.exists():
        raise MlaifyError(f"path does not exist: {src}; give a model folder, a .gguf file or a hub id")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MlaifyError(f"{src} has no config.json; point at a Hugging Face model folder")
        if not any((path / name).is_file() for name in _WEIGHT_FILES):
            raise MlaifyError(
                f"{src} has no weights file ({', '.join(_WEIGHT_FILES)}); "
                "re-save the model with save_pretrained"
            )


def is_safetensors_folder(src: str) -> bool:
    """A local folder whose weights are safetensors (those can be read a tensor at a time)."""
    return Path(src).is_dir() and any((Path(src) / name).is_file() for name in _WEIGHT_FILES[:2])


def load_config(src: str, trust_remote_code: bool = False):
    """The model config of `src` (used by `mlaify info` without loading weights)."""
    _check_source(src)
    folder, extra = _gguf_parts(src)
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError, json.JSONDecodeError) as err:
        raise MlaifyError(_explain(src, err)) from None


def count_parameters(src: str) -> int | None:
    """Parameters stored in a local safetensors checkpoint, read from the file headers only."""
    files = sorted(Path(src).glob("*.safetensors")) if Path(src).is_dir() else []
    total = 0
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    total += math.prod(f.get_slice(name).get_shape())
        except (OSError, SafetensorError) as err:
            raise MlaifyError(_explain(src, err)) from None
    return total or None


class _Held(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def _logs_shown_on_success():
    """Hold back transformers' messages during a load: shown if it succeeds, dropped if it fails (a
    failed load ends in one MlaifyError line, not a screen-long load report before it)."""
    held = _Held()
    hf_logging.disable_default_handler()
    hf_logging.add_handler(held)
    try:
        yield
    finally:
        hf_logging.remove_handler(held)
        hf_logging.enable_default_handler()
    for record in held.records:  # reached only when the load succeeded
        logging.getLogger(record.name).handle(record)


def check_finite(tensors: dict[str, torch.Tensor], where: str, fix: str) -> None:
    """One line naming the first tensor with a NaN or Inf value, instead of a silently broken model."""
    for name, tensor in tensors.items():
        # in slices: one boolean mask of a whole 8B model's embedding would be half a gigabyte
        flat = tensor.reshape(-1)
        if tensor.is_floating_point() and not all(torch.isfinite(c).all() for c in flat.split(1 << 24)):
            raise MlaifyError(f"{where}: {name} holds NaN or Inf values; {fix}")


def load_model(
    src: str | PreTrainedModel,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    device: str | None = None,
) -> PreTrainedModel:
    """A causal LM in `dtype` and eval mode; GGUF weights are dequantized and their quantization dropped.

    A `pytorch_model.bin` is unpickled with `weights_only=True`: tensors only, never code. On a CUDA
    `device` (devices.py; None: the CPU) accelerate's `device_map="auto"` places it, spread over the
    visible GPUs (and the CPU) when it is larger than one. A loaded model stays where it is."""
    if isinstance(src, PreTrainedModel):  # checked when it was loaded from disk
        return src
    src = str(src)
    _check_source(src)
    folder, extra = _gguf_parts(src)
    if device is not None and resolve_device(device).type == "cuda":
        extra["device_map"] = "auto"
    try:
        with _logs_shown_on_success():
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=dtype, trust_remote_code=trust_remote_code, weights_only=True, **extra
            )
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError, json.JSONDecodeError) as err:
        raise MlaifyError(_explain(src, err)) from None
    check_finite(
        model.state_dict(), f"weights of {src}", "the checkpoint is damaged: re-download or re-save it"
    )
    if "gguf_file" in extra:  # dequantized GGUF: a plain float checkpoint from here on
        model.hf_quantizer = None
        del model.config.quantization_config
        model.config.name_or_path = src
    return model.eval()


def load_tokenizer(src: str, trust_remote_code: bool = False):
    folder, extra = _gguf_parts(str(src))
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as err:
        raise MlaifyError(_explain(str(src), err)) from None


def _explain(src: str, err: Exception) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "trust_remote_code" in str(err):  # transformers refuses to run the repository's code unasked
        return (
            f"{src} loads only through Python code shipped with it, which mlaify does not run unasked; "
            "read that code, and pass --trust-remote-code if you trust it"
        )
    if "ignore_mismatched_sizes" in str(err) or "size mismatch" in str(err):
        return (
            f"the weights of {src} do not have the shapes its config.json describes (hidden size, heads "
            "or vocabulary differ); fix config.json or re-save the model with save_pretrained"
        )
    if not Path(src).exists():
        return (
            f"could not load {src!r} from the Hugging Face hub ({first[:160]}); "
            "check the id and your network, or pass a local folder or .gguf file"
        )
    return (
        f"could not load {src}: the weights or config look corrupt ({first[:200]}); re-download or re-save it"
    )
