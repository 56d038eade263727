"""Training loop, checkpoints, stability probes and memory accounting (no Ray, MLflow or Hydra)."""

from smet_lab.train.trainer import Run, RunResult, lr_factor, train, validate_run

__all__ = ["Run", "RunResult", "lr_factor", "train", "validate_run"]
