"""The function Ray Tune runs for one trial (in a Ray worker process).

It reports metrics with `ray.tune.report` and checkpoints with `ray.tune.Checkpoint`; it never
writes to MLflow (SQLite takes one writer: the driver logs what trials report). Its last report
carries a checkpoint holding the run's artifacts (config.yaml, metrics.parquet, loss_curve.png).
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
    import torch
    from ray import tune

    from smet_lab.config import run_config_from
    from smet_lab.data import load_corpus
    from smet_lab.extend import load_extensions
    from smet_lab.tracking import write_run_artifacts
    from smet_lab.train import Callbacks, train

    torch.set_num_threads(max(1, int(cpus)))  # a trial gets its CPUs' worth of threads, no more
    key = config["key"]
    cfg_dict = configs[key]
    load_extensions(cfg_dict.get("extensions") or [])  # the same rules as the driver, in this worker
    run_cfg = run_config_from(cfg_dict)
    corpus = load_corpus(run_cfg.data)
    # Strings ride along in every report: the driver tags the trial's MLflow run with them.
    ident = {"trial_key": key, "smet_data_sha256": corpus.sha256}
    work = Path(tempfile.mkdtemp(prefix="smet_trial_"))
    restored, restored_step = tune.get_checkpoint(), 0
    if restored is not None:
        local = restored.to_directory(str(work / "restored"))
        restored_step = restored.get_metadata().get("step", 0)
        run_cfg.train.resume_from = local

    def log(metrics: dict, step: int) -> None:
        # Several log calls can concern one step; each becomes one tune.report (a training iteration).
        tune.report({**metrics, "step": step, **ident})

    def on_checkpoint(path: Path, step: int) -> None:
        checkpoint = tune.Checkpoint.from_directory(str(path))
        checkpoint.set_metadata({"step": step})
        tune.report({"step": step, **ident, "checkpoint_step": step}, checkpoint=checkpoint)

    inject = os.environ.get(INJECT_ENV)
    should_stop = None
    if inject and inject in key:
        polls, at = [0], int(os.environ.get(INJECT_STEP_ENV, "5"))

        def should_stop():  # polled once per step: fail like a crashing trial would, mid-run
            polls[0] += 1
            if polls[0] >= at:
                raise InjectedFailure(f"injected failure ({INJECT_ENV}={inject})")
            return False
    try:
        result = train(run_cfg, output_dir=work / "run", corpus=corpus, callbacks=Callbacks(
            log=log, progress=None, on_checkpoint=on_checkpoint, should_stop=should_stop))
        artifacts = work / "artifacts"
        artifacts.mkdir()
        write_run_artifacts(result.history, cfg_dict, artifacts, title=key)
        (artifacts / "summary.json").write_text(json.dumps(
            {"status": result.status, "error": result.error, "summary": result.summary}, default=float))
        tune.report({**result.summary, "step": int(result.summary.get("summary/steps", 0)), **ident,
                     "smet_status": result.status, "smet_error": result.error or "", "final": 1,
                     "smet_resumed_from_step": int(restored_step)},
                    checkpoint=tune.Checkpoint.from_directory(str(artifacts)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
