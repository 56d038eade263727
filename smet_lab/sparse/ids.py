"""Set operations on ascending block ids and slots, without sorting or dense-size work (used by the
topology's replace, the growth rules, the compact state's re-order and the stability probes)."""

from __future__ import annotations

import numpy as np
import torch


def flatnonzero(mask: torch.Tensor) -> torch.Tensor:
    """int64: the positions of True in a 1-D bool tensor, ascending (as mask.nonzero().view(-1)). On CPU
    through numpy: its flatnonzero is 3-5x faster than torch's nonzero there (measured, 1 thread: 11k
    entries 10 vs 28 us, 1M entries 0.70 vs 3.4 ms); a topology update makes several such calls per layer."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return mask.nonzero().view(-1)


def isin_sorted(values: torch.Tensor, sorted_ids: torch.Tensor) -> torch.Tensor:
    """Membership of `values` in an ascending id list, without a dense-size mask (O(len log len))."""
    if sorted_ids.numel() == 0:
        return torch.zeros_like(values, dtype=torch.bool)
    pos = torch.searchsorted(sorted_ids, values).clamp_(max=sorted_ids.numel() - 1)
    return sorted_ids[pos] == values


def blocks_taken(n_blocks: int, *id_sets: torch.Tensor) -> torch.Tensor:
    """bool [n_blocks], True at the given block ids: O(1) membership for an update's rules, ~20x faster
    than binary searches in the sorted id lists. Transient, 1 byte per block, one layer (or a run of
    small layers, topology.RUN_BLOCKS) at a time."""
    taken = torch.zeros(n_blocks, dtype=torch.bool, device=id_sets[0].device if id_sets else None)
    for ids in id_sets:
        taken.index_fill_(0, ids.to(taken.device, torch.long), True)  # (cheaper than taken[ids] = True)
    return taken


def complement(k: int, slots: torch.Tensor) -> torch.Tensor:
    """int64: the positions in [0, k) not in `slots` (distinct), ascending. O(k)."""
    free = torch.ones(k, dtype=torch.bool, device=slots.device)
    free.index_fill_(0, slots.long(), False)
    return flatnonzero(free)


def moved_from(k: int, old_slots: torch.Tensor, new_slots: torch.Tensor) -> torch.Tensor:
    """int64 [k]: for every slot of a layer after `replace`, the slot its block held before, -1 for
    the new blocks. Survivors keep their relative order, so the r-th survivor moves from the r-th
    slot not in old_slots to the r-th slot not in new_slots. O(k), no dense-size tensor."""
    device = new_slots.device
    source = torch.full((k,), -1, dtype=torch.long, device=device)
    source.index_copy_(0, complement(k, new_slots), complement(k, old_slots.to(device)))
    return source
