"""Ray Tune sweeps over the core trainer (the only package that imports Ray, lazily). The grid itself
(SweepConfig, expand, trial_configs) is smet_lab.grid: the report reads it too."""


def run_sweep(cfg, compose_for):
    from smet_lab.sweep.runner import run_sweep as _run

    return _run(cfg, compose_for)


__all__ = ["run_sweep"]
