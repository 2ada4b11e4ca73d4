"""Token windows for healing: non-overlapping windows of training text, and the eval text's first windows."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import MlaifyError
from ..eval.perplexity import tokenize_text

log = logging.getLogger(__name__)

TextSource = str | Path | Sequence[str | Path] | torch.Tensor

# Text is tokenized in pieces of about this many characters, cut after a blank line, so a fast
# tokenizer runs them in parallel (4 MB of the Gutenberg text: 1.9 s on 2 cores instead of 4.8 s);
# only the tokens at the few cuts can differ from tokenizing the file as one string.
_PIECE_CHARS = 1 << 16


def text_paths(texts) -> list[Path]:
    """The text files named (one or several), each checked to exist."""
    paths = [Path(texts)] if isinstance(texts, str | Path) else [Path(t) for t in texts]
    if not paths:
        raise MlaifyError("no training text given; pass --train-text FILE")
    for path in paths:
        if not path.is_file():
            raise MlaifyError(f"text file not found: {path}; give a plain-text file")
    return paths


def _pieces(text: str) -> list[str]:
    pieces, start = [], 0
    while start < len(text):
        cut = text.find("\n\n", start + _PIECE_CHARS)
        end = len(text) if cut < 0 else cut + 2
        pieces.append(text[start:end])
        start = end
    return pieces


def tokenize_file(path: Path, tokenizer) -> torch.Tensor:
    """Token ids [T] of a whole file (tokenizer defaults, no special tokens between pieces)."""
    pieces = _pieces(path.read_text(encoding="utf-8"))
    ids = tokenizer(pieces, add_special_tokens=False, verbose=False)["input_ids"] if pieces else []
    return torch.tensor([t for piece in ids for t in piece], dtype=torch.long)


def training_windows(texts: TextSource, tokenizer, seq_len: int, seed: int = 0) -> torch.Tensor:
    """[N, seq_len] every non-overlapping window of every file, in an order shuffled by `seed`
    (files mix in proportion to their length). A tensor of ids [N, S] is taken as the windows."""
    if isinstance(texts, torch.Tensor):
        if texts.dim() != 2 or texts.shape[1] != seq_len:
            raise MlaifyError(f"training windows must be token ids [N, {seq_len}], got {list(texts.shape)}")
        return texts.long()
    if tokenizer is None:
        raise MlaifyError("training text needs a tokenizer; pass one, or token ids [N, seq_len]")
    windows = []
    for path in text_paths(texts):
        ids = tokenize_file(path, tokenizer)
        n = ids.numel() // seq_len
        log.info("%s: %d tokens, %d windows of %d", path.name, ids.numel(), n, seq_len)
        windows.append(ids[: n * seq_len].view(n, seq_len))
    windows = torch.cat(windows)
    if len(windows) == 0:
        raise MlaifyError(
            f"the training text holds no window of {seq_len} tokens; give a longer text or lower --seq-len"
        )
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))
    return windows[order]


def eval_windows(texts: TextSource, tokenizer, windows: int, seq_len: int) -> torch.Tensor:
    """[N, seq_len] the first `windows` windows of one text tokenized as one string: the reference
    perplexity protocol's windows (eval/perplexity.py), so a 32 x 2048 eval of WikiText-2 test is it."""
    if isinstance(texts, torch.Tensor):
        return training_windows(texts, None, seq_len)
    paths = text_paths(texts)
    if len(paths) > 1:
        raise MlaifyError("give one eval text file")
    if tokenizer is None:
        raise MlaifyError("eval text needs a tokenizer; pass one, or token ids [N, seq_len]")
    ids = tokenize_text(paths[0], tokenizer)
    n = min(windows, ids.numel() // seq_len)
    if n == 0:
        raise MlaifyError(
            f"eval text {paths[0]} has {ids.numel()} tokens, fewer than one window of {seq_len}; "
            "give a longer text or lower the eval window length"
        )
    if n < windows:
        log.warning("eval text holds only %d windows of %d tokens (asked for %d)", n, seq_len, windows)
    return ids[: n * seq_len].view(n, seq_len)
