"""Healing: distillation of a converted model back toward its source (DESIGN.md section 6)."""

from .config import HealConfig
from .heal import heal, last_checkpoint

__all__ = ["HealConfig", "heal", "last_checkpoint"]
