"""Training loop, checkpoints, stability probes and memory accounting (no Ray, MLflow or Hydra)."""

from smet_lab.train.trainer import QUIET, Callbacks, Run, RunResult, check_config, lr_factor, train, validate_run

__all__ = ["QUIET", "Callbacks", "Run", "RunResult", "check_config", "lr_factor", "train", "validate_run"]
