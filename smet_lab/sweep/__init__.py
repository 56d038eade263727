"""Ray Tune sweeps over the core trainer (the only package that imports Ray, lazily)."""

from smet_lab.sweep.grid import SweepConfig, Trial, expand, trial_configs


def run_sweep(cfg, output_dir, compose_for_method=None):
    from smet_lab.sweep.runner import run_sweep as _run

    return _run(cfg, output_dir, compose_for_method)


__all__ = ["SweepConfig", "Trial", "expand", "run_sweep", "trial_configs"]
