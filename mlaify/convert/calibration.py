"""Calibration statistics: what the data-aware conversion methods measure on text, in one pass.

Per layer, from the source model run over `num_sequences` windows of `seq_len` tokens:

- `input_moment[l] = E[h h^T]` (d x d), the second moment of the attention input `h` (the output of
  the layer's input norm). Every linear read-out of `h` has its second moment in closed form,
  `E[(W h)(W h)^T] = W C W^T`, so the activation- and attention-aware factorisations
  (lowrank.py) and the cross-head rope mixing (rope.py) all derive from `C` alone.
- `q_pair_norm[l, h, i]`, `k_pair_norm[l, g, i] = E ||x_i||`, the mean 2-norm of frequency pair `i`
  `(i, i + d_h/2)` of each query and key head, for the `norm` rope strategy (RoPE rotates a pair
  without changing its norm, so the pre-RoPE projection outputs give the same numbers).
- `distance_mass[l, h, t]`: the share of query head h's attention that falls at distance t = m - n
  (query position m, key n), measured on the last quarter of each window's queries, from which
  rope.py averages the rotation that a pair losing RoPE no longer gets.

Memory is bounded by these matrices (L d^2 values), not by the text. Statistics depend only on the
source model and the calibration text, never on the KV budget: compute once, save, reuse.

The forward passes over calibration text (here and in the refit) run under bfloat16 autocast by
default, while every statistic is accumulated in float32/float64 outside it. On a CPU with
AVX512-BF16 this pass is 1.45x faster for SmolLM2-135M, its statistics within 0.5% of float32
(benchmarks/results/calib_dtype.md).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import MlaifyError
from ..modeling.modeling_mlaify import rotate_half
from .config import DTYPES
from .source import FUSED_QKV, layer_source, qkv_sizes

log = logging.getLogger(__name__)

# Public-domain prose shipped with the package, so that a conversion calibrates without a file from
# the user (its provenance and the measurement that chose it: mlaify/data/README.md).
DEFAULT_CALIB_TEXT = Path(__file__).resolve().parents[1] / "data" / "calibration_gutenberg.txt"


# Forward-pass precisions for calibration text: bfloat16 (autocast) or float32 (none).
COMPUTE_DTYPES = {name: DTYPES[name] for name in ("bfloat16", "float32")}


def autocast_forward(model: nn.Module, compute_dtype: str) -> torch.autocast:
    """Autocast of `model`'s forward passes to `compute_dtype`, only where that lowers the precision."""
    param = next(model.parameters())
    dtype = COMPUTE_DTYPES[compute_dtype]
    lower = param.dtype == torch.float32 and dtype != torch.float32
    return torch.autocast(param.device.type, dtype=dtype, enabled=lower)


def causal_log_mask(
    q_len: int, kv_len: int, sliding_window: int | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """Additive causal mask [Q, S] for the last `q_len` of `kv_len` positions (within `sliding_window`
    of each query, if given); finite, so a masked entry's probability is exactly 0 and a KL term
    over it is 0 * finite, not 0 * inf."""
    mask = torch.full((q_len, kv_len), -1e9, device=device).triu(kv_len - q_len + 1)
    if sliding_window is not None:  # query i (position kv_len - q_len + i) sees the last sliding_window keys
        mask += torch.full((q_len, kv_len), -1e9, device=device).tril(kv_len - q_len - sliding_window)
    return mask


def layer_mask(
    seq_len: int, sliding_window: int | None, device: torch.device | None = None
) -> torch.Tensor | None:
    """The mask a source layer runs with on whole windows: None (causal: SDPA's own kernel) unless a
    sliding window is shorter than the window, then the additive banded mask [1, 1, S, S]."""
    if sliding_window is None or seq_len <= sliding_window:
        return None
    return causal_log_mask(seq_len, seq_len, sliding_window, device)[None, None]


def causal_attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    scaling: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """A source attention's causal softmax [B, H, Q, S] in float32 from its pre-RoPE queries
    q [B, H, Q, d_h] (the last Q positions) and keys k [B, n_kv, S, d_h], with HF-layout RoPE tables
    cos, sin [S, d_h]; query heads share their group's key head (GQA)."""
    Q, S = q.shape[-2], k.shape[-2]
    q = q * cos[-Q:] + rotate_half(q) * sin[-Q:]
    k = (k * cos + rotate_half(k) * sin).repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)).float() * scaling
    return (scores + causal_log_mask(Q, S, sliding_window, scores.device)).softmax(-1)


