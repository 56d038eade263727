"""Structured-config schema for Hydra: the core's dataclasses plus tracking, Ray and sweep keys.

Registered in Hydra's ConfigStore as `smet_lab_schema` (first entry of conf/config.yaml's defaults),
so every composed config is type-checked and closed: an unknown key or a wrong type fails at compose
time, before any work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional

from smet_lab.config import ConfigError, RunConfig
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
    autoscaling: bool = False  # a cluster that adds nodes on demand: trials wait for them (no fit check)


def local_cpus(ray, cores: int | None = None) -> int:
    """The CPUs a local Ray gets: ray.num_cpus, or when 0 every core (`cores`, else this machine's)."""
    return ray.num_cpus or cores or os.cpu_count() or 1


def check_ray(ray, cores: int | None = None) -> None:
    """ConfigError for Ray settings a sweep cannot start with, before Ray starts (`cores`: as in local_cpus)."""
    def integer(key: str, least: int, allowed: str) -> int:
        value = getattr(ray, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"ray.{key}", value, allowed)
        return value

    integer("num_cpus", 0, "a non-negative integer (CPUs of a local Ray; 0 = every core)")
    integer("max_concurrent", 0, "a non-negative integer (trials at once; 0 = as many as the resources allow)")
    cpus = integer("cpus_per_trial", 1, "a positive integer (CPUs reserved for each trial, or each of its processes)")
    workers = integer("workers_per_trial", 1, "a positive integer (processes per trial; 1 = the trial's own process)")
    if ray.gpus_per_trial < 0:
        raise ConfigError("ray.gpus_per_trial", ray.gpus_per_trial, "a non-negative number (GPUs per trial process)")
    cores = local_cpus(ray, cores)
    if ray.address == "local" and cpus > cores:  # no trial could ever be placed: the sweep would wait forever
        raise ConfigError("ray.cpus_per_trial", cpus, f"at most {cores}, the CPUs Ray has here (ray.num_cpus)")
    if ray.address == "local" and workers * cpus > cores:
        raise ConfigError("ray.workers_per_trial", workers, f"at most {cores // cpus}: {workers} processes x "
                          f"ray.cpus_per_trial={cpus} CPUs do not fit in the {cores} CPUs Ray has here "
                          "(ray.num_cpus; lower ray.cpus_per_trial)")


def check_cluster_fits(ray, nodes: list[dict]) -> None:
    """ConfigError when the cluster's nodes (ray.nodes(): "Alive", "Resources") cannot hold one trial: a
    process's CPUs and GPUs on one node, ray.workers_per_trial such processes in all. Tune would wait for
    them without a word; an autoscaling cluster, which may add nodes, is not asked this."""
    have = [(n["Resources"].get("CPU", 0), n["Resources"].get("GPU", 0)) for n in nodes if n.get("Alive")]
    cpus, gpus, workers = ray.cpus_per_trial, ray.gpus_per_trial, ray.workers_per_trial
    fits = [min(c // cpus, g // gpus if gpus else workers) for c, g in have]
    if sum(fits) >= workers:
        return
    largest = max(have, default=(0, 0))
    short = "gpus_per_trial" if gpus and not any(g >= gpus for _, g in have) else (
        "cpus_per_trial" if not any(fits) else "workers_per_trial")
    need = f"{cpus} CPU{'s' * (cpus != 1)} and {gpus:g} GPU{'s' * (gpus != 1)}"
    held = f"{int(sum(fits))} of them" if any(fits) else "none"
    raise ConfigError(f"ray.{short}", getattr(ray, short),
                      f"what the cluster at {ray.address} can hold: a trial's {workers} process(es) need {need} each, "
                      f"on one node, and its {len(have)} node(s) hold {held} (the largest: {largest[0]:g} CPUs, "
                      f"{largest[1]:g} GPUs), so the sweep would wait forever; lower ray.cpus_per_trial or "
                      "ray.gpus_per_trial (0 trains on CPU), add nodes, or on a cluster that adds them on demand "
                      "give ray.autoscaling=true")


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
