"""Write a model folder atomically: a failed or interrupted save never leaves a half-written output."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import MlaifyError


def check_output(out: str | Path, overwrite: bool) -> Path:
    """Fail before any work if `out` exists and may not be replaced."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise MlaifyError(f"output folder {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise MlaifyError(f"output {out} exists and is not a folder; choose another path")
    parent = next(p for p in (out.absolute().parent, *out.absolute().parents) if p.exists())
    if not os.access(parent, os.W_OK):  # found now, not after an hour of conversion or training
        raise MlaifyError(f"cannot write into {parent}; choose a writable output folder")
    return out


def save_model_files(config, folder: str | Path, dtype) -> None:
    """What `save_pretrained` writes beside the weights of an mlaify model, for weights written by
    other means (a streamed conversion): config.json (architecture, dtype, `auto_map`), the modeling
    files it names, generation_config.json. The model is built on the meta device: no memory."""
    import torch
    from transformers.dynamic_module_utils import custom_object_save

    from .modeling import MlaifyForCausalLM

    with torch.device("meta"):
        skeleton = MlaifyForCausalLM(config)
    config.architectures = [MlaifyForCausalLM.__name__]
    config.dtype = dtype
    custom_object_save(skeleton, folder, config=config)
    config.save_pretrained(folder)
    if skeleton.can_generate():
        skeleton.generation_config.save_pretrained(folder)


def save_atomic(
    model,
    out: str | Path,
    tokenizer=None,
    overwrite: bool = False,
    extras: Callable[[Path], None] | None = None,
) -> Path:
    """`model.save_pretrained` (or `model(folder)`, for weights written by other means: a streamed
    conversion) into a temporary sibling folder, then rename it to `out`; `extras(folder)` writes
    further files (a training log, the model card) into that folder before the rename."""
    out = check_output(out, overwrite).resolve()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as err:
        raise MlaifyError(f"cannot create {out}: {err.strerror}; choose a writable output folder") from None
    try:
        os.chmod(tmp, 0o755)
        model.save_pretrained(tmp) if hasattr(model, "save_pretrained") else model(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extras is not None:
            extras(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except OSError as err:  # a full disk, a quota, permissions changed under us
        raise MlaifyError(
            f"could not write {out}: {err.strerror}; free space or choose another output folder "
            "(nothing was left behind)"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
