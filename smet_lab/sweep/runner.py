"""`python -m smet_lab +sweep=NAME`: the grid of trials on Ray Tune, tracked in MLflow, resumable.

Storage: `sweeps/<name>/` (or `ray.storage`/`sweep.storage`) holds Tune's experiment state and
trial checkpoints; running the same command again restores it (finished trials are not re-run,
MLflow runs are reused), `sweep.resume=false` starts fresh.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from smet_lab.config import ConfigError
from smet_lab.grid import SweepConfig, Trial, expand, trial_configs
from smet_lab.metrics import FINAL_VAL_LOSS, MEAN_PROBE_JUMP
from smet_lab.sweep.folder import (DEFAULT_STORAGE, GRID_FILE, TRIALS_FILE, best_trial, check_distinct, check_resume,
                                  final_summaries, read_statuses, resume_plan, sweep_lock, sweep_tags, write_grid)

EXIT_TRIAL_FAILED = 1
EXIT_INTERRUPTED = 130


def sweep_config(cfg: DictConfig | dict) -> SweepConfig:
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SweepConfig), data["sweep"]))


def plan(cfg: DictConfig, compose_for) -> tuple[SweepConfig, list[Trial], dict]:
    """The sweep, its trials and each trial's full config; ConfigError on any bad value (every trial
    is checked before anything starts)."""
    from smet_lab.config import anchor_config, check_writable_dir, run_config_from
    from smet_lab.train import check_config

    sweep = sweep_config(cfg)
    trials = expand(sweep)
    configs = trial_configs(trials, compose_for)
    for trial in trials:
        cfg_t = anchor_config(configs[trial.key], Path.cwd())  # Ray runs each trial in a folder of its own
        if cfg_t["train"]["checkpoint_every"] == 0:  # sweeps always checkpoint, so an interrupted trial resumes
            cfg_t["train"]["checkpoint_every"] = max(1, cfg_t["train"]["max_steps"] // 5)
        try:
            # The recorded config is the effective one: the tokenizer sets the vocabulary.
            # (A cluster's trials train on its nodes: the driver's memory says nothing about them.)
            cfg_t["model"]["vocab_size"] = check_config(run_config_from(cfg_t), fit_here=cfg.ray.address == "local")
        except ConfigError as exc:
            raise ConfigError(exc.key, exc.value, f"{exc.allowed} (in trial {trial.key})") from None
    check_distinct(trials, configs)
    key = "ray.storage" if cfg.ray.storage else "sweep.storage"
    check_writable_dir(key, cfg.ray.storage or sweep.storage or DEFAULT_STORAGE)
    check_resume(sweep, storage_root(cfg, sweep) / sweep.name, trials, configs)
    return sweep, trials, configs


def storage_root(cfg: DictConfig, sweep: SweepConfig) -> Path:
    return Path(cfg.ray.storage or sweep.storage or DEFAULT_STORAGE).expanduser().resolve()


def ray_temp_dir(sweep_dir: Path) -> str:
    """Ray's session files; inside the sweep folder unless that path is too long for Ray's unix
    sockets (~107 bytes with Ray's own suffixes), then under the system temp dir."""
    candidate = sweep_dir / ".ray"
    if len(str(candidate)) <= 40:
        candidate.mkdir(parents=True, exist_ok=True)
        return str(candidate)
    return tempfile.mkdtemp(prefix="smetray_")


def init_ray(cfg: DictConfig, sweep_dir: Path) -> None:
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_MAX_PENDING_TRIALS_PG", "1")
    # Save Tune's experiment state at least every second (default: adaptive, ~10 s or more), so a
    # driver killed right after a trial ended does not run that trial's tail again on resume.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    # Ray Train's controller collects a report every 2 s by default, and a worker's report waits for
    # it: 1.8 s per report measured here, 0.05 s with this (every process of this job reads it).
    env = {"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")}}
    if cfg.ray.address == "local":
        from smet_lab.schema import local_cpus

        ray.init(address="local", num_cpus=local_cpus(cfg.ray), num_gpus=0 if not cfg.ray.gpus_per_trial else None,
                 include_dashboard=False, _temp_dir=ray_temp_dir(sweep_dir), log_to_driver=False,
                 configure_logging=True, logging_level="ERROR", runtime_env=env)
    else:  # an existing cluster: it owns its resources
        check_cluster_address(cfg.ray.address)
        try:
            ray.init(address=cfg.ray.address, log_to_driver=False, logging_level="ERROR", runtime_env=env)
        except ConnectionError as exc:
            raise ConfigError("ray.address", cfg.ray.address, f"no Ray cluster answers ({str(exc).splitlines()[0]}); "
                              "start one with `ray start --head`, or give ray.address=ray://<head>:10001") from None
        # ~/ray_bootstrap_config.yaml: the cluster launcher's file, Ray Tune's own sign of an autoscaler
        if not cfg.ray.autoscaling and not Path("~/ray_bootstrap_config.yaml").expanduser().exists():
            from smet_lab.schema import check_cluster_fits

            check_cluster_fits(cfg.ray, ray.nodes())
    # ray.init makes SIGTERM (`kill`, Slurm's or Kubernetes' stop) end the driver on the spot, its MLflow
    # runs left RUNNING: it stops the sweep as Ctrl-C does instead, resumable.
    signal.signal(signal.SIGTERM, lambda signum, frame: os.kill(os.getpid(), signal.SIGINT))


