"""Write tensors into safetensors shards as they come, so a model never has to be whole in memory.

The layout is the one `save_pretrained` writes and `from_pretrained` reads: `model.safetensors` when
everything fits one shard, else `model-0000k-of-0000n.safetensors` plus `model.safetensors.index.json`
(its `weight_map`). The same tensors in the same order give the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"


class ShardWriter:
    """Buffers at most `shard_bytes` of tensors, then writes them out as the next shard."""

    def __init__(self, folder: str | Path, shard_bytes: int):
        self.folder, self.shard_bytes = Path(folder), shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []  # the tensor names of each written shard
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.shard_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        save_file(self.pending, self.folder / f"shard-{len(self.shards)}.tmp", metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        """Write the last shard and give every shard its final name (and the index, if several)."""
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            (self.folder / "shard-0.tmp").rename(self.folder / "model.safetensors")
            return
        weight_map = {}
        for k, names in enumerate(self.shards):
            final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            (self.folder / f"shard-{k}.tmp").rename(self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
