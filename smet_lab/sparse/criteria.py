"""Prune and growth rules. Each rule is one function; registering it in PRUNE / GROWTH makes it a
config option (`sparsity.prune`, `sparsity.growth`).

prune(layer, n) -> slots         (int64 positions in layer.block_idx, ascending ids, to vacate)
grow(layer, n, excluded, dense_grad, generator) -> block ids  (int64, currently inactive, not in
                                                            `excluded` = the blocks just pruned)
"""

from __future__ import annotations

import torch

from smet_lab.sparse.topology import SparseLayer, isin_sorted


def prune_magnitude(layer: SparseLayer, n: int) -> torch.Tensor:
    """The n active blocks with the smallest L1 magnitude."""
    scores = layer.gather().abs().sum(1)
    return torch.topk(scores, n, largest=False, sorted=False).indices


def grow_random(layer: SparseLayer, n: int, excluded: torch.Tensor, dense_grad, generator) -> torch.Tensor:
    """SET: n blocks uniformly at random among the inactive ones, never the blocks this update pruned.

    Rejection sampling against the sorted active list keeps memory O(active), not O(layer)."""
    device = layer.param.device
    active = layer.block_idx.long()  # ascending
    excluded = excluded.to(device, torch.long).sort().values
    chosen = torch.empty(0, dtype=torch.long, device=device)
    while chosen.numel() < n:
        draw = torch.randint(layer.n_blocks, (2 * (n - chosen.numel()) + 16,), generator=generator).to(device)
        draw = draw[~(isin_sorted(draw, active) | isin_sorted(draw, excluded))]
        # Deduplicate, then shuffle so that the kept subset is uniform (unique() sorts).
        draw = torch.unique(torch.cat([chosen, draw]))
        draw = draw[torch.randperm(draw.numel(), generator=generator).to(device)]
        chosen = draw[:n]
    return chosen


def grow_gradient(layer: SparseLayer, n: int, excluded: torch.Tensor, dense_grad, generator) -> torch.Tensor:
    """RigL: the n inactive blocks with the largest L1 norm of the dense gradient."""
    if dense_grad is None:
        raise RuntimeError(f"gradient growth needs the dense gradient of {layer.name} at the update step")
    scores = layer.blocks(dense_grad).abs().sum(1)
    taken = torch.cat([layer.block_idx.long(), excluded.long()])
    scores[taken] = -1.0  # active or just pruned: never chosen (scores are >= 0 otherwise)
    return torch.topk(scores, n, sorted=False).indices


PRUNE = {"magnitude": prune_magnitude}
GROWTH = {"random": grow_random, "gradient": grow_gradient}
