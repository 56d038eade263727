"""The stability probe around a topology update, as a small state machine (checkpointed with the run)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional


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
