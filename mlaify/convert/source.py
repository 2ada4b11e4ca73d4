"""Where a conversion reads its source: a model in memory, or a safetensors folder one layer at a time.

Conversion is per layer (DESIGN.md section 2), so it needs at any moment one layer's attention
weights in float and nothing else: `SafetensorsLayers` reads each tensor lazily with `safe_open`
when it is asked for and hands every other tensor (embeddings, norms, MLP) through in its stored
dtype, so an 8B checkpoint converts in a fraction of its size in RAM. `ModelLayers` serves the same
interface from a loaded model (a GGUF file, a hub id, the calibrated path that runs the source).
Every tensor read is checked against the shape the config implies and for NaN / Inf.

A source's `device` is where its decoder layers run (calibration, refit, query fit): each layer is
moved there when it is asked for and leaves when it is released, so the device holds one layer and the
windows' hidden states, whatever the model's size. The factorisation reads `attention(i)` on the CPU.
"""

from __future__ import annotations

import copy
import ctypes
import inspect
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from ..errors import MlaifyError
from ..geometry import sliding_windows
from ..loading import check_finite, is_safetensors_folder, load_model

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
# Multimodal checkpoints whose decoder is converted alone: model type -> prefix of its tensors' names.
TEXT_PARTS = {"gemma3": "language_model."}
HEAD_NORMS = ("q_norm", "k_norm")  # per-head RMSNorm of queries and keys before RoPE (Qwen3, Gemma3)
FUSED_QKV = "qkv_proj"  # one [q; k; v] projection instead of three (Phi-3)
_DAMAGED = "the checkpoint is damaged: re-download or re-save it"


