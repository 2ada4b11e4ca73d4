"""`--device cpu|cuda|auto`: where the forward passes run (calibration, refit, query fit, eval, heal).

Conversion moves one decoder layer at a time onto the device (convert/source.py), so a model larger
than the device converts as well as one that fits; evaluation places the model with accelerate's
`device_map` (loading.py)."""

from __future__ import annotations

import torch

from .errors import MlaifyError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str | torch.device | None) -> torch.device:
    """`auto` (and None): the first CUDA device when one is visible, else the CPU."""
    if isinstance(name, torch.device):
        return name
    name = name or "auto"
    if name not in DEVICES:
        raise MlaifyError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise MlaifyError("--device cuda but no CUDA device is visible; use --device cpu or auto")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")
