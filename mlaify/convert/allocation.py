"""Per-layer latent ranks, and rope dims, under one total KV budget.

Layer l factored at rank r leaves the error `e_l(r) = sum_{j > r} lambda_{l,j}` (lowrank.py), so
raising its rank by one lowers the total by `lambda_{l, r+1}`. Because each curve is convex
(eigenvalues descend), giving each next unit of budget to the layer whose next eigenvalue is largest
(greedy on marginal error reduction) minimises `sum_l e_l(r_l)` subject to `sum_l r_l = total`.

The conversion feeds relative curves (`lambda / sum lambda`, the share of each layer's own energy)
and a floor of half the uniform rank: raw energies differ by orders of magnitude across layers
(massive activations), and on SmolLM2 the raw greedy starved whole layers (perplexity 16k at 96).

Rope dims split the same way: each (frequency pair, component) slot of a layer's rotated rope key
(rope.py, `rotate`) captures an eigenvalue of that layer's rotary score energy, and what a layer does
not keep is lost to the NoPE approximation; the same relative curves, the same floor.
"""

from __future__ import annotations

import heapq

import torch

from ..errors import MlaifyError


def allocate_ranks(
    eigenvalues: list[torch.Tensor], total: int, min_rank: int = 1, max_ranks: list[int] | None = None
) -> list[int]:
    """Ranks per layer summing to exactly `total`, each in [min_rank, max_ranks[l]]."""
    n = len(eigenvalues)
    caps = max_ranks or [lam.numel() for lam in eigenvalues]
    if total < n * min_rank or total > sum(caps):
        raise MlaifyError(
            f"a total latent rank of {total} cannot be split over {n} layers "
            f"with ranks in [{min_rank}, {max(caps)}]; "
            "change the KV budget"
        )
    ranks = [min_rank] * n
    heap = [(-float(lam[min_rank]), layer) for layer, lam in enumerate(eigenvalues) if min_rank < caps[layer]]
    heapq.heapify(heap)
    for _ in range(total - n * min_rank):
        _, layer = heapq.heappop(heap)
        ranks[layer] += 1
        if ranks[layer] < caps[layer]:
            heapq.heappush(heap, (-float(eigenvalues[layer][ranks[layer]]), layer))
    return ranks


def allocate_rope_slots(energies: list[torch.Tensor], slots: int) -> list[int]:
    """Rope slots (2 rotary dims each) per layer summing to `slots` per layer, each at least half of it,
    from each layer's `rotate` eigenvalues ([pairs, n_kv], rope.rotated_components)."""
    curves = []
    for lam in energies:
        lam = lam.clamp_min(0).flatten().sort(descending=True).values
        curves.append(lam / lam.sum().clamp_min(1e-30))
    return allocate_ranks(curves, slots * len(curves), min_rank=max(1, slots // 2))
