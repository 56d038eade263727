"""Sweep grids: from a `sweep` config to the explicit, ordered list of trials. Shared by the sweep
runner and the report (which names the trials a sweep has not run yet), so it needs no Ray, torch or pandas.

`sweep.params` is a nested mapping whose leaves are lists (the grid axes, e.g.
`{sparsity: {density: [0.1, 0.25]}, method: [naive_dst, smet]}`), `sweep.extra_trials` adds single
trials (e.g. the dense reference), and `sweep.seeds` is always an explicit axis, so every table
cell is well defined. A trial's config = the base config, then its method preset, then its other
values (so a sweep can vary W on top of `method=smet`).
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from smet_lab.config import ConfigError, did_you_mean
from smet_lab.methods import METHODS
from smet_lab.metrics import FINAL_VAL_LOSS, METRICS, table_metrics


@dataclass
class SweepConfig:
    name: str = "sweep"
    params: Dict[str, Any] = field(default_factory=dict)
    extra_trials: List[Any] = field(default_factory=list)
    seeds: List[int] = field(default_factory=lambda: [0])
    metric: str = FINAL_VAL_LOSS
    mode: str = "min"
    resume: bool = True
    retry_failed: bool = False  # on resume, run FAILED trials again (from their last checkpoint)
    scheduler: str = "fifo"  # fifo | asha (asha stops spiking-but-recovering trials: biased for stability studies)
    asha_grace_steps: int = 500
    storage: Optional[str] = None  # default: <cwd>/sweeps


@dataclass
class Trial:
    key: str  # stable identity: "method=smet,sparsity.density=0.25,seed=0"
    values: Dict[str, Any]  # dotted key -> value (method and train.seed included)


def leaves(node: Any, prefix: str = "") -> Dict[str, Any]:
    """Nested mapping -> {dotted key: leaf}."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(leaves(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def expand(sweep: SweepConfig) -> List[Trial]:
    axes = leaves(sweep.params)
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep.params.{key}", values, "a non-empty list of values (a grid axis)")
        if len({repr(v) for v in values}) < len(values):
            raise ConfigError(f"sweep.params.{key}", values, "distinct values (a repeated value repeats no trial)")
    if not sweep.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in sweep.seeds):
        raise ConfigError("sweep.seeds", sweep.seeds, "a non-empty list of integer seeds, e.g. [0,1,2]")
    if len(set(sweep.seeds)) < len(sweep.seeds):
        raise ConfigError("sweep.seeds", sweep.seeds, "distinct seeds (a repeated seed repeats no trial)")
    if not sweep.name or sweep.name in (".", "..") or "/" in sweep.name or "\\" in sweep.name:
        raise ConfigError("sweep.name", sweep.name, "a folder name (the sweep's folder in the storage and its "
                          "MLflow tag): not empty, no / or \\")
    if sweep.metric not in METRICS:
        raise ConfigError("sweep.metric", sweep.metric, "a registered run-level metric (smet_lab.metrics), such as "
                          f"{', '.join(table_metrics())}{did_you_mean(sweep.metric, METRICS)}")
    if sweep.mode not in ("min", "max"):
        raise ConfigError("sweep.mode", sweep.mode, "one of min, max")
    if sweep.scheduler not in ("fifo", "asha"):
        raise ConfigError("sweep.scheduler", sweep.scheduler, "one of fifo, asha")
    if sweep.scheduler == "asha" and sweep.asha_grace_steps < 1:
        raise ConfigError("sweep.asha_grace_steps", sweep.asha_grace_steps, "a positive number of steps (ASHA stops "
                          "no trial before it)")
    combos = [dict(zip(axes, values)) for values in itertools.product(*axes.values())] if axes else [{}]
    for extra in sweep.extra_trials:
        if not isinstance(extra, dict):
            raise ConfigError("sweep.extra_trials", extra, "a list of mappings (dotted key -> value)")
        combos.append(leaves(extra))
    trials, seen = [], set()
    for combo in combos:
        for seed in sweep.seeds:
            values = {**combo, "train.seed": seed}
            method = values.get("method")
            if method is not None and method not in METHODS:
                raise ConfigError("sweep.params.method", method, "one of " + ", ".join(METHODS)
                                  + did_you_mean(method, METHODS))
            key = trial_key(values)
            if key not in seen:  # an extra trial may repeat a grid point
                seen.add(key)
                trials.append(Trial(key, values))
    return trials


def trial_key(values: Dict[str, Any]) -> str:
    ordered = sorted(values.items(), key=lambda kv: (kv[0] != "method", kv[0] == "train.seed", kv[0]))
    return ",".join(f"{'seed' if k == 'train.seed' else k}={v}" for k, v in ordered)


def trial_configs(trials: List[Trial], compose_for: Callable[[Dict[str, str]], Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Each trial's full config dict. `compose_for(choices)` is the config composed as if the user had
    typed the trial's config-group choices (its keys without a dot: `method=m`, `model=small`) with their
    other overrides (so the precedence is: group option and method preset < sweep file < command line),
    then the trial's other grid values are set on top."""
    bases: Dict[tuple, Dict[str, Any]] = {}
    out = {}
    for trial in trials:
        choices = {k: v for k, v in trial.values.items() if "." not in k}
        marker = tuple(sorted(choices.items(), key=str))
        if marker not in bases:
            bases[marker] = compose_for(choices)
        cfg = copy.deepcopy(bases[marker])
        cfg.pop("sweep", None)
        for dotted, value in trial.values.items():
            if dotted not in choices:
                set_dotted(cfg, dotted, value)
        if cfg["method"] == "dense":
            cfg["sparsity"]["density"] = 1.0  # the dense reference of a sweep trains every weight
        out[trial.key] = cfg
    return out


def set_dotted(cfg: Dict[str, Any], dotted: str, value: Any) -> None:
    *path, leaf = dotted.split(".")
    node = cfg
    for part in path:
        if not isinstance(node.get(part), dict):
            raise ConfigError(f"sweep.params.{dotted}", value, f"unknown key '{dotted}'")
        node = node[part]
    if leaf not in node:
        raise ConfigError(f"sweep.params.{dotted}", value, f"unknown key '{dotted}'")
    node[leaf] = value