def full_precision(device: torch.device) -> torch.autocast:
    """No autocast: statistics updates inside an autocast forward keep their float32 products."""
    return torch.autocast(device.type, enabled=False)


@dataclass
class CalibrationConfig:
    """Which windows of the calibration text are run through the source model."""

    num_sequences: int = 128
    seq_len: int = 512
    batch_size: int = 8
    # Seeds the choice of non-overlapping windows, so a text and a seed give the same statistics.
    seed: int = 0
    # Precision of the forward passes (autocast; "float32" turns it off). Accumulation stays float64.
    compute_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        for name in ("num_sequences", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise MlaifyError(f"calibration {name} must be >= 1, got {getattr(self, name)}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise MlaifyError(
                f"unknown calibration dtype {self.compute_dtype!r}; choose one of {', '.join(COMPUTE_DTYPES)}"
            )


@dataclass
class CalibrationStats:
    input_moment: torch.Tensor  # [L, d, d] float64, E[h h^T]
    q_pair_norm: torch.Tensor  # [L, n_h, d_h / 2] float64, mean pair norm of the queries
    k_pair_norm: torch.Tensor  # [L, n_kv, d_h / 2] float64, mean pair norm of the keys
    distance_mass: torch.Tensor  # [L, n_h, seq_len] float64, attention share per query-key distance
    num_tokens: int
    meta: dict  # calibration config, text digest and source sizes, to decide reuse

    def save(self, path: str | Path) -> None:
        # Not `asdict`: it deep-copies every tensor, which would pull memory-mapped moments into RAM.
        torch.save({f.name: getattr(self, f.name) for f in fields(self)}, path)
        log.info("saved calibration statistics to %s", path)

    @classmethod
    def load(cls, path: str | Path) -> CalibrationStats:
        """Memory-mapped: the moments are paged in a layer at a time, as the conversion reads them."""
        try:
            return cls(**torch.load(path, weights_only=True, mmap=True))
        except (OSError, RuntimeError, TypeError) as err:
            raise MlaifyError(
                f"cannot read calibration statistics {path}: {err}; delete it to recompute"
            ) from None

    def check_matches(self, num_layers: int, hidden_size: int, num_heads: int, num_kv_heads: int) -> None:
        """Fail if these statistics were measured on a model of another shape."""
        want = (num_layers, hidden_size, num_heads, num_kv_heads)
        got = (
            self.input_moment.shape[0],
            self.input_moment.shape[1],
            self.q_pair_norm.shape[1],
            self.k_pair_norm.shape[1],
        )
        if want != got:
            raise MlaifyError(
                f"calibration statistics are for (layers, hidden, heads, kv heads) = {got}, "
                f"the model has {want}; "
                "recompute them for this model"
            )


CGROUP_MEMORY_MAX = Path("/sys/fs/cgroup/memory.max")


def _ram_budget() -> int:
    """Bytes of input moments kept in RAM: a quarter of the machine's, or of the container's limit
    (cgroup v2 `memory.max`) where that is lower."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        ram = min(ram, int(CGROUP_MEMORY_MAX.read_text()))
    except (OSError, ValueError):  # no cgroup v2, or "max": no limit
        pass
    return ram // 4


def _moment_buffer(layers: int, d: int) -> torch.Tensor:
    """Zeros [L, d, d] float64 for the input moments, in RAM, or past `_ram_budget` in a memory-mapped
    temporary file (a 70B model's are 80 x 8192^2 x 8 bytes = 43 GB): the layers are written one at a
    time and read one at a time, so the kernel pages them in and out of the disk as needed."""
    size = layers * d * d
    if size * 8 <= _ram_budget():
        return torch.zeros(layers, d, d, dtype=torch.float64)
    fd, path = tempfile.mkstemp(prefix="mlaify-moments-")
    try:
        # Reserved, not sparse: a full disk fails here, not later as a SIGBUS on a page write.
        os.posix_fallocate(fd, 0, size * 8)
        buffer = torch.from_file(path, shared=True, size=size, dtype=torch.float64)
    except OSError as err:
        raise MlaifyError(
            f"no room in {tempfile.gettempdir()} for {size * 8 / 1e9:.1f} GB of calibration moments "
            f"({err.strerror}); set TMPDIR to a folder on a larger disk"
        ) from None
    finally:
        os.close(fd)
        os.unlink(path)  # the mapping keeps it; its space is freed with the tensor
    log.info("calibration: %.1f GB of input moments in a file in %s", size * 8 / 1e9, tempfile.gettempdir())
    return buffer.view(layers, d, d)


def text_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def calibration_windows(tokenizer, text_path: str | Path, cfg: CalibrationConfig) -> torch.Tensor:
    """`[num_sequences, seq_len]` token ids: non-overlapping windows of the text, picked by `cfg.seed`."""
    path = Path(text_path)
    if not path.is_file():
        raise MlaifyError(f"calibration text not found: {text_path}; give a plain-text file")
    ids = torch.tensor(tokenizer(path.read_text(encoding="utf-8"))["input_ids"], dtype=torch.long)
    available = ids.numel() // cfg.seq_len
    if available < cfg.num_sequences:
        raise MlaifyError(
            f"{text_path} has {ids.numel()} tokens, {available} windows of {cfg.seq_len}; "
            f"lower --calib-sequences to {max(available, 1)} or give a longer text"
        )
    chosen = torch.randperm(available, generator=torch.Generator().manual_seed(cfg.seed))[: cfg.num_sequences]
    return ids[: available * cfg.seq_len].view(available, cfg.seq_len)[chosen.sort().values]


class _LayerRecorder:
    """Forward hooks on one layer's q_proj and k_proj (or its fused qkv_proj, Phi-3) that accumulate
    its statistics in float64."""

    def __init__(
        self,
        attn: nn.Module,
        config,
        inv_freq: torch.Tensor,
        seq_len: int,
        sliding_window: int | None = None,
    ):
        q_rows, k_rows, _ = qkv_sizes(config)
        head_dim = q_rows // config.num_attention_heads
        self.head_dim, self.sliding_window = head_dim, sliding_window
        # qk-norm: the pair norms and attention shares are those of the normed queries and keys
        self.head_norms = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        device = attn.o_proj.weight.device  # the sums stay where the layer runs
        self.inv_freq = inv_freq.to(device, torch.float32)
        self.scaling = getattr(attn, "scaling", head_dim**-0.5)
        d, n_h, n_kv = config.hidden_size, q_rows // head_dim, k_rows // head_dim
        zeros = partial(torch.zeros, dtype=torch.float64, device=device)
        self.moment = zeros(d, d)
        self.q_norm = zeros(n_h, head_dim // 2)
        self.k_norm = zeros(n_kv, head_dim // 2)
        self.mass = zeros(n_h, seq_len)
        self.q = None
        if hasattr(attn, FUSED_QKV):  # one hook, its output split
            fused = getattr(attn, FUSED_QKV)

            def on_qkv(module, args, out) -> None:
                self._on_q(module, args, out[..., :q_rows])
                self._on_k(module, args, out[..., q_rows : q_rows + k_rows])

            self.handles = [fused.register_forward_hook(on_qkv)]
        else:
            self.handles = [
                attn.q_proj.register_forward_hook(self._on_q),
                attn.k_proj.register_forward_hook(self._on_k),
            ]

    def _pair_norms(self, out: torch.Tensor) -> torch.Tensor:
        pairs = self.head_dim // 2
        x = out.float().reshape(-1, out.shape[-1] // self.head_dim, 2, pairs)  # [N, heads, 2, pairs]
        # hypot of the two halves, not norm(dim=2): a strided 2-element reduction is ~20x slower.
        return torch.hypot(x[:, :, 0], x[:, :, 1]).sum(0, dtype=torch.float64)

    def _normed(self, out: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
        """A projection's output [B, S, heads * d_h] through the source's head norm, if it has one."""
        return out if norm is None else norm(out.unflatten(-1, (-1, self.head_dim))).flatten(-2)

    def _on_q(self, module, args, out) -> None:
        with full_precision(out.device):
            h = args[0].reshape(-1, args[0].shape[-1]).float()  # [N, d]
            self.moment += (h.T @ h).double()  # float32 within a batch, float64 across batches
            out = self._normed(out.float(), self.head_norms[0])
            self.q_norm += self._pair_norms(out)
        self.q = out

    def _on_k(self, module, args, out) -> None:
        with full_precision(out.device):
            out = self._normed(out.float(), self.head_norms[1])
            self.k_norm += self._pair_norms(out)
            self._record_distances(self.q, out)
        self.q = None

    def _record_distances(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """Attention share per distance, from the source's causal softmax over the last S/4 queries."""
        B, S, _ = q.shape
        q = q.float().view(B, S, -1, self.head_dim).transpose(1, 2)  # [B, H, S, d_h]
        k = k.float().view(B, S, -1, self.head_dim).transpose(1, 2)  # [B, n_kv, S, d_h]
        first = S - max(S // 4, 1)
        pos = torch.arange(S, device=q.device)
        angle = pos[:, None].float() * self.inv_freq  # [S, d_h / 2]
        cos, sin = angle.cos().repeat(1, 2), angle.sin().repeat(1, 2)
        probs = causal_attention_probs(q[:, :, first:], k, cos, sin, self.scaling, self.sliding_window)
        probs = probs.sum(0)  # [H, Q, S]
        dist = pos[first:, None] - pos[None, :]  # [Q, S]
        index = dist.clamp_min(0).expand_as(probs).reshape(probs.shape[0], -1)
        self.mass.scatter_add_(1, index, probs.reshape(probs.shape[0], -1).double())

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()  # not inference_mode: the statistics stay usable in autograd code
def collect_statistics(
    model, tokenizer, text_path: str | Path, cfg: CalibrationConfig | None = None
) -> CalibrationStats:
    """One pass of the source decoder over the calibration windows, a layer at a time: every window's
    hidden states enter layer l, its statistics are taken, its outputs enter layer l + 1. So only one
    layer is needed at a time (`model` may be a `LayerSource` streaming from disk); memory is that
    layer, the windows' hidden states and the statistics."""
    cfg = cfg or CalibrationConfig()
    windows = calibration_windows(tokenizer, text_path, cfg)
    source = layer_source(model)
    text = source.config
    hidden = source.embed(windows)
    positions = torch.arange(cfg.seq_len, device=hidden.device)[None]
    d, layers, n = text.hidden_size, source.num_layers, windows.numel()
    moments = _moment_buffer(layers, d)  # filled as the layers go: never copied
    recorders = []
    for i in tqdm(range(layers), desc="calibrating", unit="layer", leave=False):
        layer = source.decoder_layer(i)
        window = source.sliding_window(i)
        rec = _LayerRecorder(layer.self_attn, text, source.inv_freq(i), cfg.seq_len, window)
        position_embeddings = source.position_embeddings(i, hidden[:1], positions)
        mask = layer_mask(cfg.seq_len, window, hidden.device)
        try:
            with autocast_forward(layer, cfg.compute_dtype):
                for b in range(0, len(hidden), cfg.batch_size):
                    out = layer(
                        hidden[b : b + cfg.batch_size],
                        attention_mask=None if mask is None else mask.to(hidden.dtype),
                        position_embeddings=position_embeddings,
                    )
                    hidden[b : b + cfg.batch_size] = out
        finally:
            rec.remove()
            source.release(layer)
        moments[i], rec.moment = rec.moment.cpu() / n, None
        rec.q_norm, rec.k_norm, rec.mass = rec.q_norm.cpu(), rec.k_norm.cpu(), rec.mass.cpu()
        recorders.append(rec)
    log.info("calibration: %d sequences of %d tokens from %s", cfg.num_sequences, cfg.seq_len, text_path)
    return CalibrationStats(
        input_moment=moments,
        q_pair_norm=torch.stack([rec.q_norm for rec in recorders]) / n,
        k_pair_norm=torch.stack([rec.k_norm for rec in recorders]) / n,
        distance_mass=torch.stack([rec.mass / rec.mass.sum(-1, keepdim=True) for rec in recorders]),
        num_tokens=n,
        meta={**asdict(cfg), "text_sha256": text_digest(text_path), "source": str(text.name_or_path)},
    )


def load_or_collect(
    model, tokenizer, text_path: str | Path | None, cfg: CalibrationConfig, stats_path: str | Path | None
) -> CalibrationStats:
    """Reuse `stats_path` when it was measured on this text with this config; otherwise measure (and save)."""
    if text_path is None:
        if stats_path is None or not Path(stats_path).is_file():
            raise MlaifyError("calibration needs --calib-text FILE (or an existing --calib-stats FILE)")
        return CalibrationStats.load(stats_path)
    if stats_path is not None and Path(stats_path).is_file():
        stats = CalibrationStats.load(stats_path)
        wanted = {**asdict(cfg), "text_sha256": text_digest(text_path)}
        if all(stats.meta.get(k) == v for k, v in wanted.items() if k != "batch_size"):
            log.info("reusing calibration statistics %s", stats_path)
            return stats
        log.info("calibration statistics %s were measured otherwise; recomputing", stats_path)
    stats = collect_statistics(model, tokenizer, text_path, cfg)
    if stats_path is not None:
        stats.save(stats_path)
    return stats