def release_memory() -> None:
    """Hand the memory a finished layer freed back to the OS (glibc keeps freed blocks otherwise, and
    the resident size of a streamed conversion would creep up by its fragments layer after layer)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


class _Attention(nn.Module):
    """The four projections of a source attention layer (and its head norms): all the conversion reads."""

    def __init__(self, modules: dict[str, nn.Module]):
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)


def text_part(config):
    """(the decoder's config, the prefix of its tensors in the checkpoint): the text model of a
    multimodal checkpoint (Gemma3's `gemma3`), else the config itself and no prefix."""
    if config.model_type in TEXT_PARTS:
        return config.get_text_config(decoder=True), TEXT_PARTS[config.model_type]
    return config, ""


def head_norm_gain(norm: nn.Module) -> tuple[torch.Tensor, float]:
    """(per-dim gain [d_h] in float64, eps) of a source head RMSNorm, whatever its parametrisation
    (Llama-style `w`, Gemma's `1 + w`): on a unit-RMS input it returns `gain / sqrt(1 + eps)`."""
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
    ones = torch.ones(norm.weight.shape[-1], dtype=torch.float32, device=norm.weight.device)
    with torch.no_grad():
        return norm(ones).double() * (1 + eps) ** 0.5, eps


def qkv_sizes(config) -> list[int]:
    """Rows of q, k and v in a fused `qkv_proj`."""
    d_h = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    n_kv = config.num_key_value_heads or config.num_attention_heads
    return [config.num_attention_heads * d_h, n_kv * d_h, n_kv * d_h]


def split_qkv(fused: nn.Linear, config) -> dict[str, nn.Linear]:
    """`q_proj`, `k_proj`, `v_proj` as views of a fused projection's rows (no copy)."""
    sizes = qkv_sizes(config)
    biases = (None,) * 3 if fused.bias is None else fused.bias.detach().split(sizes)
    parts = zip(ATTENTION[:3], fused.weight.detach().split(sizes), biases, strict=True)
    return {name: _linear(weight, bias) for name, weight, bias in parts}


def projections(attn: nn.Module, config) -> dict[str, nn.Linear]:
    """A source attention module's `q_proj`, `k_proj`, `v_proj` (its own, or a fused one's views)."""
    if hasattr(attn, FUSED_QKV):
        return split_qkv(getattr(attn, FUSED_QKV), config)
    return {name: getattr(attn, name) for name in ATTENTION[:3]}


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


class LayerSource:
    """A source model's config, its decoder layers (whole, to run them, or their attention only, to
    convert it), and every other tensor."""

    config = None
    dtype: torch.dtype
    device = torch.device("cpu")  # where `decoder_layer`, `embed` and `position_embeddings` put their outputs

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def attention(self, i: int) -> nn.Module:
        """Layer i's attention with `q_proj`, `k_proj`, `v_proj`, `o_proj` (float32)."""
        raise NotImplementedError

    def decoder_layer(self, i: int) -> nn.Module:
        """Layer i as the source architecture's own decoder layer module (float32) on `device`, to run it;
        `release` gives its memory back."""
        raise NotImplementedError

    def release(self, layer: nn.Module) -> None:
        """Give back a layer from `decoder_layer`: free it, or move a loaded model's back to its device."""

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The token embeddings of `ids` (float32, on `device`), as the decoder's input."""
        raise NotImplementedError

    def rotary(self) -> nn.Module:
        """The source's RoPE module: `(x, position_ids) -> (cos, sin)`."""
        raise NotImplementedError

    def passthrough(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor outside the attention layers, in checkpoint order, as stored."""
        raise NotImplementedError

    def attention_tensors(self, i: int) -> Iterator[tuple[str, torch.Tensor]]:
        """Layer i's attention tensors as stored, for a layer that keeps the source's attention."""
        raise NotImplementedError

    def layer_type(self, i: int) -> str | None:
        """Layer i's attention type (`full_attention`, `sliding_attention`), None for one type only."""
        types = getattr(self.config, "layer_types", None)
        return None if types is None else types[i]

    def sliding_window(self, i: int) -> int | None:
        """Layer i's sliding window, None for full attention."""
        return sliding_windows(self.config)[i]

    def position_embeddings(self, i: int, x: torch.Tensor, positions: torch.Tensor):
        """Layer i's RoPE tables (cos, sin) at `positions`: a per-layer-type table where the source has
        one (Gemma3's local and global bases), else its only one; computed where the RoPE module lives, on
        `x`'s device."""
        rotary = self.rotary()
        home = next(rotary.buffers()).device
        args = (x[:1, :1].to(home), positions.to(home))
        if "layer_type" in inspect.signature(rotary.forward).parameters:
            args += (self.layer_type(i),)
        return tuple(t.to(x.device) for t in rotary(*args))

    def inv_freq(self, i: int) -> torch.Tensor:
        """Layer i's RoPE frequencies (what `expected_rotation` averages over), on the CPU."""
        rotary, name = self.rotary(), f"{self.layer_type(i)}_inv_freq"
        return (getattr(rotary, name) if hasattr(rotary, name) else rotary.inv_freq).cpu()


class ModelLayers(LayerSource):
    """A loaded model; with a `device` other than its own, each decoder layer moves there while it runs
    and back when released."""

    def __init__(self, model: PreTrainedModel, device: torch.device | None = None):
        if model.config.model_type in TEXT_PARTS:
            raise MlaifyError(
                f"{model.config.model_type} is multimodal: its text part converts from a local safetensors "
                "folder (save or download the checkpoint, then convert the folder)"
            )
        self.model, self.config = model, model.config
        param = next(model.parameters())
        self.dtype, self.home = param.dtype, param.device
        self.device = self.home if device is None else device

    def attention(self, i: int) -> nn.Module:
        attn = self.model.model.layers[i].self_attn
        if not hasattr(attn, FUSED_QKV):
            return attn
        norms = {name: getattr(attn, name) for name in HEAD_NORMS if hasattr(attn, name)}
        return _Attention({**projections(attn, self.config), "o_proj": attn.o_proj, **norms})

    def decoder_layer(self, i: int) -> nn.Module:
        return self.model.model.layers[i].to(self.device)

    def release(self, layer: nn.Module) -> None:
        layer.to(self.home)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.model.embed_tokens(ids.to(self.home)).to(self.device)

    def rotary(self) -> nn.Module:
        return self.model.model.rotary_emb

    def passthrough(self) -> Iterator[tuple[str, torch.Tensor]]:
        state = self.model.state_dict()
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        yield from ((k, v) for k, v in state.items() if ".self_attn." not in k)

    def attention_tensors(self, i: int) -> Iterator[tuple[str, torch.Tensor]]:
        prefix = layer_prefix(i) + "self_attn."
        yield from ((prefix + k, v) for k, v in self.attention(i).state_dict().items())


class SafetensorsLayers(LayerSource):
    """A local safetensors checkpoint (one file or an indexed set of shards), read tensor by tensor;
    of a multimodal one (`TEXT_PARTS`), the decoder's tensors only, under their text model's names."""

    def __init__(self, folder: str | Path, config, device: torch.device | None = None):
        config, self.prefix = text_part(config)
        self.device = device or LayerSource.device
        self.folder, self.config = Path(folder), config
        index = self.folder / "model.safetensors.index.json"
        try:
            if index.is_file():
                stored = {k: self.folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
            else:
                with safe_open(self.folder / "model.safetensors", framework="pt") as f:
                    stored = dict.fromkeys(f.keys(), self.folder / "model.safetensors")
            self.files = {k[len(self.prefix) :]: f for k, f in stored.items() if k.startswith(self.prefix)}
        except (OSError, SafetensorError, json.JSONDecodeError, KeyError) as err:
            raise MlaifyError(
                f"could not read {folder}: the weights look corrupt ({err}); {_DAMAGED}"
            ) from None
        # The shapes the config implies, from a model built on the meta device (no memory, no weights);
        # its decoder layers are materialised one at a time to run them.
        with torch.device("meta"):
            self.skeleton = AutoModelForCausalLM.from_config(config).eval()
        skeleton = self.skeleton
        self._rotary = type(skeleton.model.rotary_emb)
        self.shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
        if config.tie_word_embeddings:
            self.shapes.pop("lm_head.weight", None)
        missing = sorted(set(self.shapes) - set(self.files))
        if missing:
            raise MlaifyError(
                f"the weights of {folder} lack {missing[0]} (and {len(missing) - 1} more) that its "
                "config.json describes; fix config.json or re-save the model with save_pretrained"
            )
        with safe_open(next(iter(self.files.values())), framework="pt") as f:
            stored = f.get_slice(next(iter(f.keys()))).get_dtype()
        self.dtype = {"BF16": torch.bfloat16, "F16": torch.float16}.get(stored, torch.float32)

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, shape- and value-checked. It stays a view of the mapped file (no copy; its pages
        are read when used and freed with it)."""
        try:
            with safe_open(self.files[name], framework="pt") as f:
                tensor = f.get_tensor(self.prefix + name)
        except (OSError, SafetensorError) as err:
            raise MlaifyError(
                f"could not read {name} from {self.folder}: the weights look corrupt ({err}); {_DAMAGED}"
            ) from None
        if tuple(tensor.shape) != self.shapes[name]:
            raise MlaifyError(
                f"the weights of {self.folder} do not have the shapes its config.json describes ({name}: "
                f"{tuple(tensor.shape)}, expected {self.shapes[name]}); fix config.json or re-save the model"
            )
        check_finite({name: tensor}, f"weights of {self.folder}", _DAMAGED)
        return tensor

    def attention(self, i: int) -> nn.Module:
        prefix = layer_prefix(i) + "self_attn."
        modules = {}
        fused = prefix + FUSED_QKV + ".weight" in self.shapes
        for proj in (FUSED_QKV, "o_proj") if fused else ATTENTION:
            bias = prefix + proj + ".bias"
            modules[proj] = _linear(
                self.tensor(prefix + proj + ".weight").float(),
                self.tensor(bias).float() if bias in self.shapes else None,
            )
        if fused:
            modules.update(split_qkv(modules.pop(FUSED_QKV), self.config))
        for name in HEAD_NORMS:
            if prefix + name + ".weight" in self.shapes:  # the source's own norm class, with its weight
                norm = copy.deepcopy(getattr(self.skeleton.model.layers[i].self_attn, name)).to_empty(
                    device="cpu"
                )
                norm.load_state_dict({"weight": self.tensor(prefix + name + ".weight").float()})
                modules[name] = norm.float()
        return _Attention(modules)

    def decoder_layer(self, i: int) -> nn.Module:
        layer = self.skeleton.model.layers[i]
        prefix = layer_prefix(i)
        state = {
            name[len(prefix) :]: self.tensor(name).float() for name in self.shapes if name.startswith(prefix)
        }
        layer.to_empty(device=self.device).float()  # run in float32 (autocast lowers it), whatever is stored
        layer.load_state_dict(state, strict=True)
        return layer

    def release(self, layer: nn.Module) -> None:
        layer.to("meta")
        release_memory()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The embeddings of `ids` as the source's module computes them, from the mapped weight (not a
        copy): Gemma's scaled embedding multiplies by its `scalar_embed_scale` in the weight's dtype."""
        weight = self.tensor("model.embed_tokens.weight")
        scale = getattr(self.skeleton.model.embed_tokens, "scalar_embed_scale", None)
        out = torch.nn.functional.embedding(ids, weight)
        out = out if scale is None else out * torch.tensor(scale, dtype=weight.dtype)
        return out.to(self.device, torch.float32)

    def rotary(self) -> nn.Module:
        return self._rotary(config=self.config)

    def passthrough(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.shapes:  # the model's own order: embeddings, layer by layer, norm, head
            if ".self_attn." not in name:
                yield name, self.tensor(name)

    def attention_tensors(self, i: int) -> Iterator[tuple[str, torch.Tensor]]:
        prefix = layer_prefix(i) + "self_attn."
        yield from ((name, self.tensor(name)) for name in self.shapes if name.startswith(prefix))


def layer_source(
    src: str | PreTrainedModel | LayerSource, config=None, device: torch.device | None = None
) -> LayerSource:
    """`SafetensorsLayers` for a local safetensors folder (given its config), else the loaded model's;
    its layers run on `device` (default: a loaded model's own, else the CPU)."""
    if isinstance(src, LayerSource):
        if device is not None:
            src.device = device
        return src
    if isinstance(src, PreTrainedModel):
        return ModelLayers(src, device)
    if config is not None and is_safetensors_folder(str(src)):
        return SafetensorsLayers(src, config, device)
    return ModelLayers(load_model(src), device)
