"""The interface of the sparse layers' Adam state, and what both layouts share.

Every layout keeps three float32 buffers shaped [rows, block_size] over all sparse layers, layer after
layer (rows(i) is layer i's part): `grad`, `exp_avg`, `exp_avg_sq`. How many rows a layer has, how a
dense gradient lands in them, how an update leaves them, and how each row knows its local step is the
layout's business (CompactState, MaskedState); SMETAdam runs the Adam arithmetic on the buffers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from itertools import accumulate

import torch

from smet_lab.sparse.layer import SparseLayer
from smet_lab.sparse.topology import SparseTopology
from smet_lab.sparse.updater import RegrowEvent

STEP_CHUNK = 1 << 20  # state entries per chunk of the update's temporaries (4 MiB per float32 temp)


def nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class SparseState(ABC):
    """Base class: the flat buffers, their per-layer offsets and the chunks the update is formed in."""

    births: torch.Tensor | None = None  # int64 birth step per cohort (compact layout with a local step)
    keeps_compact_weights = False  # whether the layout can train layers with sparsity.weights=compact

    def __init__(self, topology: SparseTopology, betas: tuple[float, float], reset_step: bool,
                 warmup_steps: int, warmup_kind: str):
        self.topology, self.layers = topology, topology.layers
        self.betas, self.reset_step = betas, reset_step
        self.warmup_steps, self.warmup_kind = warmup_steps, warmup_kind
        self.offsets = [0, *accumulate(self.n_rows(layer) for layer in self.layers)]
        self.device = self.layers[0].param.device if self.layers else torch.device("cpu")
        if any(layer.compact for layer in self.layers) and not self.keeps_compact_weights:
            raise ValueError(f"{type(self).__name__} needs dense weights (sparsity.weights=dense)")
        shape = (self.offsets[-1], topology.block_size)
        self.grad, self.exp_avg, self.exp_avg_sq = (torch.zeros(shape, dtype=torch.float32, device=self.device)
                                                    for _ in range(3))
        self.needs_age = (reset_step or warmup_steps > 0) and bool(self.layers)
        # Consecutive layers grouped into chunks of >= STEP_CHUNK entries: bounds the update's temporaries.
        self.chunks, first = [], 0
        for i in range(len(self.layers)):
            if (self.offsets[i + 1] - self.offsets[first]) * shape[1] >= STEP_CHUNK or i == len(self.layers) - 1:
                self.chunks.append((first, i + 1))
                first = i + 1
        self.step, self.warming = 0, False

    def rows(self, i: int) -> slice:
        return slice(self.offsets[i], self.offsets[i + 1])

    def span(self, first: int, last: int) -> slice:
        return slice(self.offsets[first], self.offsets[last])

    def global_bias_corrections(self) -> tuple[float, float]:
        b1, b2 = self.betas
        return 1 - b1 ** self.step, 1 - b2 ** self.step

    def regrow(self, events: list[RegrowEvent], step: int) -> torch.Tensor | None:
        """Make room for the regrown blocks of `events` (at most one per layer) and start them with
        m = v = 0 and a fresh local step; returns their int32 rows, or None without events."""
        if not events:
            return None
        rows = self.make_room(events)
        self.exp_avg.index_fill_(0, rows, 0.0)
        self.exp_avg_sq.index_fill_(0, rows, 0.0)
        fresh = rows.int()
        self.restart_clock(fresh, step)
        return fresh

    def bytes_by_role(self) -> dict[str, int]:
        return {"sparse/grad": nbytes(self.grad), "sparse/exp_avg": nbytes(self.exp_avg),
                "sparse/exp_avg_sq": nbytes(self.exp_avg_sq)}

    def state_dict(self) -> dict:
        return {"exp_avg": self.exp_avg.clone(), "exp_avg_sq": self.exp_avg_sq.clone()}

    def matches(self, state: dict) -> bool:
        return state["exp_avg"].shape == self.exp_avg.shape

    def load_state_dict(self, state: dict) -> None:
        self.exp_avg.copy_(state["exp_avg"])
        self.exp_avg_sq.copy_(state["exp_avg_sq"])

    # ------------------------------------------------------------------- what each layout defines
    @abstractmethod
    def n_rows(self, layer: SparseLayer) -> int:
        """Rows of state one layer needs."""

    @abstractmethod
    def gather(self, i: int, grad: torch.Tensor, fresh: bool) -> None:
        """Layer i's dense gradient (its weight's shape) into grad[rows(i)]: copied if fresh, else added."""

    @abstractmethod
    def descend(self, first: int, last: int, update: torch.Tensor, lr: float) -> None:
        """theta -= lr * update for layers first..last-1; `update` holds the rows span(first, last)."""

    @abstractmethod
    def weights(self, first: int, last: int) -> torch.Tensor:
        """The weights of layers first..last-1 in row order (for decoupled weight decay)."""

    @abstractmethod
    def begin_step(self, step: int, warming: bool) -> None:
        """Called once per optimizer step, after the moments' update and before coefficients()."""

    @abstractmethod
    def coefficients(self, sl: slice):
        """(1 - b1^t, 1 - b2^t, warm-up factor or None) for the rows sl: floats or [n, 1] tensors."""

    @abstractmethod
    def make_room(self, events: list[RegrowEvent]) -> torch.Tensor:
        """Follow the layers' topology changes; returns the int64 rows of the regrown blocks (event order)."""

    @abstractmethod
    def restart_clock(self, rows: torch.Tensor, step: int) -> None:
        """Give the regrown rows a local step that starts now."""
