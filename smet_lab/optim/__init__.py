"""Optimizers: SMETAdam (compact or dense-masked state) and the method presets built on it."""

from smet_lab.methods import METHODS, apply_method  # re-exported: presets live outside optim (no torch)
from smet_lab.optim.smet_adam import LR_SCALING, SMETAdam

__all__ = ["LR_SCALING", "METHODS", "SMETAdam", "apply_method"]
