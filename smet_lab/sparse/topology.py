"""Which weights are active: the sparse layers of a model (smet_lab.sparse.layer), how their active
blocks are first laid out (uniform or ERK densities), and their position lists kept in one flat store
so that a run of layers is decoded (`padded_ids`) and changed (`replace`) in one pass.
"""

from __future__ import annotations

import re
from itertools import accumulate

import torch
import torch.nn as nn

from smet_lab.config import ConfigError
from smet_lab.sparse.compact_linear import make_compact
from smet_lab.sparse.layer import CHUNK, SparseLayer, decode, encode, swap_blocks

RUN_BLOCKS = 1 << 20  # padded blocks a topology update maps at once (SparseTopology.runs): <= 5 MiB transient


def is_dense(name: str, param: torch.Tensor, dense_patterns: list[str]) -> bool:
    """Dense if 1-D (norms, biases) or the parameter name matches any regex in dense_patterns."""
    return param.dim() < 2 or any(re.search(p, name) for p in dense_patterns)


def erk_densities(shapes: list[tuple[int, ...]], density: float) -> list[float]:
    """Erdos-Renyi-Kernel layer densities (RigL): d_l proportional to sum(shape)/prod(shape), scaled so
    the total active count is `density` of all weights; layers that would exceed 1 are made dense and
    the rest rescaled (iterate until none exceeds 1)."""
    numels = [float(torch.Size(s).numel()) for s in shapes]
    raw = [sum(s) / n for s, n in zip(shapes, numels)]
    dense: set[int] = set()
    while True:
        budget = density * sum(numels) - sum(numels[i] for i in dense)
        denom = sum(raw[i] * numels[i] for i in range(len(shapes)) if i not in dense)
        eps = budget / denom
        over = {i for i in range(len(shapes)) if i not in dense and eps * raw[i] > 1.0}
        if not over:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(shapes))]
        dense |= over


DISTRIBUTIONS = {
    "uniform": lambda shapes, density: [density] * len(shapes),
    "erk": erk_densities,
}


