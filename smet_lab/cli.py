"""`python -m smet_lab [overrides]`: one training run (or a sweep with `+sweep=NAME`).

Flow: a pre-flight composes the config with Hydra's compose API and checks every value, so a bad
input stops with one line (key, value, what is allowed) and exit code 2 before Hydra creates an
output folder or MLflow a run. Then `@hydra.main` runs the job. Torch, MLflow and Ray are imported
only when work starts, so `--help` and `--cfg job` answer fast.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from smet_lab import schema
from smet_lab.config import ConfigError, RunConfig, run_config_from

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
EXIT_BAD_INPUT = 2

schema.register()

# Hydra flags that take a value (their value is not an override).
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                     "--config-dir", "-cd", "--experimental-rerun"}
_FLAGS_THAT_SKIP = {"--help", "-h", "--hydra-help", "--version", "--info", "-i", "--shell-completion", "-sc"}


class BadInput(Exception):
    """A one-line user error (exit code 2)."""


def fail(message: str) -> None:
    print(f"smet_lab: error: {message}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


# ----------------------------------------------------------------------------------- pre-flight
def split_args(argv: list[str]) -> tuple[list[str], bool, bool]:
    """(overrides, whether Hydra should handle the call alone, whether only the config is asked for)."""
    overrides, skip, cfg_only, i = [], False, False, 0
    while i < len(argv):
        arg = argv[i]
        if arg in _FLAGS_THAT_SKIP:
            skip = True
        elif arg in _FLAGS_WITH_VALUE:
            cfg_only = cfg_only or arg in ("--cfg", "-c")
            i += 1
        elif not arg.startswith("-"):
            overrides.append(arg)
        i += 1
    return overrides, skip, cfg_only


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def explain_hydra_error(exc: Exception, overrides: list[str]) -> str:
    """Hydra's multi-line composition errors as one line: key, value, what is allowed."""
    text = str(exc) + ("\n" + str(exc.__cause__) if exc.__cause__ else "")
    missing = re.search(r"Could not find '([\w-]+)/([^']+)'", text)
    if missing:
        group, option = missing.groups()
        return f"{group}={option} is not allowed: one of {', '.join(group_options(group))}"
    override = re.search(r"Could not override '([^']+)'", text)
    key_error = re.search(r"Key '([^']+)' not in '(\w+)'", text)
    if override or key_error:
        key = override.group(1) if override else key_error.group(1)
        value = next((o.split("=", 1)[1] for o in overrides if o.lstrip("+~").split("=", 1)[0] == key), None)
        if key.startswith("sweep.params."):
            return (f"{key}={value} is not allowed: not an axis of this sweep; add an axis with "
                    f"+{key}=[...] (the key must be a config key, e.g. +sweep.params.optim.lr=[0.001,0.002])")
        section = key.rsplit(".", 1)[0] if "." in key else None
        known = ", ".join(_known_keys(section)) or "none"
        return f"{key}={value} is not allowed: unknown key; known keys of {section or 'the config'}: {known}"
    typed = re.search(r"Value '([^']*)' (?:of type '\w+' )?could not be converted to (\w+)", text)
    full_key = re.search(r"full_key: ([\w.]+)", text)
    if typed and full_key:
        return f"{full_key.group(1)}={typed.group(1)} is not allowed: must be of type {typed.group(2)}"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first


def _known_keys(section: str | None) -> list[str]:
    node = OmegaConf.structured(schema.AppConfig)
    for part in (section.split(".") if section else []):
        node = node.get(part) if isinstance(node, DictConfig) and part in node else None
        if node is None:
            return []
    return list(node.keys()) if isinstance(node, DictConfig) else []


def compose(overrides: list[str]) -> DictConfig:
    """The composed config for these overrides (tests use this too); works inside a running Hydra
    app (a sweep composes one base config per method) and outside it."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name="config", overrides=overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def method_composer(overrides: list[str]):
    """compose_for_method(m): the config as if `method=m` had been typed with the other overrides."""
    rest = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "method"]

    def compose_for_method(method: str | None) -> dict:
        cfg = compose(rest + ([f"method={method}"] if method else []))
        return OmegaConf.to_container(cfg, resolve=True)

    return compose_for_method


def to_run_config(cfg: DictConfig | dict) -> RunConfig:
    return run_config_from(OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg))


def preflight(overrides: list[str], compose_only: bool = False) -> DictConfig:
    """Compose and check everything (only composition when compose_only: `--cfg` stays fast);
    raise BadInput with one line on any problem."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = compose(overrides)
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except (HydraException, OmegaConfBaseException) as exc:
        if "MissingMandatoryValue" in type(exc).__name__ or "Missing mandatory value" in str(exc):
            key = re.search(r"full_key: ([\w.]+)", str(exc))
            raise BadInput(f"{key.group(1) if key else 'a key'} is required and has no value (set it on the command line)")
        raise BadInput(explain_hydra_error(exc, overrides)) from None
    if compose_only:
        return cfg
    try:
        from smet_lab.tracking import check_tracking
        from smet_lab.train import check_config

        if cfg.get("sweep") is not None:
            from smet_lab.sweep.runner import plan

            plan(cfg, method_composer(overrides))
        else:
            check_config(to_run_config(cfg))
        tracking = OmegaConf.to_object(cfg.tracking)
        if tracking.enabled:
            check_tracking(tracking)
    except ConfigError as exc:
        raise BadInput(str(exc)) from None
    return cfg


