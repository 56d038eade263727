"""Training loop, checkpoints, stability probes and memory accounting (no Ray, MLflow or Hydra)."""

from smet_lab.train.checks import check_config, validate_run
from smet_lab.train.trainer import QUIET, Callbacks, Run, RunResult, lr_factor, train

__all__ = ["QUIET", "Callbacks", "Run", "RunResult", "check_config", "lr_factor", "train", "validate_run"]
