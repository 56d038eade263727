"""Prune-rate schedules as data: a name maps to a multiplier of the base prune rate over training
progress p in [0, 1]. A new schedule = one function + one entry in SCHEDULES."""

from __future__ import annotations

import math

# Floor as in the released SMET code: cosine/linear go from zeta to zeta * 0.025 (0.2 -> 0.005).
MIN_RATIO = 0.025


def cosine(p: float) -> float:
    return MIN_RATIO + (1 - MIN_RATIO) * 0.5 * (1 + math.cos(math.pi * p))


def constant(p: float) -> float:
    return 1.0


def linear(p: float) -> float:
    return 1.0 - (1 - MIN_RATIO) * p


def wsd(p: float) -> float:
    """Warmup-stable-decay: constant for 90% of training, then linear to 10%."""
    return 1.0 if p <= 0.9 else 1.0 - 0.9 * (p - 0.9) / 0.1


SCHEDULES = {"cosine": cosine, "constant": constant, "linear": linear, "wsd": wsd}


def prune_rate_at(schedule: str, base_rate: float, step: int, total_steps: int) -> float:
    progress = min(1.0, max(0.0, step / max(1, total_steps)))
    return base_rate * SCHEDULES[schedule](progress)