# ------------------------------------------------------------------------------------ the job
def run_single(cfg: DictConfig, output_dir: Path) -> int:
    """One training run, tracked in MLflow. Returns the process exit code."""
    from smet_lab.data import load_corpus
    from smet_lab.tracking import start_run, write_run_artifacts
    from smet_lab.train import train

    run_cfg = to_run_config(cfg)
    container = OmegaConf.to_container(cfg, resolve=True)
    tracking = OmegaConf.to_object(cfg.tracking)
    try:
        corpus = load_corpus(run_cfg.data)
    except ConfigError as exc:
        _remove_if_empty(output_dir)
        fail(str(exc))
    name = f"{run_cfg.method}-d{run_cfg.sparsity.density}-s{run_cfg.train.seed}"
    tags = {"smet.method": run_cfg.method, "smet.data_sha256": corpus.sha256, "smet.kind": "run",
            "smet.output_dir": str(output_dir)}
    print(f"smet_lab: {name} on {corpus.name} ({len(corpus.train):,} train tokens), output in {output_dir}")
    with start_run(tracking, run_name=name, params=container, tags=tags) as tracker:
        if tracking.enabled:
            print(f"smet_lab: tracking to MLflow run {tracker.run_id} ({tracking.uri})")
        result = train(run_cfg, output_dir=output_dir, log=tracker.log_metrics, corpus=corpus,
                       should_stop=STOP.is_set)
        paths = write_run_artifacts(result.history, container, output_dir, title=name)
        tracker.log_artifacts(paths)
        tracker.finish(result.status, result.error)
    s = result.summary
    if result.status == "KILLED":
        print(f"smet_lab: {result.error}; checkpoint saved, resume with "
              f"train.resume_from={output_dir}/checkpoints/step_{int(s['summary/steps'])}", file=sys.stderr)
    elif result.status != "FINISHED":
        print(f"smet_lab: error: {result.error} (run marked diverged)", file=sys.stderr)
    else:
        print(f"smet_lab: done: final val loss {s.get('summary/final_val_loss', float('nan')):.4f}, "
              f"mean probe jump {s.get('summary/mean_probe_jump', float('nan')):.4f}, "
              f"state memory {s['summary/memory/state_ratio_vs_dense_adam']:.3f} x dense Adam")
    print(f"smet_lab: results in {output_dir}")
    if tracking.enabled:
        uri = tracking.uri
        print(f"smet_lab: MLflow run {tracker.run_id} in experiment '{tracking.experiment}' at {uri}; "
              f"dashboards: mlflow ui --backend-store-uri {uri}")
    return {"FINISHED": 0, "KILLED": 130}.get(result.status, 1)


def _remove_if_empty(output_dir: Path) -> None:
    """Drop an output folder that holds only Hydra's own bookkeeping (nothing half-written stays)."""
    output_dir = Path(output_dir)
    if output_dir.is_dir() and all(p.name in (".hydra", "cli.log", "__main__.log") for p in output_dir.iterdir()):
        shutil.rmtree(output_dir, ignore_errors=True)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    if cfg.get("sweep") is not None:
        from smet_lab.sweep import run_sweep

        code = run_sweep(cfg, output_dir, method_composer(list(hydra_cfg.overrides.task)))
    else:
        code = run_single(cfg, output_dir)
    if code:
        sys.exit(code)


class StopRequest:
    """Ctrl-C or SIGTERM asks the run to stop at the next step boundary (never in the middle of a
    database write, which could leave the MLflow store locked or a run RUNNING); a second signal
    stops at once."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("smet_lab: stopping after this step (signal again to stop at once)", file=sys.stderr)

    def is_set(self) -> bool:
        return self.requested


STOP = StopRequest()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGINT, STOP)
    signal.signal(signal.SIGTERM, STOP)
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    overrides, hydra_alone, cfg_only = split_args(argv)
    if not hydra_alone:
        try:
            preflight(overrides, compose_only=cfg_only)
        except BadInput as exc:
            fail(str(exc))
    sys.argv = [sys.argv[0], *argv]
    try:
        hydra_main()
    except KeyboardInterrupt:
        print("smet_lab: interrupted (the MLflow run is marked KILLED)", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
