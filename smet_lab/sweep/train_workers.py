"""ray.workers_per_trial > 1: a Tune trial trains its run with several processes through Ray Train.

The Tune trial is only a driver: it starts a `TorchTrainer` whose N workers (each with
ray.cpus_per_trial CPUs and ray.gpus_per_trial GPUs) join one torch.distributed process group and
run the trial body of smet_lab.sweep.trainable, data parallel (smet_lab.train.distributed). Every
worker reports the same metrics at the same points (a Ray Train report is a barrier); Ray Train
forwards the first worker's to Tune, and the first worker alone writes checkpoints and artifacts.

The Train run is named after the trial and stored beside Tune's state (`<sweep>/train/`), so a
resumed sweep restarts an unfinished trial's Train run from its latest checkpoint. The driver needs no
CPU (the workers need all of them): it asks for a little memory instead, because Tune refuses an
empty request and a fractional CPU deadlocks the workers' start when they need every core.
"""

from __future__ import annotations

import shutil

DRIVER_MEMORY = 64 * 2**20  # bytes of Ray's `memory` resource a trial driver reserves


def run_trial_workers(config: dict, configs: dict, cpus: int, workers: int, gpus: float, storage: str) -> None:
    import ray.train
    from ray import tune
    from ray.train.torch import TorchConfig, TorchTrainer

    from smet_lab.train.distributed import COLLECTIVE_TIMEOUT

    key = config["key"]
    backend = configs[key]["train"]["dist_backend"]
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"key": key, "cfg": configs[key], "cpus": cpus},
        torch_config=TorchConfig(backend=None if backend == "auto" else backend,
                                 timeout_s=int(COLLECTIVE_TIMEOUT.total_seconds())),
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=gpus > 0,
            resources_per_worker={"CPU": cpus, **({"GPU": gpus} if gpus else {})}),
        run_config=ray.train.RunConfig(
            name=f"train-{tune.get_context().get_trial_id()}", storage_path=storage,
            callbacks=[forward_to_tune()], failure_config=ray.train.FailureConfig(max_failures=0),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)))
    result = trainer.fit()  # a failed worker raises here: the trial fails, the sweep goes on
    metrics = {k: v for k, v in result.metrics.items() if k != "checkpoint_path"}
    tune.report(metrics, checkpoint=result.checkpoint)  # the final summary, with the artifacts


def worker_loop(config: dict) -> None:
    """One Ray Train worker: the trial body, reporting through ray.train."""
    import ray.train

    from smet_lab.sweep.trainable import train_and_report

    def report(metrics: dict, checkpoint_dir=None, step: int | None = None) -> None:
        checkpoint = None
        if checkpoint_dir is not None:  # the first worker's; the others report metrics alone
            checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir))
            if step is not None:
                checkpoint.set_metadata({"step": step})
        ray.train.report(metrics, checkpoint=checkpoint)

    final = train_and_report(config["cfg"], config["key"], config["cpus"], report, ray.train.get_checkpoint())
    try:
        report(final["metrics"], final["artifacts"])
    finally:
        if final["artifacts"] is not None:
            shutil.rmtree(final["artifacts"], ignore_errors=True)


def forward_to_tune():
    """A Ray Train callback (built here: the class derives from one of Ray's)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ForwardToTune(TuneReportCallback):
        """Ray Train's reports become Tune results as they come, except the final one: the driver
        reports that itself, with the artifacts as a Tune checkpoint (forwarded, it would be logged twice)."""

        def after_report(self, run_context, metrics, checkpoint):
            if not metrics[0].get("final"):
                super().after_report(run_context, metrics, checkpoint)

    return ForwardToTune()