class SparseTopology:
    """The set of sparse layers of a model and their active blocks."""

    def __init__(self, layers: list[SparseLayer], target_density: float):
        self.layers = layers
        self.target_density = target_density
        # One flat position store: every layer's offsets and counts are views of it (see padded_ids).
        self.slot_start = [0, *accumulate(layer.n_active for layer in layers)]
        self.chunk_start = [0, *accumulate(layer.n_chunks for layer in layers)]
        self.offsets = torch.cat([layer.offsets for layer in layers]) if layers else None
        self.counts = torch.cat([layer.counts for layer in layers]) if layers else None
        for i, layer in enumerate(layers):
            layer.offsets = self.offsets[self.slot_start[i]:self.slot_start[i + 1]]
            layer.counts = self.counts[self.chunk_start[i]:self.chunk_start[i + 1]]
            layer.in_store = True

    def padded_ids(self, first: int, last: int) -> torch.Tensor:
        """int32: the active block ids of layers first..last-1 in one pass, layer after layer in slot order,
        each layer's ids shifted by CHUNK * (chunk_start[i] - chunk_start[first]): its blocks numbered
        as if every layer were padded to a whole number of chunks."""
        return decode(*self.store(first, last))

    def store(self, first: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of layers first..last-1's part of the flat position store: (offsets, counts)."""
        return (self.offsets[self.slot_start[first]:self.slot_start[last]],
                self.counts[self.chunk_start[first]:self.chunk_start[last]])

    def runs(self) -> list[tuple[int, int]]:
        """Consecutive layers (first, last) of at most RUN_BLOCKS padded blocks together (or one larger
        layer): what a topology update decodes and replaces in one pass."""
        runs, first = [], 0
        for i in range(1, len(self.layers)):
            if CHUNK * (self.chunk_start[i + 1] - self.chunk_start[first]) > RUN_BLOCKS:
                runs.append((first, i))
                first = i
        return runs + [(first, len(self.layers))] if self.layers else []

    def layer_ids(self, padded: torch.Tensor, first: int, i: int) -> torch.Tensor:
        """Layer i's active ids (a new tensor) out of padded_ids(first, last) (first <= i < last)."""
        at = self.slot_start[first]
        return padded[self.slot_start[i] - at:self.slot_start[i + 1] - at] \
            - CHUNK * (self.chunk_start[i] - self.chunk_start[first])

    @torch.no_grad()
    def replace(self, first: int, last: int, changes: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]],
                active: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """SparseLayer.replace(old_blocks, new_blocks, old_slots, check=False) for layers first..last-1 at
        once: `changes` = [(layer index, old_blocks, new_blocks, old_slots)], at most one per layer, in
        layer order; `active`: padded_ids(first, last) as int64, if the caller has them. One block map over
        the run's padded blocks instead of one per layer (a small layer's replace is ~25 small ops).
        Returns the int32 (slots, old_slots) of every change."""
        if not changes:
            return []
        active = self.padded_ids(first, last).long() if active is None else active
        base = {i: CHUNK * (self.chunk_start[i] - self.chunk_start[first]) for i, *_ in changes}
        old = torch.cat([o.to(active.device, torch.long) + base[i] for i, o, _, _ in changes])
        new = torch.cat([n.to(active.device, torch.long) + base[i] for i, _, n, _ in changes])
        ids, slots = swap_blocks(CHUNK * (self.chunk_start[last] - self.chunk_start[first]), active, old, new)
        for view, value in zip(self.store(first, last), encode(ids, self.chunk_start[last] - self.chunk_start[first])):
            view.copy_(value)
        done = []
        for (i, o, n, old_slots), s in zip(changes, slots.split([n.numel() for _, _, n, _ in changes])):
            s = s - (self.slot_start[i] - self.slot_start[first])
            old_slots = old_slots.to(s.device, torch.long)
            self.layers[i].follow(o.to(s.device, torch.long), n.to(s.device, torch.long), old_slots, s)
            done.append((s.int(), old_slots.int()))
        return done

    @classmethod
    def build(
        cls,
        model: nn.Module,
        density: float,
        distribution: str = "uniform",
        block_size: int = 1,
        dense_patterns: list[str] = ("tok_embeddings", "output", "norm"),
        seed: int = 0,
        weights: str = "dense",
    ) -> "SparseTopology":
        """Pick the sparse layers and a random initial topology with exactly round(d_l * n_blocks)
        active blocks per layer. Inactive weights are zeroed in place; with weights="compact" each
        sparse nn.Linear is then replaced by a CompactLinear holding only its active values."""
        validate_sparsity(density, distribution, block_size, weights)
        validate_patterns(dense_patterns)
        named = sparse_params(model, dense_patterns)
        if density >= 1.0 or not named:
            return cls([], 1.0)
        check_blocks(named, block_size)
        shapes = [tuple(p.shape) for _, p in named]
        densities = DISTRIBUTIONS[distribution](shapes, density)
        gen = torch.Generator().manual_seed(seed)
        layers = []
        for (name, p), d in zip(named, densities):
            n_blocks = p.numel() // block_size
            k = min(n_blocks, max(1, round(d * n_blocks)))
            idx = torch.randperm(n_blocks, generator=gen)[:k].sort().values.to(torch.int32).to(p.device)
            layer = SparseLayer(name, p, block_size, idx)
            layer.apply_mask()
            if weights == "compact":
                make_compact(model, layer)  # the model no longer holds its dense weight
            layers.append(layer)
        return cls(layers, density)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def block_size(self) -> int:
        return self.layers[0].block_size if self.layers else 1

    @property
    def numel(self) -> int:
        return sum(layer.numel for layer in self.layers)

    def index_bytes(self) -> int:
        """Bytes of the persistent position store of all sparse layers."""
        return sum(layer.index_bytes() for layer in self.layers)

    @property
    def n_active_weights(self) -> int:
        return sum(layer.n_active * layer.block_size for layer in self.layers)

    def density(self) -> float:
        """Realised density over the sparse layers (1.0 when there are none)."""
        return self.n_active_weights / self.numel if self.layers else 1.0

    def layer_densities(self) -> dict[str, float]:
        return {layer.name: layer.density for layer in self.layers}

    def state_dict(self) -> dict:
        return {"target_density": self.target_density,
                "layers": {layer.name: layer.block_ids().cpu() for layer in self.layers}}

    def load_state_dict(self, state: dict) -> None:
        saved = state["layers"]
        if set(saved) != {layer.name for layer in self.layers}:
            raise ValueError("checkpoint topology has different sparse layers than this model")
        for layer in self.layers:
            idx = saved[layer.name]
            if idx.numel() != layer.n_active:
                raise ValueError(f"checkpoint topology of {layer.name} has {idx.numel()} active blocks, expected {layer.n_active}")
            layer.set_block_ids(idx)
            layer.apply_mask()


WEIGHT_STORAGE = ("dense", "compact")


def sparse_params(model: nn.Module, dense_patterns) -> list[tuple[str, nn.Parameter]]:
    """The parameters a topology makes sparse: the matrices whose names match none of dense_patterns."""
    return [(n, p) for n, p in model.named_parameters() if not is_dense(n, p, list(dense_patterns))]


def check_blocks(named: list[tuple[str, nn.Parameter]], block_size: int) -> None:
    for name, p in named:
        if p.numel() % block_size:
            raise ConfigError("sparsity.block_size", block_size, f"must divide the size of {name} ({p.numel()})")


def validate_patterns(dense_patterns) -> None:
    for pattern in dense_patterns:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as e:
            raise ConfigError("sparsity.dense_patterns", pattern, f"a regular expression ({e})") from None


def validate_sparsity(density, distribution: str, block_size, weights: str = "dense") -> None:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ConfigError("sparsity.density", density, "a number in (0, 1]")
    if distribution not in DISTRIBUTIONS:
        raise ConfigError("sparsity.distribution", distribution, "one of " + ", ".join(DISTRIBUTIONS))
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ConfigError("sparsity.block_size", block_size, "a positive integer (1 = unstructured)")
    if weights not in WEIGHT_STORAGE:
        raise ConfigError("sparsity.weights", weights, "one of " + ", ".join(WEIGHT_STORAGE))
