"""Method presets: each names the optimizer/sparsity keys it sets (docs/design.md section 3).
Torch-free, so the command line and sweep planning can read them without importing torch.

This is the one source: the Hydra `method` options are built from it (smet_lab/schema.py), and
`smet_lab.extend.register_method` adds to it.
"""

from __future__ import annotations

import copy

from smet_lab.config import ConfigError, RunConfig

# dotted key -> value, applied on top of the user's config.
METHODS: dict[str, dict] = {
    # Plain Adam on the dense model.
    "dense": {"sparsity.density": 1.0, "sparsity.update_every": 0, "optim.regrow.reset_step": False,
              "optim.regrow.warmup_steps": 0, "optim.lr_scaling.rule": "none"},
    # A fixed random sparse topology, never updated; plain Adam on the active weights.
    "static": {"sparsity.update_every": 0, "optim.regrow.reset_step": False,
               "optim.regrow.warmup_steps": 0, "optim.lr_scaling.rule": "none"},
    # DST with regrown moments zeroed but the shared global step: the unstabilised baseline.
    "naive_dst": {"optim.regrow.reset_step": False, "optim.regrow.warmup_steps": 0,
                  "optim.lr_scaling.rule": "none"},
    # SMET: local step reset + warm-up + density-aware LR.
    "smet": {"optim.regrow.reset_step": True, "optim.regrow.warmup_steps": 100,
             "optim.lr_scaling.rule": "inverse"},
    "smet_no_warmup": {"optim.regrow.reset_step": True, "optim.regrow.warmup_steps": 0,
                       "optim.lr_scaling.rule": "inverse"},
    "smet_no_reset": {"optim.regrow.reset_step": False, "optim.regrow.warmup_steps": 100,
                      "optim.lr_scaling.rule": "inverse"},
    "smet_no_scaling": {"optim.regrow.reset_step": True, "optim.regrow.warmup_steps": 100,
                        "optim.lr_scaling.rule": "none"},
}


def apply_method(cfg: RunConfig, name: str | None = None) -> RunConfig:
    """A copy of `cfg` with method `name` (default cfg.method) applied."""
    name = cfg.method if name is None else name
    if name not in METHODS:
        raise ConfigError("method", name, "one of " + ", ".join(METHODS))
    out = copy.deepcopy(cfg)
    out.method = name
    for dotted, value in METHODS[name].items():
        *path, leaf = dotted.split(".")
        node = out
        for part in path:
            node = getattr(node, part)
        setattr(node, leaf, value)
    return out
