"""The MLA model classes, registered with the Auto* factories on import."""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_mlaify import MlaifyConfig
from .modeling_mlaify import MLAAttention, MlaifyForCausalLM

AutoConfig.register(MlaifyConfig.model_type, MlaifyConfig, exist_ok=True)
AutoModelForCausalLM.register(MlaifyConfig, MlaifyForCausalLM, exist_ok=True)
# save_pretrained then writes `auto_map` and copies both files for trust_remote_code loading.
MlaifyConfig.register_for_auto_class()
MlaifyForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["MLAAttention", "MlaifyConfig", "MlaifyForCausalLM"]
