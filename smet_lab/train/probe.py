"""The stability probes around a topology update (checkpointed with the run): the probe-batch loss
window, how far regrown and surviving weights move in it, and the regrown weights' first Adam steps.
All measured from outside the optimizer: a probe reads weights and the optimizer's public state."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch

from smet_lab.metrics import REGROWN_UPDATE_SHARE_PREFIX
from smet_lab.sparse.ids import isin_sorted


@dataclass
class ProbeWindow:
    """The loss on one fixed held-out batch just before a topology update (`before`), then after each
    of the next `remaining` steps; the probe jump (highest value minus `before`) is known when the
    window closes. A new update opens a new window."""

    update_step: Optional[int] = None
    before: Optional[float] = None
    max: float = -math.inf
    remaining: int = 0

    @property
    def is_open(self) -> bool:
        return self.remaining > 0

    def open(self, step: int, before: float, length: int) -> None:
        self.update_step, self.before, self.max, self.remaining = step, before, -math.inf, length

    def observe(self, value: float) -> Optional[float]:
        """Record one probe loss of the open window; returns the jump when this closes it."""
        self.max = max(self.max, value)
        self.remaining -= 1
        return self.max - self.before if self.remaining == 0 else None

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> "ProbeWindow":
        return cls(**{**state, "max": -math.inf if state.get("max") is None else state["max"]})


SAMPLE = 1024  # blocks per layer and kind: plenty for an RMS, cheap to gather at every step of a window


def _spread(ids: torch.Tensor, k: int = SAMPLE) -> torch.Tensor:
    """At most k of the ascending `ids`, evenly spaced (deterministic, no random draw)."""
    if ids.numel() <= k:
        return ids
    return ids[torch.linspace(0, ids.numel() - 1, k, device=ids.device).round().long()]


@dataclass
class UpdateRMS:
    """How far weights move after a topology update: the RMS of |delta theta| / lr over the steps of the
    probe window, for the regrown entries and for the entries that survived the update (a sample of up
    to SAMPLE blocks of each kind per changed layer; lr: the sparse layers' rate at each step). Their
    ratio is the cold-start signature, independent of the loss.

    Per-layer attribution of the update's disturbance: each layer's share of the regrown entries'
    squared update norm over the window, sum (delta theta / lr)^2, estimated from its sample (scaled by
    regrown / sampled blocks) and normalised over the changed layers (`REGROWN_UPDATE_SHARE_PREFIX` + layer name)."""

    # [layer index, kind, block ids, last values, sum of (delta / lr)^2 so far, blocks of that kind]
    samples: list = dataclasses.field(default_factory=list)
    sums: dict = dataclasses.field(default_factory=lambda: {"regrown": 0.0, "surviving": 0.0})
    counts: dict = dataclasses.field(default_factory=lambda: {"regrown": 0, "surviving": 0})

    @classmethod
    def start(cls, topology, events) -> "UpdateRMS":
        out = cls()
        for e in events:
            layer = topology.layers[e.layer]
            new = e.new_blocks.to(torch.long).sort().values
            active = layer.block_ids().long()
            surviving = active[~isin_sorted(active, new.to(active.device))]
            for kind, ids in (("regrown", new), ("surviving", surviving)):
                sample = _spread(ids)
                out.samples.append([e.layer, kind, sample, layer.gather(ids=sample.to(layer.param.device)), 0.0,
                                    ids.numel()])
        return out

    def observe(self, topology, lr: float) -> None:
        """After one optimizer step at learning rate `lr`: add each sampled entry's (delta / lr)^2."""
        for sample in self.samples:
            index, kind, ids, last = sample[:4]
            now = topology.layers[index].gather(ids=ids.to(last.device))
            squares = float((now - last).double().div_(lr).square().sum())
            self.sums[kind] += squares
            self.counts[kind] += now.numel()
            sample[3] = now
            sample[4] += squares

    def layer_shares(self, topology) -> dict:
        """{REGROWN_UPDATE_SHARE_PREFIX + layer name: share} of the regrown entries' squared update norm (sums to 1)."""
        est = {topology.layers[i].name: total * n / ids.numel()
               for i, kind, ids, _, total, n in self.samples if kind == "regrown" and ids.numel()}
        norm = sum(est.values())
        return {REGROWN_UPDATE_SHARE_PREFIX + name: value / norm for name, value in est.items()} if norm > 0 else {}

    def result(self, topology) -> dict:
        return {**{f"stability/update_rms_{kind}": math.sqrt(self.sums[kind] / self.counts[kind])
                   for kind in self.sums if self.counts[kind]}, **self.layer_shares(topology)}

    def state_dict(self) -> dict:
        return {"samples": [[i, k, ids.cpu(), last.cpu(), *rest] for i, k, ids, last, *rest in self.samples],
                "sums": dict(self.sums), "counts": dict(self.counts)}

    @classmethod
    def from_state(cls, state: dict | None, device) -> Optional["UpdateRMS"]:
        if state is None:
            return None
        # A checkpoint from before the per-layer shares has 4-element samples: no sums, counts = sampled.
        return cls([[i, k, ids.to(device), last.to(device), *(rest or [0.0, ids.numel()])]
                    for i, k, ids, last, *rest in state["samples"]],
                   dict(state["sums"]), dict(state["counts"]))


# stability/adam_outlier_frac_regrown: share of the regrown entries' first OUTLIER_STEPS updates whose
# preconditioned step |m_hat| / (sqrt(v_hat) + eps) exceeds OUTLIER_RATIO (a steady gradient gives 1).
OUTLIER_STEPS, OUTLIER_RATIO = 5, 3.0


@dataclass
class RegrownSteps:
    """The first steps of the entries regrown at one topology update: `stability/regrow_update_ratio`,
    their mean |delta theta| / lr over the first step (lr: the sparse layers' rate), and
    `stability/adam_outlier_frac_regrown` over the first OUTLIER_STEPS steps (smet_lab.metrics)."""

    update_step: int
    rows: torch.Tensor  # the regrown entries' rows in the optimizer's sparse state
    blocks: list  # [layer index, regrown block ids, their weights at the update]; [] once the first step is seen
    steps_left: int = OUTLIER_STEPS
    over: int = 0
    seen: int = 0

    @classmethod
    def start(cls, step: int, topology, events, rows: torch.Tensor) -> "RegrownSteps":
        blocks = []
        for e in events:
            layer = topology.layers[e.layer]
            ids = e.new_blocks.to(layer.param.device)
            blocks.append([e.layer, ids, layer.gather(ids=ids)])
        return cls(step, rows, blocks)

    def observe(self, topology, optimizer, lr: float) -> dict:
        """After one optimizer step at learning rate `lr`: the metrics that became known (maybe none)."""
        out = {}
        if self.blocks:
            moved = sum(float((topology.layers[i].gather(ids=ids) - before).double().abs().sum())
                        for i, ids, before in self.blocks)
            if lr > 0:
                out["stability/regrow_update_ratio"] = moved / lr / sum(b.numel() for *_, b in self.blocks)
            self.blocks = []
        step = optimizer.preconditioned(self.rows)
        self.over += int((step > OUTLIER_RATIO).sum())
        self.seen += step.numel()
        self.steps_left -= 1
        if self.steps_left == 0:
            out["stability/adam_outlier_frac_regrown"] = self.over / max(1, self.seen)
        return out

    @property
    def done(self) -> bool:
        return self.steps_left == 0

    def state_dict(self) -> dict:
        return {"update_step": self.update_step, "rows": self.rows.cpu(),
                "blocks": [[i, ids.cpu(), before.cpu()] for i, ids, before in self.blocks],
                "steps_left": self.steps_left, "over": self.over, "seen": self.seen}

    @classmethod
    def from_state(cls, state: dict | None, device) -> Optional["RegrownSteps"]:
        if state is None:
            return None
        blocks = [[i, ids.to(device), before.to(device)] for i, ids, before in state["blocks"]]
        return cls(**{**state, "rows": state["rows"].to(device), "blocks": blocks})
