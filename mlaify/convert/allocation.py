"""Per-layer latent ranks under one total KV budget.

Layer l factored at rank r leaves the error `e_l(r) = sum_{j > r} lambda_{l,j}` (lowrank.py), so
raising its rank by one lowers the total by `lambda_{l, r+1}`. Because each curve is convex
(eigenvalues descend), giving each next unit of budget to the layer whose next eigenvalue is largest
(greedy on marginal error reduction) minimises `sum_l e_l(r_l)` subject to `sum_l r_l = total`.

The conversion feeds relative curves (`lambda / sum lambda`, the share of each layer's own energy)
and a floor of half the uniform rank: raw energies differ by orders of magnitude across layers
(massive activations), and on SmolLM2 the raw greedy starved whole layers (perplexity 16k at 96).
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
