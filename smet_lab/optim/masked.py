"""optim.state="dense_masked": the compact layout's math on dense-size buffers, what mask-based DST
libraries keep, so that memory can be compared like for like.

    grad, exp_avg, exp_avg_sq : float32 [n_blocks, B] per layer, inactive rows zero
    active                    : bool    [n_blocks, 1] the mask
    age                       : int16   [n_blocks, 1] the local step (only when reset_step or a warm-up
                                needs it); saturates at AGE_MAX
"""

from __future__ import annotations

import torch

from smet_lab.optim.sparse_state import SparseState, nbytes
from smet_lab.sparse.layer import SparseLayer
from smet_lab.sparse.updater import RegrowEvent

AGE_MAX = 32767  # int16 saturates; exact as long as b2**AGE_MAX underflows float32


class MaskedState(SparseState):
    def __init__(self, *args):
        super().__init__(*args)
        n = self.offsets[-1]
        self.age = torch.zeros(n, 1, dtype=torch.int16, device=self.device) if self.needs_age else None
        self.active = torch.cat([layer.active_mask() for layer in self.layers]).unsqueeze(1) if self.layers \
            else torch.zeros(0, 1, dtype=torch.bool, device=self.device)

    def n_rows(self, layer: SparseLayer) -> int:
        return layer.n_blocks

    def gather(self, i: int, grad: torch.Tensor, fresh: bool) -> None:
        buf, mask = self.grad[self.rows(i)], self.active[self.rows(i)]
        grad = grad.view(buf.shape)
        buf.copy_(grad * mask) if fresh else buf.addcmul_(grad, mask)

    def descend(self, first: int, last: int, update: torch.Tensor, lr: float) -> None:
        start = self.offsets[first]
        for i in range(first, last):
            self.layers[i].blocks().add_(update[self.offsets[i] - start:self.offsets[i + 1] - start], alpha=-lr)

    def weights(self, first: int, last: int) -> torch.Tensor:
        return torch.cat([layer.blocks() for layer in self.layers[first:last]])

    # ------------------------------------------------------------------------- local step
    def begin_step(self, step: int, warming: bool) -> None:
        self.step, self.warming = step, warming
        if self.age is not None:
            self.age.clamp_(max=AGE_MAX - 1).add_(1)

    def coefficients(self, sl: slice):
        b1, b2 = self.betas
        if self.reset_step:  # the int16 age per block is the local step
            t = self.age[sl].float()
            bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
        else:  # the shared global step (naive DST)
            bc1, bc2 = self.global_bias_corrections()
        warm = None
        if self.warming:
            age = self.age[sl]
            warm = (age.float() / self.warmup_steps).clamp_(max=1.0)
            if self.warmup_kind != "released":  # released: every block, its age is its counter
                regrown = age.int() < min(self.step, AGE_MAX)  # initial blocks: as old as the run
                warm = torch.where(regrown, warm, 1.0)
        return bc1, bc2, warm

    # --------------------------------------------------------------------------- regrowth
    def make_room(self, events: list[RegrowEvent]) -> torch.Tensor:
        rows = []
        for e in events:
            old = e.old_blocks.to(self.device) + self.offsets[e.layer]
            new = e.new_blocks.to(self.device, torch.long) + self.offsets[e.layer]
            self.active[old] = False
            self.exp_avg[old] = 0.0
            self.exp_avg_sq[old] = 0.0
            self.active[new] = True
            rows.append(new)
        return torch.cat(rows)

    def restart_clock(self, rows: torch.Tensor, step: int) -> None:
        if self.age is not None:  # released: its counter restarts at 1 (then +1 before use)
            self.age[rows] = 1 if self.warmup_kind == "released" else 0

    # ------------------------------------------------------------------------- accounting
    def bytes_by_role(self) -> dict[str, int]:
        return {**super().bytes_by_role(), "sparse/age": nbytes(self.age), "sparse/mask": nbytes(self.active)}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "age": None if self.age is None else self.age.clone(),
                "active": self.active.clone()}

    def matches(self, state: dict) -> bool:
        return super().matches(state) and (state["age"] is None) == (self.age is None)

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.age is not None:
            self.age.copy_(state["age"])
        self.active.copy_(state["active"])
