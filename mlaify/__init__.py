"""mlaify: convert MHA/GQA/MQA decoders to Multi-head Latent Attention with a compressed KV cache.

Importing mlaify registers the MLA classes with transformers' Auto* factories.
"""

from .convert import MLAConversionConfig, convert_to_mla
from .errors import MlaifyError
from .modeling import MlaifyConfig, MlaifyForCausalLM

__version__ = "0.1.0"
__all__ = ["MLAConversionConfig", "MlaifyConfig", "MlaifyError", "MlaifyForCausalLM", "convert_to_mla"]
