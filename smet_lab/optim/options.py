"""The optimizer's option tables and their validation (re-exported by smet_lab.optim.smet_adam)."""

from __future__ import annotations

import math

from smet_lab.config import ConfigError
from smet_lab.optim.compact import CompactState
from smet_lab.optim.fused import KERNELS
from smet_lab.optim.masked import AGE_MAX, MaskedState

# Density-aware LR rules: scale(d, power). A new rule = one entry here.
LR_SCALING = {
    "none": lambda d, p: 1.0,
    "inverse": lambda d, p: 1.0 / d,
    "inverse_sqrt": lambda d, p: d ** -0.5,
    "power": lambda d, p: d ** -p,
}
WARMUP_KINDS = ("linear_lr", "moment_damping", "released")
# optim.state: the class that keeps the sparse layers' gradients and moments.
STATE_LAYOUTS = {"compact": CompactState, "dense_masked": MaskedState}


def validate_optimizer(lr, betas, eps, weight_decay, warmup_steps, warmup_kind, lr_scaling,
                       lr_scaling_power, lr_scaling_scope, state, kernel="auto") -> None:
    def number(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if not number(lr) or lr <= 0:
        raise ConfigError("optim.lr", lr, "a positive number")
    if len(betas) != 2 or not all(number(b) and 0.0 <= b < 1.0 for b in betas):
        raise ConfigError("optim.betas", list(betas), "two numbers in [0, 1)")
    if not number(eps) or eps <= 0:
        raise ConfigError("optim.eps", eps, "a positive number")
    if not number(weight_decay) or weight_decay < 0:
        raise ConfigError("optim.weight_decay", weight_decay, "a non-negative number")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or not 0 <= warmup_steps < AGE_MAX:
        raise ConfigError("optim.regrow.warmup_steps", warmup_steps, f"an integer in [0, {AGE_MAX})")
    if warmup_kind not in WARMUP_KINDS:
        raise ConfigError("optim.regrow.warmup_kind", warmup_kind, "one of " + ", ".join(WARMUP_KINDS))
    if lr_scaling not in LR_SCALING:
        raise ConfigError("optim.lr_scaling.rule", lr_scaling, "one of " + ", ".join(LR_SCALING))
    if not number(lr_scaling_power) or lr_scaling_power < 0:
        raise ConfigError("optim.lr_scaling.power", lr_scaling_power, "a non-negative number")
    if lr_scaling_scope not in ("sparse", "all"):
        raise ConfigError("optim.lr_scaling.scope", lr_scaling_scope, "one of sparse, all")
    if state not in STATE_LAYOUTS:
        raise ConfigError("optim.state", state, "one of " + ", ".join(STATE_LAYOUTS))
    if kernel not in KERNELS:
        raise ConfigError("optim.kernel", kernel, "one of " + ", ".join(KERNELS))
    if kernel == "compiled" and state != "compact":
        raise ConfigError("optim.kernel", kernel, "needs optim.state=compact (the fused step is the compact layout's)")


def optimizer_kwargs(cfg) -> dict:
    """SMETAdam's keyword arguments from an `optim` config section (smet_lab.config.OptimConfig): the one
    place that maps config keys to optimizer arguments."""
    regrow, scaling = cfg.regrow, cfg.lr_scaling
    return dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                reset_step=regrow.reset_step, warmup_steps=regrow.warmup_steps, warmup_kind=regrow.warmup_kind,
                lr_scaling=scaling.rule, lr_scaling_power=scaling.power, lr_scaling_scope=scaling.scope,
                state=cfg.state, kernel=cfg.kernel)


def validate_optim_config(cfg) -> None:
    """validate_optimizer over an `optim` config section, without building anything."""
    kwargs = optimizer_kwargs(cfg)
    kwargs.pop("reset_step")  # a bool: nothing to check
    validate_optimizer(**kwargs)
