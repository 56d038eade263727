"""Structured-config schema for Hydra: the core's dataclasses plus tracking, Ray and sweep keys.

Registered in Hydra's ConfigStore as `smet_lab_schema` (first entry of conf/config.yaml's defaults),
so every composed config is type-checked and closed: an unknown key or a wrong type fails at compose
time, before any work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from smet_lab.config import RunConfig
from smet_lab.grid import SweepConfig
from smet_lab.tracking import TrackingConfig


@dataclass
class RayConfig:
    address: str = "local"  # local | auto | ray://host:port
    num_cpus: int = 0  # local only; 0 = all cores
    cpus_per_trial: int = 2
    gpus_per_trial: float = 0.0
    workers_per_trial: int = 1  # > 1: each trial is a Ray Train TorchTrainer with this many processes
    max_concurrent: int = 0  # 0 = as many as the resources allow
    storage: Optional[str] = None  # sweep storage root (shared path or URI on a cluster)


@dataclass
class AppConfig(RunConfig):
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    sweep: Optional[SweepConfig] = None  # set only by `+sweep=NAME`
    # Modules or .py files registering rules through smet_lab.extend, imported before validation.
    extensions: List[str] = field(default_factory=list)


def register() -> None:
    """The schema, and the `method` group's options built from the presets in smet_lab/methods.py
    (the one source: there are no conf/method/*.yaml files). Called again after extensions load, for
    the presets they register."""
    from hydra.core.config_store import ConfigStore

    from smet_lab.methods import METHODS

    store = ConfigStore.instance()
    store.store(name="smet_lab_schema", node=AppConfig)
    for name, preset in METHODS.items():
        node: dict = {"method": name}
        for dotted, value in preset.items():
            *path, leaf = dotted.split(".")
            target = node
            for part in path:
                target = target.setdefault(part, {})
            target[leaf] = value
        store.store(group="method", name=name, node=node, package="_global_")
