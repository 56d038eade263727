"""SMETAdam: Adam with compact (or dense-masked) state for the sparse layers, SMET's regrowth handling
and density-aware learning rates. Its option tables are in smet_lab.optim.options."""

from smet_lab.optim.smet_adam import SMETAdam

__all__ = ["SMETAdam"]
