"""The function Ray Tune runs for one trial (in a Ray worker process).

It reports metrics with `ray.tune.report` and checkpoints with `ray.tune.Checkpoint`; it never
writes to MLflow (SQLite takes one writer: the driver logs what trials report). Its last report
carries a checkpoint holding the run's artifacts (config.yaml, metrics.parquet, loss_curve.png).
With ray.workers_per_trial > 1 the same body runs in each Ray Train worker (smet_lab.sweep.train_workers).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

# Fault injection for tests and drills: trials whose key contains this string raise after the step
# given in SMET_LAB_INJECT_AT_STEP (default 5) of this attempt.
INJECT_ENV = "SMET_LAB_INJECT_FAILURE"
INJECT_STEP_ENV = "SMET_LAB_INJECT_AT_STEP"


class InjectedFailure(RuntimeError):
    pass


def run_trial(config: dict, configs: dict, cpus: int = 1) -> None:
    """One trial in this Ray Tune worker process (ray.workers_per_trial=1)."""
    from ray import tune

    def report(metrics: dict, checkpoint_dir: Path | None = None, step: int | None = None) -> None:
        checkpoint = None
        if checkpoint_dir is not None:
            checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir))
            if step is not None:
                checkpoint.set_metadata({"step": step})
        tune.report(metrics, checkpoint=checkpoint)

    final = train_and_report(configs[config["key"]], config["key"], cpus, report, tune.get_checkpoint())
    try:
        report(final["metrics"], final["artifacts"])
    finally:
        shutil.rmtree(final["artifacts"], ignore_errors=True)


def train_and_report(cfg_dict: dict, key: str, cpus: int, report, restored) -> dict:
    """Train the trial's run, sending every logged metric and checkpoint to `report(metrics,
    checkpoint_dir=None, step=None)`; resumes from `restored` (a Ray checkpoint) if given. Returns the
    final {"metrics", "artifacts"} (a new folder: config.yaml, metrics.parquet, loss_curve.png,
    summary.json, written by the first process only, None in the others) for the caller to report and
    then remove."""
    import torch

    from smet_lab.config import run_config_from
    from smet_lab.data import load_corpus
    from smet_lab.extend import load_extensions
    from smet_lab.sweep.folder import TRIAL_FILE
    from smet_lab.tracking import write_run_artifacts
    from smet_lab.tracking.artifacts import write_summary
    from smet_lab.train import Callbacks, train
    from smet_lab.train.distributed import World

    torch.set_num_threads(max(1, int(cpus)))  # a trial (or each of its processes) gets its CPUs' worth of threads
    load_extensions(cfg_dict.get("extensions") or [])  # the same rules as the driver, in this worker
    run_cfg = run_config_from(cfg_dict)
    corpus = load_corpus(run_cfg.data, progress=print)  # in the trial's log (Ray's output of this worker)
    # Strings ride along in every report: the driver tags the trial's MLflow run with them.
    ident = {"trial_key": key, "smet_data_sha256": corpus.sha256}
    work = Path(tempfile.mkdtemp(prefix="smet_trial_"))
    restored_step = 0
    if restored is not None:
        local = restored.to_directory(str(work / "restored"))
        restored_step = restored.get_metadata().get("step", 0)
        run_cfg.train.resume_from = local

    def log(metrics: dict, step: int) -> None:
        # Several log calls can concern one step; each becomes one report (a training iteration).
        report({**metrics, "step": step, **ident})

    def on_checkpoint(path: Path | None, step: int) -> None:
        if path is not None:
            (path / TRIAL_FILE).write_text(json.dumps({"trial": key, "step": step}))
        report({"step": step, **ident, "checkpoint_step": step}, path, step)

    inject = os.environ.get(INJECT_ENV)
    should_stop = None
    if inject and inject in key:
        polls, at = [0], int(os.environ.get(INJECT_STEP_ENV, "5"))

        def fail_mid_run():  # polled once per step: fail like a crashing trial would, mid-run
            polls[0] += 1
            if polls[0] >= at:
                raise InjectedFailure(f"injected failure ({INJECT_ENV}={inject})")
            return False
        should_stop = fail_mid_run
    try:
        result = train(run_cfg, output_dir=work / "run", corpus=corpus, callbacks=Callbacks(
            log=log, progress=None, on_checkpoint=on_checkpoint, should_stop=should_stop))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    artifacts = None
    if World.current().is_main:
        artifacts = Path(tempfile.mkdtemp(prefix="smet_artifacts_"))
        write_run_artifacts(result.history, cfg_dict, artifacts, title=key)
        (artifacts / TRIAL_FILE).write_text(json.dumps({"trial": key, "step": int(result.summary.get("summary/steps", 0))}))
        write_summary(artifacts, result.status, result.error, result.summary)
    metrics = {**result.summary, "step": int(result.summary.get("summary/steps", 0)), **ident,
               "smet_status": result.status, "smet_error": result.error or "", "final": 1,
               "smet_resumed_from_step": int(restored_step)}
    return {"metrics": metrics, "artifacts": artifacts}
