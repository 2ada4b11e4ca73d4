"""The latent KV cache: `c_kv` and the rope keys of each token packed in one preallocated buffer.

Self-contained (imports torch and transformers only); `modeling_mlaify.py` imports it relatively,
so `save_pretrained` copies it along for `trust_remote_code=True`.

Notation as in modeling_mlaify.py: B batch, S new tokens, T cached tokens, R rope heads,
r = kv_lora_rank, dr = qk_rope_head_dim, E = r + R * dr (values cached per token).
"""

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer


class LatentCacheLayer(DynamicLayer):
    """One layer's latent cache, rows `[c_kv ; k_rope_0 ; ... ; k_rope_{R-1}]` in one buffer.

    `stores[0]`: [B, capacity, E], the first `length` rows filled. New tokens are written in place;
    a full buffer is reallocated with a quarter more room (at least `CHUNK` tokens), so a generation
    copies its history O(log T) times instead of at every step as `torch.cat` growth does.
    `keys` [B, 1, T, r] and `values` [B, R, T, dr] are views of the filled rows (the Cache API's
    names); MLAAttention recognises them as one buffer and reads each row in a single pass.
    MLAAttention swaps these in for a stock `DynamicCache`'s empty layers, so `generate()` and
    `DynamicCache(config=model.config)` need nothing else.
    """

    CHUNK = 128  # spare tokens on the first allocation: a prompt is usually followed by a generation

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, _, _, r = key_states.shape
        _, R, _, dr = value_states.shape
        self.device, self.dtype = key_states.device, key_states.dtype
        self.rank, self.n_rope_heads, self.rope_dim = r, R, dr
        self.length = 0
        self.stores = self._empty_stores(B)
        self.is_initialized = True

    def _empty_stores(self, batch: int) -> list[torch.Tensor]:
        """The tensors holding the cache, token axis 1: here the packed latent [B, 0, E]."""
        width = self.rank + self.n_rope_heads * self.rope_dim
        return [torch.empty(batch, 0, width, dtype=self.dtype, device=self.device)]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append `c_kv` [B, 1, S, r] and `k_rope` [B, R, S, dr]; return all T tokens' (c_kv, k_rope)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, self.length = self.length, self.length + key_states.shape[-2]
        self._reserve(self.length)
        self._write(start, key_states.squeeze(1), value_states.transpose(1, 2))
        self._set_views()
        return self._read()

    def _reserve(self, needed: int) -> None:
        capacity = self.stores[0].shape[1]
        if needed <= capacity:
            return
        capacity = needed + max(self.CHUNK, capacity // 4)
        grown = []
        for store in self.stores:
            new = store.new_empty(store.shape[0], capacity, *store.shape[2:])
            new[:, : store.shape[1]] = store
            grown.append(new)
        self.stores = grown

    def _write(self, start: int, c_kv: torch.Tensor, k_rope: torch.Tensor) -> None:
        """Rows `start:length` from c_kv [B, S, r] and k_rope [B, S, R, dr]."""
        rows = self.stores[0][:, start : self.length]  # [B, S, E]
        rows[..., : self.rank] = c_kv
        rows[..., self.rank :].unflatten(-1, (self.n_rope_heads, self.rope_dim)).copy_(k_rope)

    start = 0  # first live row (a sliding layer drops older ones)

    def _set_views(self) -> None:
        rows = self.stores[0][:, self.start : self.length]
        self.keys, self.values = _split(rows, self.rank, self.n_rope_heads)

    def _read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What attention reads: the stored views themselves."""
        return self.keys, self.values

    def nbytes(self) -> tuple[int, int]:
        """(bytes of the filled rows, bytes allocated), over every stored tensor."""
        used = sum(s[:, self.start : self.length].numel() * s.element_size() for s in self.stores)
        return used, sum(s.numel() * s.element_size() for s in self.stores)

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def reset(self) -> None:
        self.stores, self.length = [], 0
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if self.is_initialized and tokens_to_remove:
            self.length = max(0, self.length + tokens_to_remove)
            self._set_views()

    def _map_batch(self, fn) -> None:
        if self.get_seq_length() > 0:
            self.stores = [fn(s) for s in self.stores]
            self._set_views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda s: s.index_select(0, beam_idx.to(s.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda s: s.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda s: s[indices])


class SlidingLatentCacheLayer(LatentCacheLayer):
    """A sliding-window layer's latent cache: only the last `sliding_window - 1` tokens are kept (with
    the new ones, the window a query sees), so the layer's memory stops growing.

    The live rows are `stores[0][:, start:length]`; rows before `start` are dead and are dropped by
    moving the live ones to the front of the same buffer only when it is full, so a decoding step
    copies nothing but its own row (amortised) and the buffer stops growing at about
    `sliding_window + CHUNK` rows. Positions and masks follow transformers' sliding layers:
    `get_seq_length` counts every token seen, `get_mask_sizes` the visible ones.
    """

    is_sliding = True

    def __init__(self, sliding_window: int):
        super().__init__()
        self.sliding_window = sliding_window
        self.cumulative_length = 0
        self.start = 0

    def update(self, key_states, value_states, *args, **kwargs):
        """Append the new tokens and return them with the window before them; then forget what the
        next query no longer sees (the returned views stay valid: rows move only at the next update)."""
        if (
            self.is_initialized
            and self.start > 0
            and self.length + key_states.shape[-2] > self.stores[0].shape[1]
        ):
            live = self.length - self.start
            for store in self.stores:  # in place: the buffer keeps its size
                store[:, :live] = store[:, self.start : self.length].clone()
            self.length, self.start = live, 0
        self.cumulative_length += key_states.shape[-2]
        out = super().update(key_states, value_states, *args, **kwargs)
        self.start = max(self.start, self.length - (self.sliding_window - 1))
        self._set_views()
        return out

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(keys visible to `query_length` new queries, position of the first), before they are added."""
        seen = self.cumulative_length
        return min(seen, self.sliding_window - 1) + query_length, max(seen - self.sliding_window + 1, 0)

    def get_max_length(self) -> int:
        return self.sliding_window

    def reset(self) -> None:
        self.cumulative_length = self.start = 0
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "a sliding-window latent cache cannot be cropped: it has dropped old tokens"
        )


