"""`python -m smet_lab [overrides]`: one training run (or a sweep with `+sweep=NAME`).

Flow: a pre-flight composes the config with Hydra's compose API and checks every value, so a bad
input stops with one line (key, value, what is allowed) and exit code 2 before Hydra creates an
output folder or MLflow a run. Then `@hydra.main` runs the job. Torch, MLflow and Ray are imported
only when work starts, so `--help` and `--cfg job` answer fast.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from smet_lab import schema
from smet_lab.compose import (compose, default_run_dir, given_run_dir, group_composer, resume_overrides, run_container,
                              to_run_config)
from smet_lab.config import ConfigError, RuleError, check_writable_dir, claim_folder
from smet_lab.keys import explain_hydra_error, hydra_setting, null_group, unknown_key
from smet_lab.preflight import (CONF_DIR, MULTIRUN_FLAGS, extension_entries, ignored_setting, multirun_overrides,
                                overridden_by_grid, override_key, quote, split_args, unknown_flag)
from smet_lab.stopping import STOP, clean_exit, stop_on_signals, stop_when_reader_gone
from smet_lab.tracking.settings import quiet_mlflow
from smet_lab.usage import help_text

EXIT_BAD_INPUT = 2
RUN_FILE = "mlflow_run.json"  # in a run's output folder: the MLflow run a resume continues
PLAN_FLAG = "--plan"  # print what the command would run (smet_lab.preview), run nothing


class BadInput(Exception):
    """A one-line user error (exit code 2)."""


def fail(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # under torchrun the first process speaks for all
        print(f"smet_lab: error: {message}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def preflight(overrides: list[str], compose_only: bool = False) -> DictConfig:
    """Compose and check everything (only composition when compose_only: `--cfg` stays fast);
    raise BadInput with one line on any problem."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    refused = null_group(overrides) or hydra_setting(overrides)
    if refused:
        raise BadInput(refused)
    try:
        cfg = compose(overrides)
        container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except (HydraException, OmegaConfBaseException) as exc:
        if "MissingMandatoryValue" in type(exc).__name__ or "Missing mandatory value" in str(exc):
            key = re.search(r"full_key: ([\w.]+)", str(exc))
            raise BadInput(f"{key.group(1) if key else 'a key'} is required and has no value (set it on the command line)")
        raise BadInput(explain_hydra_error(exc, overrides)) from None
    unknown = unknown_key(container, overrides)  # `+key=` adds keys the schema does not close off
    if unknown:
        raise BadInput(unknown)
    if compose_only:
        return cfg
    try:
        from smet_lab.tracking import check_tracking
        from smet_lab.train import check_config
        from smet_lab.train.distributed import check_world, launched_world_size

        if cfg.get("sweep") is not None:
            from smet_lab.schema import check_ray
            from smet_lab.sweep.runner import plan

            if cfg.train.device == "cuda" and not cfg.ray.gpus_per_trial:  # Ray would hide every GPU from the trials
                raise ConfigError("ray.gpus_per_trial", cfg.ray.gpus_per_trial,
                                  "> 0 when the trials train on CUDA (train.device=cuda, e.g. train=gpu): Ray shows a "
                                  "trial only the GPUs it gives it (ray.gpus_per_trial=1)")
            check_ray(cfg.ray)
            _, trials, by_trial = plan(cfg, group_composer(overrides))
            overridden = overridden_by_grid(overrides, trials)
            if overridden:
                raise BadInput(overridden)
            configs = list(by_trial.values())
            workers, origin = cfg.ray.workers_per_trial, "ray.workers_per_trial"
        else:
            check_config(to_run_config(cfg))
            check_writable_dir("hydra.run.dir", given_run_dir(overrides) or "outputs")
            configs = [container]
            workers, origin = launched_world_size(), "the launcher's WORLD_SIZE"
        for c in configs:
            t = c["train"]
            check_world(t["batch_size"], workers, t["dist_backend"], t["device"], origin)
        ignored = ignored_setting(overrides, configs, is_sweep=cfg.get("sweep") is not None)
        if ignored:
            raise BadInput(ignored)
        tracking = OmegaConf.to_object(cfg.tracking)
        if tracking.enabled:
            check_tracking(tracking)
    except ConfigError as exc:
        raise BadInput(str(exc)) from None
    return cfg


