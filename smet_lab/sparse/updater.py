"""The topology updater: every `update_every` steps, prune a scheduled fraction of each sparse layer's
active blocks and regrow as many elsewhere (density stays constant).

It owns the dense-gradient hand-off of growth rules that need it (RigL): `begin_step(step)` arms a
dense-gradient hook on the sparse layers for update steps only, `update(step)` hands the captured
dense gradients to the rule and drops them. With dense weights that is a tensor hook, which runs
before any post-accumulate-grad hook (where the optimizer gathers and frees the dense gradient); with
compact weights the layer's backward calls it (SparseLayer.register_dense_grad_hook)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from smet_lab.config import ConfigError, SparsityConfig
from smet_lab.sparse.criteria import GROWTH, PRUNE, GrowthContext, PruneContext, checked_growth, checked_prune
from smet_lab.sparse.ids import complement
from smet_lab.sparse.schedules import SCHEDULES, prune_rate_at
from smet_lab.sparse.topology import SparseTopology


@dataclass
class RegrowEvent:
    """One layer's change at one update: `old_blocks` were deactivated and `new_blocks` activated;
    `slots` are the positions in the layer's new block_ids() (ascending ids) that hold `new_blocks`, in
    the same order. Surviving blocks keep their relative order, so their slots shift; with
    `old_slots` (where old_blocks were) the move is O(k) to apply (topology.moved_from)."""

    layer: int
    slots: torch.Tensor
    old_blocks: torch.Tensor
    new_blocks: torch.Tensor
    old_slots: Optional[torch.Tensor] = None  # positions of old_blocks in the previous block_ids()


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
        self.prune, self.growth = prune, growth
        self.needs_dense_grad = GROWTH[growth].needs_dense_grad
        self.generator = torch.Generator().manual_seed(seed + 7919)
        self._armed = False
        self._dense_grads: dict[int, torch.Tensor] = {}
        # Several processes: averages the captured dense gradients in place (World.average).
        self.reduce_grads = None
        self._hooks = [layer.register_dense_grad_hook(self._capture(i)) for i, layer in enumerate(topology.layers)] \
            if self.needs_dense_grad else []

    @classmethod
    def from_config(cls, topology: SparseTopology, cfg: SparsityConfig, total_steps: int, seed: int) -> "DynamicSparsity":
        """The updater a `sparsity` config section describes."""
        return cls(topology, total_steps, cfg.update_every, cfg.prune_rate, cfg.prune_schedule, cfg.prune,
                   cfg.growth, seed=seed)

    def _capture(self, i: int):
        def hook(grad: torch.Tensor) -> None:  # one call per micro-batch: accumulate
            if self._armed:
                prev = self._dense_grads.get(i)
                self._dense_grads[i] = grad.detach().clone() if prev is None else prev.add_(grad)
        return hook

    def begin_step(self, step: int) -> None:
        """Call before the backward passes of optimizer step `step`: a growth rule that needs the dense
        gradient gets it captured at update steps (and only there)."""
        self._armed = self.needs_dense_grad and self.is_update_step(step)

    @property
    def enabled(self) -> bool:
        return self.update_every > 0 and len(self.topology) > 0 and self.prune_rate > 0

    def is_update_step(self, step: int) -> bool:
        """True after optimizer step `step` if the topology changes there (never at the last step)."""
        return self.enabled and step > 0 and step % self.update_every == 0 and step < self.total_steps

    def rate_at(self, step: int) -> float:
        return prune_rate_at(self.prune_schedule, self.prune_rate, step, self.total_steps)

    @torch.no_grad()
    def update(self, step: int) -> list[RegrowEvent]:
        grads, self._dense_grads, self._armed = self._dense_grads, {}, False
        if self.needs_dense_grad and len(grads) < len(self.topology.layers):
            raise RuntimeError(f"sparsity.growth={self.growth} needs the dense gradients of step {step}: "
                               f"call begin_step({step}) before its backward pass")
        if grads and self.reduce_grads is not None:
            self.reduce_grads([grads[i] for i in sorted(grads)])
        rate, topo, events = self.rate_at(step), self.topology, []
        for first, last in topo.runs():  # a run of layers is decoded and replaced in one pass
            padded, changes = topo.padded_ids(first, last).long(), []
            for i in range(first, last):
                layer = topo.layers[i]
                n = min(int(rate * layer.n_active), layer.n_blocks - layer.n_active)
                if n > 0:
                    changes.append((i, *self._choose(layer, topo.layer_ids(padded, first, i), n, grads.pop(i, None))))
            # The pruned weights go, the regrown start at 0 (ids valid: from built-in or checked rules).
            for (i, old, new, _), (slots, pruned) in zip(changes, topo.replace(first, last, changes, active=padded)):
                # int32: the events of all layers are alive together until the optimizer's regrow
                events.append(RegrowEvent(i, slots, old.int(), new.int(), pruned))
        return events

    def _choose(self, layer, active: torch.Tensor, n: int, grad: torch.Tensor | None):
        """The rules' choice for one layer: (old blocks, new blocks, old blocks' slots), int64."""
        weights = layer.gather(ids=None if layer.compact else active)
        pruned = checked_prune(self.prune, PruneContext(layer.name, layer.n_blocks, layer.block_size, active, weights,
                                                        n, self.generator))
        old = active.index_select(0, pruned)
        kept = active.index_select(0, complement(active.numel(), pruned))
        new = checked_growth(self.growth, GrowthContext(layer.name, layer.n_blocks, layer.block_size, kept, old, n,
                                                        self.generator, None if grad is None else layer.blocks(grad)))
        return old, new, pruned

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