class Int8LatentCacheLayer(LatentCacheLayer):
    """The latent cache in int8: E bytes per token plus 4 * (1 + R) bytes of float32 scales.

    `stores`: the int8 rows [B, capacity, E] and their scales [B, capacity, 1 + R] (absmax / 127 of
    `c_kv` and of each rope head, per token). `keys` / `values` are int8 views; `update` returns the
    whole history dequantized into a fresh float tensor, freed after the layer's attention, so only
    one layer's float copy exists at a time. Every attention read, prefill included, sees int8 values.
    """

    def _empty_stores(self, batch: int) -> list[torch.Tensor]:
        width = self.rank + self.n_rope_heads * self.rope_dim
        return [
            torch.empty(batch, 0, width, dtype=torch.int8, device=self.device),
            torch.empty(batch, 0, 1 + self.n_rope_heads, dtype=torch.float32, device=self.device),
        ]

    def _write(self, start: int, c_kv: torch.Tensor, k_rope: torch.Tensor) -> None:
        rows, scales = (s[:, start : self.length] for s in self.stores)  # [B, S, E], [B, S, 1 + R]
        for values, out, scale in (
            (c_kv.unsqueeze(-2), rows[..., : self.rank].unsqueeze(-2), scales[..., :1]),  # [B, S, 1, r]
            (
                k_rope,
                rows[..., self.rank :].unflatten(-1, (self.n_rope_heads, self.rope_dim)),
                scales[..., 1:],
            ),
        ):
            step = values.abs().amax(-1).float().clamp_min(1e-12) / 127  # [B, S, parts]
            scale.copy_(step)
            out.copy_((values / step.unsqueeze(-1)).round_().clamp_(-127, 127))

    def _read(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows, scales = (s[:, : self.length] for s in self.stores)
        out = torch.empty(rows.shape, dtype=self.dtype, device=self.device)  # [B, T, E]
        torch.mul(rows[..., : self.rank], scales[..., :1], out=out[..., : self.rank])
        rope = (self.n_rope_heads, self.rope_dim)
        torch.mul(
            rows[..., self.rank :].unflatten(-1, rope),
            scales[..., 1:, None],
            out=out[..., self.rank :].unflatten(-1, rope),
        )
        return _split(out, self.rank, self.n_rope_heads)


def _split(rows: torch.Tensor, rank: int, n_rope_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of packed rows [B, T, E]: c_kv [B, 1, T, r] and k_rope [B, R, T, dr]."""
    c_kv = rows[..., :rank].unsqueeze(1)
    k_rope = rows[..., rank:].unflatten(-1, (n_rope_heads, -1)).transpose(1, 2)
    return c_kv, k_rope


class Int8LatentCache(DynamicCache):
    """A cache storing the latent in int8 (about 3.5x fewer bytes than float32); pass it as `cache=`.

    `model.generate(ids, cache=Int8LatentCache())` or `model(ids, cache=Int8LatentCache(), use_cache=True)`;
    `model.config.latent_cache_dtype = "int8"` does the same for every cache, saved with the model.
    Logits move by the int8 round-off of c_kv and k_rope (tests bound it).
    """

    # Its layers are created on first use; MLAAttention makes each of its own an Int8LatentCacheLayer
    # (use_latent_layer), and a layer that kept the source's attention stays a stock one.


def use_latent_layer(cache, layer_idx: int, int8: bool = False, sliding_window: int | None = None) -> None:
    """Make layer `layer_idx` of a stock `DynamicCache` a latent one: `LatentCacheLayer` (int8, or an
    `Int8LatentCache`: its int8 kind), or `SlidingLatentCacheLayer` for a sliding-window layer.

    transformers builds plain `DynamicLayer`s (torch.cat growth), or `DynamicSlidingWindowLayer`s from
    a config with sliding layers; a cache built without a config creates its layers on first use, so
    the missing ones are created here as it would (a layer that kept the source's attention keeps
    the stock kind). Layers of another type, or already holding tokens, are kept.
    """
    layers = cache.layers
    if cache.layer_class_to_replicate is not None:
        while len(layers) <= layer_idx:
            layers.append(cache.layer_class_to_replicate())
    stock = (DynamicLayer, DynamicSlidingWindowLayer)
    if layer_idx >= len(layers) or type(layers[layer_idx]) not in stock or layers[layer_idx].is_initialized:
        return
    if int8 or isinstance(cache, Int8LatentCache):
        layers[layer_idx] = Int8LatentCacheLayer()
    elif sliding_window is not None:
        layers[layer_idx] = SlidingLatentCacheLayer(sliding_window)
    else:
        layers[layer_idx] = LatentCacheLayer()


__all__ = [
    "Int8LatentCache",
    "Int8LatentCacheLayer",
    "LatentCacheLayer",
    "SlidingLatentCacheLayer",
    "use_latent_layer",
]