# ------------------------------------------------------------------------------------ the job
def run_single(cfg: DictConfig, output_dir: Path) -> int:
    """One training run, tracked in MLflow. Returns the process exit code."""
    from smet_lab.data import check_streams, load_corpus
    from smet_lab.tracking import write_run_artifacts
    from smet_lab.tracking.artifacts import write_summary
    from smet_lab.train import Callbacks, train
    from smet_lab.train import checkpoint as ckpt
    from smet_lab.train.checks import no_update_note

    container = run_container(cfg)
    run_cfg = to_run_config(container)
    if run_cfg.train.resume_from:  # a run's folder means its newest checkpoint, recorded as the one resumed
        run_cfg.train.resume_from = str(ckpt.resolve(run_cfg.train.resume_from))
    tracking = OmegaConf.to_object(cfg.tracking)
    try:
        corpus = load_corpus(run_cfg.data, progress=print)
        check_streams(corpus.train, corpus.val, run_cfg.model.seq_len, run_cfg.train.batch_size)
    except ConfigError as exc:
        _remove_if_empty(output_dir)
        fail(str(exc))
    container["model"]["vocab_size"] = corpus.vocab_size  # recorded as the run trains: the tokenizer's
    container["train"]["resume_from"] = run_cfg.train.resume_from
    name = f"{run_cfg.method}-d{run_cfg.sparsity.density}-s{run_cfg.train.seed}"
    tags = {"smet.method": run_cfg.method, "smet.data_sha256": corpus.sha256, "smet.kind": "run",
            "smet.output_dir": str(output_dir)}
    print(f"smet_lab: {name} on {corpus.name} ({len(corpus.train):,} train tokens), output in {output_dir}"
          + (f", resuming from {run_cfg.train.resume_from}" if run_cfg.train.resume_from else ""))
    notes = [no_update_note(container)]
    if run_cfg.train.resume_from:
        changed = ckpt.changes(run_cfg.train.resume_from, run_cfg)
        notes.append(changed and "resuming with settings other than the checkpoint's: " + ", ".join(changed))
        if changed:  # a continued MLflow run keeps its first params (MLflow's are immutable): the tag says what changed
            tags["smet.resume_changes"] = "; ".join(changed)[:5000]
    for note in filter(None, notes):
        print(f"smet_lab: note: {note}", file=sys.stderr)
    with open_tracker(tracking, run_cfg.train.resume_from, name, container, tags, output_dir) as tracker:
        result = train(run_cfg, output_dir=output_dir, corpus=corpus,
                       callbacks=Callbacks(log=tracker.log_metrics, should_stop=STOP.is_set))
        paths = write_run_artifacts(result.history, container, output_dir, title=name)
        write_summary(output_dir, result.status, result.error, result.summary)  # for a report of the folder
        tracker.log_artifacts(paths)
        tracker.finish(result.status, result.error)
    s = result.summary
    if result.status == "KILLED":
        print(f"smet_lab: {result.error}; checkpoint saved, resume with "
              f"train.resume_from={ckpt.folder(output_dir, int(s['summary/steps']))}", file=sys.stderr)
    elif result.status != "FINISHED":
        print(f"smet_lab: error: {result.error} (run marked diverged)", file=sys.stderr)
    else:
        jump = s.get("summary/mean_probe_jump")
        print(f"smet_lab: done: final val loss {s.get('summary/final_val_loss', float('nan')):.4f}, "
              f"mean probe jump {no_jump_reason(result.history, run_cfg) if jump is None else f'{jump:.4f}'}, "
              f"state memory {s['summary/memory/state_ratio_vs_dense_adam']:.3f} x dense Adam "
              f"(with the weights {s['summary/memory/training_ratio_vs_dense_adam']:.3f} x), "
              f"optimizer kernel {'compiled' if s.get('summary/optimizer_kernel_compiled') else 'eager'}"
              + (f", {s['summary/world_size']:.0f} processes all-reducing {s['summary/comm_bytes_per_step'] / 1e6:.2f} MB "
                 "per step" if s.get("summary/world_size", 1) > 1 else ""))
    print(f"smet_lab: results in {output_dir}")
    if tracking.enabled:
        print(f"smet_lab: MLflow run {tracker.run_id} in experiment '{tracking.experiment}' at {tracking.uri}; "
              "dashboards: " + (tracking.uri if tracking.uri.startswith(("http://", "https://"))  # the server's own UI
                                else f"mlflow ui --backend-store-uri {tracking.uri}"))
    return {"FINISHED": 0, "KILLED": 130}.get(result.status, 1)


