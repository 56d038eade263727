"""Which weights are active: per-layer lists of active blocks, and how they are first laid out.

A sparse layer's weight stays a dense tensor whose inactive entries are exactly zero (the forward is a
plain dense matmul). What is sparse is the bookkeeping: `block_idx` holds the ids of the active blocks
(int32, B consecutive weights of the row-major flattened weight each). Its order is the *slot* order
that the compact optimizer state follows; a topology update overwrites slots in place, so gradients
and Adam moments never need re-sorting.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from smet_lab.config import ConfigError


@dataclass
class SparseLayer:
    name: str
    param: nn.Parameter
    block_size: int
    block_idx: torch.Tensor  # int32 [k]: active block ids, in slot order

    @property
    def n_blocks(self) -> int:
        return self.param.numel() // self.block_size

    @property
    def n_active(self) -> int:
        return self.block_idx.numel()

    @property
    def density(self) -> float:
        return self.n_active / self.n_blocks

    def blocks(self, tensor: torch.Tensor | None = None) -> torch.Tensor:
        """View of the weight (or a same-shaped tensor) as [n_blocks, block_size]."""
        return (self.param.detach() if tensor is None else tensor).view(-1, self.block_size)

    def active_mask(self) -> torch.Tensor:
        """Dense bool mask [n_blocks] (transient; used by tests, masked baselines and reports)."""
        mask = torch.zeros(self.n_blocks, dtype=torch.bool, device=self.block_idx.device)
        mask[self.block_idx.long()] = True
        return mask

    @torch.no_grad()
    def apply_mask(self) -> None:
        """Zero every inactive entry (the invariant the optimizer relies on)."""
        keep = self.active_mask().unsqueeze(1)
        self.blocks().mul_(keep)


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

    @classmethod
    def build(
        cls,
        model: nn.Module,
        density: float,
        distribution: str = "uniform",
        block_size: int = 1,
        dense_patterns: list[str] = ("tok_embeddings", "output", "norm"),
        seed: int = 0,
    ) -> "SparseTopology":
        """Pick the sparse layers and a random initial topology with exactly round(d_l * n_blocks)
        active blocks per layer. Inactive weights are zeroed in place."""
        validate_sparsity(density, distribution, block_size)
        named = [(n, p) for n, p in model.named_parameters() if not is_dense(n, p, list(dense_patterns))]
        if density >= 1.0 or not named:
            return cls([], 1.0)
        for name, p in named:
            if p.numel() % block_size:
                raise ConfigError("sparsity.block_size", block_size, f"must divide the size of {name} ({p.numel()})")
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
            layers.append(layer)
        return cls(layers, density)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def block_size(self) -> int:
        return self.layers[0].block_size if self.layers else 1

    @property
    def numel(self) -> int:
        return sum(layer.param.numel() for layer in self.layers)

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
                "layers": {layer.name: layer.block_idx.clone().cpu() for layer in self.layers}}

    def load_state_dict(self, state: dict) -> None:
        saved = state["layers"]
        if set(saved) != {layer.name for layer in self.layers}:
            raise ValueError("checkpoint topology has different sparse layers than this model")
        for layer in self.layers:
            idx = saved[layer.name]
            if idx.numel() != layer.n_active:
                raise ValueError(f"checkpoint topology of {layer.name} has {idx.numel()} active blocks, expected {layer.n_active}")
            layer.block_idx.copy_(idx.to(layer.block_idx.device))
            layer.apply_mask()


def validate_sparsity(density, distribution: str, block_size) -> None:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ConfigError("sparsity.density", density, "a number in (0, 1]")
    if distribution not in DISTRIBUTIONS:
        raise ConfigError("sparsity.distribution", distribution, "one of " + ", ".join(DISTRIBUTIONS))
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ConfigError("sparsity.block_size", block_size, "a positive integer (1 = unstructured)")
