"""Structured-config schema for Hydra: the core's dataclasses plus tracking, Ray and sweep keys.

Registered in Hydra's ConfigStore as `smet_lab_schema` (first entry of conf/config.yaml's defaults),
so every composed config is type-checked and closed: an unknown key or a wrong type fails at compose
time, before any work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from smet_lab.config import RunConfig
from smet_lab.sweep.grid import SweepConfig
from smet_lab.tracking import TrackingConfig


@dataclass
class RayConfig:
    address: str = "local"  # local | auto | ray://host:port
    num_cpus: int = 0  # local only; 0 = all cores
    cpus_per_trial: int = 2
    gpus_per_trial: float = 0.0
    max_concurrent: int = 0  # 0 = as many as the resources allow
    storage: Optional[str] = None  # sweep storage root (shared path or URI on a cluster)


@dataclass
class AppConfig(RunConfig):
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    sweep: Optional[SweepConfig] = None  # set only by `+sweep=NAME`


def register() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="smet_lab_schema", node=AppConfig)