def no_jump_reason(history: list[dict], run_cfg) -> str:
    """Why a run has no probe jump: no topology update, no probes, or its last update's window ran past the end."""
    if not any("topo/density" in row for row in history):
        return "n/a (no topology update)"
    if run_cfg.train.probe_window == 0:
        return "n/a (train.probe_window=0: no probes)"
    return (f"n/a (the run ended within train.probe_window={run_cfg.train.probe_window} steps of its topology update, "
            "before its probe window closed)")


def open_tracker(tracking, resume_from: str | None, name: str, params: dict, tags: dict, output_dir: Path):
    """The run's tracker. A resumed run continues its MLflow run (same id, one contiguous history) when
    the store still has it (its id is in the checkpoint's output folder), else a new run tagged with
    where it resumed from."""
    from smet_lab.tracking import continue_run, start_run

    tracker, previous = None, None
    if tracking.enabled and resume_from:
        tags = {**tags, "smet.resumed_from": str(resume_from)}
        found = next((d / RUN_FILE for d in Path(resume_from).resolve().parents[:3] if (d / RUN_FILE).is_file()), None)
        previous = json.loads(found.read_text()) if found else None
        if previous and previous.get("experiment") == tracking.experiment:
            tracker = continue_run(tracking, previous["run_id"], {"smet.resumed": "true", **tags})
    if tracker is None:
        if previous:
            tags["smet.resumed_from_run"] = previous["run_id"]
        tracker = start_run(tracking, run_name=name, params=params, tags=tags)
    if tracking.enabled:
        continued = previous is not None and tracker.run_id == previous["run_id"]
        print(f"smet_lab: tracking to MLflow run {tracker.run_id}{' (continued)' if continued else ''} ({tracking.uri})")
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / RUN_FILE).write_text(json.dumps({"run_id": tracker.run_id, "experiment": tracking.experiment}))
    return tracker


def _remove_if_empty(output_dir: Path) -> None:
    """Drop an output folder that holds only Hydra's own bookkeeping (nothing half-written stays)."""
    output_dir = Path(output_dir)
    if output_dir.is_dir() and all(p.name in (".hydra", "cli.log", "__main__.log") for p in output_dir.iterdir()):
        shutil.rmtree(output_dir, ignore_errors=True)
        for parent in output_dir.parents[:2]:  # outputs/<date>/ and outputs/ when nothing else is left
            if parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    if cfg.get("sweep") is not None:
        from smet_lab.sweep import run_sweep

        try:
            own_configs = [o for o in hydra_cfg.overrides.hydra if override_key(o) == "hydra.searchpath"]
            code = run_sweep(cfg, group_composer([*hydra_cfg.overrides.task, *own_configs]))
        except ConfigError as exc:  # found only when the sweep starts (e.g. no Ray cluster answers)
            _remove_if_empty(output_dir)
            fail(str(exc))
        _remove_if_empty(output_dir)  # a sweep writes into its sweep folder, not here
    else:
        try:
            code = run_single(cfg, output_dir)
        except RuleError as exc:  # a user's rule broke its contract: the MLflow run is already FAILED
            print(f"smet_lab: error: {exc}", file=sys.stderr)
            code = 1
    if code:
        sys.exit(code)


