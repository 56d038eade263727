"""Sparse topology: layer selection, initial distributions, prune/grow rules, schedules, updates."""

from smet_lab.sparse.criteria import GROWTH, PRUNE
from smet_lab.sparse.schedules import SCHEDULES, prune_rate_at
from smet_lab.sparse.layer import SparseLayer
from smet_lab.sparse.topology import DISTRIBUTIONS, SparseTopology, erk_densities
from smet_lab.sparse.updater import DynamicSparsity, RegrowEvent

__all__ = ["DISTRIBUTIONS", "GROWTH", "PRUNE", "SCHEDULES", "DynamicSparsity", "RegrowEvent",
           "SparseLayer", "SparseTopology", "erk_densities", "prune_rate_at"]
