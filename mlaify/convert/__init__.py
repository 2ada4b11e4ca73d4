"""Conversion of MHA/GQA/MQA checkpoints to MLA (DESIGN.md section 2)."""

from .config import MLAConversionConfig
from .convert import SUPPORTED_MODEL_TYPES, convert_to_mla

__all__ = ["MLAConversionConfig", "SUPPORTED_MODEL_TYPES", "convert_to_mla"]