@clean_exit
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(help_text())
        return
    flag = unknown_flag(argv)
    if flag:
        fail(flag)
    stop_on_signals()
    quiet_mlflow()
    plan_only = PLAN_FLAG in argv
    argv = [a for a in argv if a != PLAN_FLAG]
    overrides, hydra_alone, cfg_only = split_args(argv)
    if any(flag in argv for flag in MULTIRUN_FLAGS):  # a multirun is a sweep: Ray Tune, not Hydra's launcher
        try:
            swept = multirun_overrides(overrides)
        except ConfigError as exc:
            fail(str(exc))
        argv = [a for a in argv if a not in MULTIRUN_FLAGS and a not in overrides] + swept
        overrides = swept
    overrides, recorded = resume_overrides(overrides)
    if recorded:  # `train.resume_from=<run>` continues that run as its command set it up
        argv = recorded + argv
        if os.environ.get("RANK", "0") == "0":
            print(f"smet_lab: resuming with the settings of the run's command: {' '.join(recorded)} "
                  "(a setting typed now replaces it)", file=sys.stderr)
    try:  # extensions register their rules and methods before anything is validated
        from smet_lab.extend import load_extensions

        found, entries = extension_entries(overrides)
        resolved = load_extensions(entries)
    except ConfigError as exc:
        fail(str(exc))
    schema.register()  # again: the method presets that extensions registered become options
    if found:  # absolute paths, so Ray trials (other working directories) import the same files
        fixed = f"{found.split('=', 1)[0]}=[{','.join(map(quote, resolved))}]"
        argv, overrides = [fixed if a == found else a for a in argv], [fixed if o == found else o for o in overrides]
    distributed = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1  # torchrun started this process
    if distributed and any(o.split("=", 1)[0].lstrip("+~") == "sweep" for o in overrides):
        fail("+sweep cannot run under torchrun (a sweep launches its own processes: use ray.workers_per_trial=N)")
    cfg = None
    if not hydra_alone:
        try:
            cfg = preflight(overrides, compose_only=cfg_only)
        except BadInput as exc:
            fail(str(exc))
    if plan_only and cfg is not None and not cfg_only:
        print_plan(cfg, overrides)
        return
    if STOP.is_set():  # Ctrl-C while the config was checked: nothing has started
        print("smet_lab: interrupted before anything started", file=sys.stderr)
        sys.exit(130)
    stop_when_reader_gone()  # (not for a plan: its reader leaving is no job to stop)
    if (cfg is not None and not cfg_only and cfg.get("sweep") is None and os.environ.get("RANK", "0") == "0"
            and given_run_dir(overrides) is None):
        # Hydra's default output folder is named by the second: two runs started in the same second
        # (two terminals, a job array) would write into one folder. Each run claims its own.
        claimed = claim_folder(Path(default_run_dir(overrides)))
        argv = [*argv, f"hydra.run.dir={quote(str(claimed))}"]
    sys.argv = [sys.argv[0], *argv]
    if distributed and cfg is not None and not cfg_only:
        sys.exit(run_distributed(cfg))
    try:
        hydra_main()
    except KeyboardInterrupt:
        print("smet_lab: interrupted (the MLflow run is marked KILLED)", file=sys.stderr)
        sys.exit(130)


def print_plan(cfg: DictConfig, overrides: list[str]) -> None:
    """--plan: what this command would run, and nothing run or written."""
    from smet_lab.preview import describe_run, describe_sweep

    if os.environ.get("RANK", "0") != "0":
        return
    try:
        if cfg.get("sweep") is not None:
            print(describe_sweep(cfg, group_composer(overrides)))
        else:
            print(describe_run(cfg, given_run_dir(overrides) or f"{default_run_dir(overrides)} (or -2, -3, ... "
                                                                "if a run started in the same second has it)"))
    except ConfigError as exc:
        fail(str(exc))
    print(f"smet_lab: plan only ({PLAN_FLAG}): nothing was started or written")


def run_distributed(cfg: DictConfig) -> int:
    """One run trained by the processes torchrun started: all join the process group; the first runs
    the Hydra job (output folder, MLflow, progress, checkpoints) and the others train silently beside it."""
    from torch.distributed.elastic.multiprocessing.errors import record

    from smet_lab.train.distributed import init_from_env

    @record  # torchrun's error summary then names the failing process and its exception
    def job() -> int:
        world = init_from_env(cfg.train.dist_backend)
        if world.is_main:
            try:
                hydra_main()
            except SystemExit as exc:
                return exc.code or 0
            return 0
        from smet_lab.train import Callbacks, train

        result = train(to_run_config(run_container(cfg)), callbacks=Callbacks(progress=None, should_stop=STOP.is_set))
        return {"FINISHED": 0, "KILLED": 130}.get(result.status, 1)

    try:
        return job()
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