def check_cluster_address(address: str, timeout: float = 5.0) -> None:
    """ConfigError in seconds where ray.init would fail or wait for minutes: a ray:// address without the
    Ray Client package, or a host:port where nothing listens (ray.init retries the GCS for minutes)."""
    if address.startswith("ray://") and importlib.util.find_spec("grpc") is None:
        raise ConfigError("ray.address", address, "a ray:// address needs the Ray Client: pip install 'ray[client]'")
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if address == "auto" or not sep or not port.isdigit():
        return  # auto: Ray looks for a cluster on this machine and says at once when there is none
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConfigError("ray.address", address, f"nothing answers at {host}:{port} ({exc.strerror or exc}); "
                          "start the cluster with `ray start --head`") from None


def concurrent_trials(cfg: DictConfig) -> int | None:
    """How many trials may run at once (None: as many as fit). Trials of several Ray Train workers
    are capped by what the cluster holds: their drivers take no CPU, and drivers whose workers cannot
    start would wait on each other."""
    import ray

    limit = cfg.ray.max_concurrent or None
    workers = cfg.ray.workers_per_trial
    if workers > 1:
        have = ray.cluster_resources()
        fit = int(have.get("CPU", 0) // (workers * cfg.ray.cpus_per_trial))
        if cfg.ray.gpus_per_trial:
            fit = min(fit, int(have.get("GPU", 0) // (workers * cfg.ray.gpus_per_trial)))
        limit = max(1, min(fit, limit or fit))
    return limit


def run_sweep(cfg: DictConfig, compose_for) -> int:
    """Run (or resume) the sweep; returns the exit code (0 ok, 1 a trial failed, 130 interrupted)."""
    sweep, trials, configs = plan(cfg, compose_for)
    with sweep_lock(storage_root(cfg, sweep), sweep.name):
        return _run_sweep(cfg, sweep, trials, configs)


def _run_sweep(cfg: DictConfig, sweep: SweepConfig, trials: list[Trial], configs: dict) -> int:
    from smet_lab.tracking import TrackingConfig
    from smet_lab.train.checks import no_update_note

    sweep_dir = storage_root(cfg, sweep) / sweep.name
    tracking: TrackingConfig = OmegaConf.to_object(cfg.tracking)
    kept, states, todo = resume_plan(sweep, sweep_dir, trials)
    resuming = kept.startswith("resumes: ")
    if resuming and not todo:  # every trial has ended: no Ray (a cluster's sweep reports on a laptop too)
        print(f"[sweep {sweep.name}] {len(trials)} trials -> {sweep_dir}", flush=True)
        print(_resuming_line(sweep, sweep_dir, kept, states, todo), flush=True)
        return _conclude(tracking, sweep, sweep_dir, trials)
    if cfg.ray.address != "local":
        init_ray(cfg, sweep_dir)  # an unreachable cluster stops the sweep before it touches its folder
    if not sweep.resume and sweep_dir.exists():
        shutil.rmtree(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    print(f"[sweep {sweep.name}] {len(trials)} trials -> {sweep_dir}", flush=True)
    static = {key: note for key, note in ((k, no_update_note(c)) for k, c in configs.items()) if note}
    if static:
        key, note = next(iter(static.items()))
        print(f"[sweep {sweep.name}] note: {len(static)} trial(s) (e.g. {key}): {note}", file=sys.stderr, flush=True)
    if cfg.ray.address == "local":
        init_ray(cfg, sweep_dir)  # (its session files go into the sweep folder)
    legacy = resuming and not (sweep_dir / GRID_FILE).is_file()  # started by a smet_lab without grid.json
    if resuming:
        print(_resuming_line(sweep, sweep_dir, kept, states, todo), flush=True)
    try:
        grid = _fit(cfg, sweep, trials, configs, sweep_dir, tracking, resuming)
    finally:
        import ray

        ray.shutdown()
    ran = {(r.config or {}).get("key") for r in grid} if legacy and grid else set()
    return _conclude(tracking, sweep, sweep_dir, trials, legacy_ran=ran if legacy else None)


def _resuming_line(sweep: SweepConfig, sweep_dir: Path, kept: str, states: dict, todo: int) -> str:
    retry = sum(s.startswith("failed") for s in states.values()) if sweep.retry_failed else None
    retrying = {None: "", 0: " (no failed trial to retry)"}.get(retry, f" (retrying {retry} failed)")
    ended = ("; every trial has ended, so only the report is rebuilt (sweep.resume=false starts afresh)"
             if not todo else "")
    return f"[sweep {sweep.name}] resuming from {sweep_dir / 'tune'}{retrying}: {kept.removeprefix('resumes: ')}{ended}"


def _fit(cfg: DictConfig, sweep: SweepConfig, trials: list[Trial], configs: dict, sweep_dir: Path, tracking,
         resuming: bool):
    """Run (resuming: restore) the Tune experiment in `sweep_dir`/tune; its ResultGrid."""
    from ray import tune

    from smet_lab.sweep.callbacks import MlflowSweepLogger, SweepProgress, TrialStatuses
    from smet_lab.sweep.folder import forget_failed
    from smet_lab.sweep.train_workers import DRIVER_MEMORY, run_trial_workers
    from smet_lab.sweep.trainable import run_trial

    cpus, gpus, workers = cfg.ray.cpus_per_trial, cfg.ray.gpus_per_trial, cfg.ray.workers_per_trial
    # A trial's config is looked up by its key in `configs` (handed over through Ray's object store,
    # and handed again on restore), never stored in Tune's search state: Tune's restore does not
    # rebuild a sample_from faithfully, and trials not created before an interrupt then failed.
    if workers > 1:  # each trial a Ray Train run of `workers` processes (smet_lab.sweep.train_workers)
        trainable = tune.with_resources(
            tune.with_parameters(run_trial_workers, configs=configs, cpus=cpus, workers=workers, gpus=gpus,
                                 storage=str(sweep_dir / "train")), {"memory": DRIVER_MEMORY})
    else:
        trainable = tune.with_resources(tune.with_parameters(run_trial, cpus=cpus, configs=configs),
                                        {"cpu": cpus, "gpu": gpus})
    exp_dir = str(sweep_dir / "tune")
    if resuming and tune.Tuner.can_restore(exp_dir):
        if sweep.retry_failed:
            forget_failed(str(sweep_dir))
        return tune.Tuner.restore(exp_dir, trainable, resume_unfinished=True,
                                  resume_errored=sweep.retry_failed).fit()
    parent_params = {"sweep": OmegaConf.to_container(cfg.sweep, resolve=True), "n_trials": len(trials)}
    # grid.json: what a later resume is checked against (check_resume); sweep.json: for the report
    extensions = configs[trials[0].key].get("extensions") or []
    write_grid(sweep_dir, trials, configs, {**parent_params, "extensions": extensions})
    scheduler = None
    if sweep.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="step", grace_period=sweep.asha_grace_steps,
                                  max_t=max(c["train"]["max_steps"] for c in configs.values()))
    progress = SweepProgress(sweep.name, sweep.metric, sweep.mode, {t.key: configs[t.key]["train"]["max_steps"]
                                                                    for t in trials},
                             {t.key: step_work(configs[t.key]) for t in trials})
    callbacks = [MlflowSweepLogger(tracking, sweep.name, str(sweep_dir), configs, parent_params) if tracking.enabled
                 else TrialStatuses(str(sweep_dir)), progress]
    return tune.Tuner(
        trainable,
        param_space={"key": tune.grid_search([t.key for t in trials])},
        # FIFO by default: ASHA would stop spiking-but-recovering trials and bias the results.
        tune_config=tune.TuneConfig(scheduler=scheduler, metric="train/loss" if scheduler else None,
                                    mode="min" if scheduler else None, max_concurrent_trials=concurrent_trials(cfg)),
        run_config=tune.RunConfig(name="tune", storage_path=str(sweep_dir), verbose=0, callbacks=callbacks,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                  failure_config=tune.FailureConfig(max_failures=0)),
    ).fit()


def step_work(cfg: dict) -> float:
    """A trial's relative cost per step, for the progress ETA: parameters x tokens per step (a step's
    FLOPs are ~6x that; the sparse layers' matmuls are dense in every layout)."""
    from smet_lab.config import ModelConfig, from_dict
    from smet_lab.model import count_parameters

    train = cfg["train"]
    return float(count_parameters(from_dict(ModelConfig, cfg["model"])) * cfg["model"]["seq_len"]
                 * train["batch_size"] * train["grad_accum"])


def _conclude(tracking, sweep: SweepConfig, sweep_dir: Path, trials: list[Trial], legacy_ran: set | None = None) -> int:
    """The trial table, the report and the parent run's status from the sweep's folder; the exit code.
    `legacy_ran`: the trial keys Tune restored, for a folder from before grid.json."""
    statuses = read_statuses(sweep_dir)
    statuses = {t.key: statuses[t.key] for t in trials if t.key in statuses}
    failed = [k for k, v in statuses.items() if v["status"] == "FAILED"]
    missing = [t.key for t in trials if t.key not in statuses]
    write_trial_table(sweep_dir, trials, statuses, sweep.metric)
    never = [k for k in missing if k not in legacy_ran] if legacy_ran is not None else []
    interrupted = bool(missing) and not never
    write_report(tracking, sweep, sweep_dir, interrupted)
    finish_parent(tracking, sweep, sweep_dir, statuses, len(trials), interrupted)
    print(f"[sweep {sweep.name}] {len(statuses)}/{len(trials)} trials ended "
          f"({sum(v['status'] == 'FINISHED' for v in statuses.values())} finished, "
          f"{sum(v['status'] == 'DIVERGED' for v in statuses.values())} diverged, {len(failed)} failed); "
          f"results in {sweep_dir}", flush=True)
    if never:  # a sweep folder from before grid.json existed, restored with another grid
        print(f"[sweep {sweep.name}] error: {len(never)} trial(s) of this grid are not in the resumed experiment "
              f"{sweep_dir / 'tune'} (e.g. {never[0]}): it was started with another grid; run with "
              f"sweep.resume=false to start afresh or sweep.name=OTHER to keep both", file=sys.stderr)
        return EXIT_TRIAL_FAILED
    if interrupted:
        print(f"[sweep {sweep.name}] interrupted: run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    if failed:
        print(f"[sweep {sweep.name}] {len(failed)} trial(s) failed (e.g. {failed[0]}: {statuses[failed[0]]['error']}); "
              f"run again with sweep.retry_failed=true to retry them from their last checkpoint", file=sys.stderr)
    return EXIT_TRIAL_FAILED if failed else 0


def write_trial_table(sweep_dir: Path, trials: list[Trial], statuses: dict, metric: str) -> Path:
    """trials.csv (and the same table printed): each trial's grid values, status and metrics, read from
    its final checkpoint's summary.json (NaN where a trial has none: it did not finish, or has no update)."""
    import pandas as pd

    summaries = final_summaries(sweep_dir)
    rows = []
    for t in trials:
        m = summaries.get(t.key, {})
        rows.append({"trial": t.key, **t.values, "status": statuses.get(t.key, {}).get("status", "UNFINISHED"),
                     # NaN, not None, where a trial has no value: a numeric column
                     **{k: m[k] if isinstance(m.get(k), (int, float)) else math.nan
                        for k in dict.fromkeys((metric, MEAN_PROBE_JUMP, FINAL_VAL_LOSS))}})
    frame = pd.DataFrame(rows)
    path = sweep_dir / TRIALS_FILE
    frame.to_csv(path, index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(frame.drop(columns=["trial"]).to_string(index=False), flush=True)
    return path


def write_report(tracking, sweep: SweepConfig, sweep_dir: Path, interrupted: bool) -> None:
    """The stability report into <sweep_dir>/report/, logged as the parent run's artifact report/
    (with tracking=none: read from the folder's files). Never fails the sweep: any error (or a second
    Ctrl-C while it is built) is one warning line."""
    try:
        from smet_lab.report import report_for_sweep_dir

        out = report_for_sweep_dir(tracking.uri if tracking.enabled else None, tracking.experiment, sweep_dir,
                                   status="KILLED" if interrupted else "FINISHED")
        print(f"[sweep {sweep.name}] report: {out / 'report.html'}", flush=True)
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - never cost the sweep its exit code or parent
        print(f"[sweep {sweep.name}] warning: no report ({type(exc).__name__}: {exc})", file=sys.stderr, flush=True)


def finish_parent(tracking, sweep: SweepConfig, sweep_dir: Path, statuses: dict, n_trials: int,
                  interrupted: bool) -> None:
    """The parent run tells the truth: KILLED when interrupted, FAILED when a trial failed, with the
    trial counts and the best value of the sweep metric (and its trial) as metrics, so sweeps compare
    in MLflow's run table."""
    from smet_lab.tracking import find_or_start_run

    if not tracking.enabled:
        return
    parent = find_or_start_run(tracking, run_name=f"sweep:{sweep.name}", params={},
                               tags={"smet.kind": "sweep", "smet.sweep": sweep.name},
                               match=sweep_tags(sweep_dir), mark_resumed=False)
    parent.log_artifacts([sweep_dir / TRIALS_FILE])
    counts = {s: sum(v["status"] == s for v in statuses.values()) for s in ("FINISHED", "DIVERGED", "FAILED")}
    metrics = {"sweep/trials": n_trials, "sweep/trials_finished": counts["FINISHED"],
               "sweep/trials_diverged": counts["DIVERGED"], "sweep/trials_failed": counts["FAILED"]}
    best = best_trial(sweep_dir, sweep.metric, sweep.mode)
    if best is not None:
        metrics[f"best/{sweep.metric}"] = best[2]
        parent.set_tags({"smet.best_trial": best[0], "smet.best_metric": f"{sweep.mode} {sweep.metric}"})
    parent.log_metrics(metrics, 0)
    status = "KILLED" if interrupted else "FAILED" if counts["FAILED"] else "FINISHED"
    error = "sweep interrupted" if interrupted else f"{counts['FAILED']} trial(s) failed" if counts["FAILED"] else None
    parent.finish(status, error)
