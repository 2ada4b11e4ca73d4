"""Perplexity with the reference protocol, so figures compare across tools (DESIGN.md section 4).

The whole file is read as one string and tokenized once with the tokenizer's defaults (no BOS for
SmolLM2); window i is `ids[i*L:(i+1)*L]` for i < N, scored as `model(input_ids=w, labels=w)` in
float32. Perplexity is `exp(mean NLL)` over all N x (L-1) predicted tokens; windows have equal
length, so this equals exp of the mean of the per-window losses.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import MlaifyError

log = logging.getLogger(__name__)

DEFAULT_WINDOWS = 32
DEFAULT_SEQ_LEN = 2048


@dataclass
class PerplexityResult:
    perplexity: float
    mean_nll: float
    windows: int  # windows scored (fewer than asked when the text is short)
    seq_len: int
    predicted_tokens: int
    text_tokens: int  # tokens in the whole text
    window_nll: list[float]

    def to_dict(self) -> dict:
        return dict(self.__dict__)


# The last text tokenized: a comparison scores every model on the same text with the same tokenizer.
_last_tokenized: tuple[tuple, object, torch.Tensor] | None = None


def tokenize_text(path: str | Path, tokenizer) -> torch.Tensor:
    """Token ids `[T]` of the whole file, tokenized once with the tokenizer's defaults."""
    global _last_tokenized
    path = Path(path)
    if not path.is_file():
        raise MlaifyError(f"perplexity text not found: {path}; pass an existing file with --ppl-text")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if _last_tokenized and _last_tokenized[0] == key and _last_tokenized[1] is tokenizer:
        return _last_tokenized[2]
    text = path.read_text(encoding="utf-8")
    ids = tokenizer(text, return_tensors="pt", verbose=False)["input_ids"][0]
    log.info("%s: %d tokens", path.name, ids.numel())
    _last_tokenized = (key, tokenizer, ids)
    return ids


@torch.inference_mode()
def perplexity_of_ids(
    model,
    ids: torch.Tensor,
    windows: int = DEFAULT_WINDOWS,
    seq_len: int = DEFAULT_SEQ_LEN,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of `model` on the first `windows` non-overlapping windows of `seq_len` tokens of `ids`."""
    if windows < 1 or seq_len < 2:
        raise MlaifyError(f"need windows >= 1 and seq_len >= 2, got {windows} and {seq_len}")
    available = ids.numel() // seq_len
    if available == 0:
        raise MlaifyError(
            f"text has {ids.numel()} tokens, fewer than one window of {seq_len}; use a smaller --seq-len"
        )
    if available < windows:
        log.warning("text holds only %d windows of %d tokens (asked for %d)", available, seq_len, windows)
    n = min(windows, available)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    losses = []
    for i in tqdm(range(n), desc="perplexity", unit="window", disable=not progress):
        w = ids[i * seq_len : (i + 1) * seq_len].unsqueeze(0).to(device)  # [1, L]
        out = model(input_ids=w, labels=w, use_cache=False)
        losses.append(out.loss.float().item())  # mean NLL over the L-1 predicted tokens
    model.train(was_training)
    mean_nll = sum(losses) / n
    return PerplexityResult(
        perplexity=math.exp(mean_nll),
        mean_nll=mean_nll,
        windows=n,
        seq_len=seq_len,
        predicted_tokens=n * (seq_len - 1),
        text_tokens=ids.numel(),
        window_nll=losses,
    )


def perplexity(
    model,
    tokenizer,
    text_path: str | Path,
    windows: int = DEFAULT_WINDOWS,
    seq_len: int = DEFAULT_SEQ_LEN,
    progress: bool = True,
) -> PerplexityResult:
    """Reference-protocol perplexity of `model` on the text file at `text_path`."""
    return perplexity_of_ids(model, tokenize_text(text_path, tokenizer), windows, seq_len, progress)
