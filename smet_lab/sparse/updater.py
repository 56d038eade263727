"""The topology updater: every `update_every` steps, prune a scheduled fraction of each sparse layer's
active blocks and regrow as many elsewhere (density stays constant)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from smet_lab.config import ConfigError
from smet_lab.sparse.criteria import GROWTH, PRUNE
from smet_lab.sparse.schedules import SCHEDULES, prune_rate_at
from smet_lab.sparse.topology import SparseTopology


@dataclass
class RegrowEvent:
    """One layer's change at one update: `old_blocks` were deactivated and `new_blocks` activated;
    `slots` are the positions in the layer's new block_idx (ascending ids) that hold `new_blocks`, in
    the same order. Surviving blocks keep their relative order, so their slots shift; with
    `old_slots` (where old_blocks were) the move is O(k) to apply (topology.moved_from)."""

    layer: int
    slots: torch.Tensor
    old_blocks: torch.Tensor
    new_blocks: torch.Tensor
    old_slots: Optional[torch.Tensor] = None  # positions of old_blocks in the previous block_idx


class DynamicSparsity:
    def __init__(
        self,
        topology: SparseTopology,
        total_steps: int,
        update_every: int = 100,
        prune_rate: float = 0.3,
        prune_schedule: str = "cosine",
        prune: str = "magnitude",
        growth: str = "random",
        seed: int = 0,
    ):
        validate_dynamic(update_every, prune_rate, prune_schedule, prune, growth)
        self.topology = topology
        self.total_steps = total_steps
        self.update_every = update_every
        self.prune_rate = prune_rate
        self.prune_schedule = prune_schedule
        self.prune_fn = PRUNE[prune]
        self.grow_fn = GROWTH[growth]
        self.needs_gradient = growth == "gradient"
        self.generator = torch.Generator().manual_seed(seed + 7919)

    @property
    def enabled(self) -> bool:
        return self.update_every > 0 and len(self.topology) > 0 and self.prune_rate > 0

    def is_update_step(self, step: int) -> bool:
        """True after optimizer step `step` if the topology changes there (never at the last step)."""
        return self.enabled and step > 0 and step % self.update_every == 0 and step < self.total_steps

    def rate_at(self, step: int) -> float:
        return prune_rate_at(self.prune_schedule, self.prune_rate, step, self.total_steps)

    @torch.no_grad()
    def update(self, step: int, dense_grads: dict[int, torch.Tensor] | None = None) -> list[RegrowEvent]:
        rate = self.rate_at(step)
        events = []
        for i, layer in enumerate(self.topology.layers):
            n = min(int(rate * layer.n_active), layer.n_blocks - layer.n_active)
            if n <= 0:
                continue
            pruned = self.prune_fn(layer, n)
            old = layer.block_idx[pruned].long()
            new = self.grow_fn(layer, n, old, (dense_grads or {}).get(i), self.generator)
            layer.zero_blocks(old)  # pruned weights are removed...
            layer.zero_blocks(new)  # ...and regrown ones start at zero
            slots, pruned = layer.replace(old, new, old_slots=pruned)
            # int32: the events of all layers are alive together until the optimizer's regrow
            events.append(RegrowEvent(i, slots, old.int(), new.int(), pruned))
        return events

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def validate_dynamic(update_every, prune_rate, prune_schedule, prune, growth) -> None:
    if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 0:
        raise ConfigError("sparsity.update_every", update_every, "a non-negative integer number of steps (0 = static)")
    if isinstance(prune_rate, bool) or not isinstance(prune_rate, (int, float)) or not 0.0 <= prune_rate < 1.0:
        raise ConfigError("sparsity.prune_rate", prune_rate, "a number in [0, 1)")
    if prune_schedule not in SCHEDULES:
        raise ConfigError("sparsity.prune_schedule", prune_schedule, "one of " + ", ".join(SCHEDULES))
    if prune not in PRUNE:
        raise ConfigError("sparsity.prune", prune, "one of " + ", ".join(PRUNE))
    if growth not in GROWTH:
        raise ConfigError("sparsity.growth", growth, "one of " + ", ".join(GROWTH))
