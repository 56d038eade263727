"""Configs from command-line overrides, through Hydra's compose API: the run's config, its output folder,
and a sweep trial's config composed with its config-group choices (`method=smet`, `model=small`).
The CLI, the sweep runner and the tests share these."""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from smet_lab import schema
from smet_lab.config import ConfigError, RunConfig, anchor_config, anchored, run_config_from
from smet_lab.keys import explain_hydra_error
from smet_lab.preflight import CONF_DIR, override_key, override_value, quote, trial_groups

schema.register()


def compose(overrides: list[str], with_hydra: bool = False) -> DictConfig:
    """The composed config for these overrides (tests use this too), with Hydra's own settings under
    `hydra` if asked; works inside a running Hydra app (a sweep composes one base config per trial's
    group choices) and outside it."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=with_hydra)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=with_hydra)


def given_run_dir(overrides: list[str]) -> str | None:
    """hydra.run.dir as typed on the command line, or None."""
    return next((override_value(o) for o in overrides if override_key(o) == "hydra.run.dir"), None)


def default_run_dir(overrides: list[str]) -> str:
    """Hydra's dated output folder for these overrides (conf/config.yaml, hydra.run.dir)."""
    return compose(overrides, with_hydra=True).hydra.run.dir


def resume_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """A resumed run's overrides: those of the command that started it (Hydra records them in the run's
    folder, .hydra/), then the ones typed now, each replacing a recorded one of its key or below it
    (`model=small` replaces a recorded `model.n_layers=4`). Returns (all, the recorded ones kept); a
    checkpoint outside a run folder (a sweep trial's, an API run's) has none recorded."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    given = next((override_value(o) for o in overrides if override_key(o) == "train.resume_from"), None)
    if not given or any(override_key(o) == "sweep" for o in overrides):
        return overrides, []
    path = Path(given.strip("'\"")).expanduser().absolute()
    run = next((d / ".hydra" for d in (path, *path.parents[:3]) if (d / ".hydra" / "overrides.yaml").is_file()), None)
    if run is None:
        return overrides, []
    recorded = [str(o) for o in OmegaConf.load(run / "overrides.yaml")]
    if (run / "hydra.yaml").is_file():  # a user's own config folder (hydra.searchpath) is a hydra override
        hydra_cfg = OmegaConf.load(run / "hydra.yaml").hydra
        recorded += [str(o) for o in hydra_cfg.overrides.hydra if override_key(o) == "hydra.searchpath"]
        started_in = Path(OmegaConf.select(hydra_cfg, "runtime.cwd") or Path.cwd())
        if started_in != Path.cwd():  # its relative paths, the default MLflow database's too, are read from there
            recorded = [_anchored_override(o, started_in) for o in recorded]
            try:
                tracking = compose(recorded).tracking
            except (HydraException, OmegaConfBaseException):  # the preflight says what is wrong with them
                tracking = None
            if tracking and tracking.enabled and not any(override_key(o) == "tracking.uri" for o in recorded):
                recorded.append(f"tracking.uri={quote(anchored('tracking.uri', tracking.uri, started_in))}")
    typed = {override_key(o) for o in overrides}
    kept = [o for o in recorded if not any(override_key(o) == k or override_key(o).startswith(k + ".") for k in typed)]
    return kept + overrides, kept


def _anchored_override(override: str, cwd: Path) -> str:
    """A recorded `KEY=VALUE` with a relative path in it made absolute against `cwd` (config.PATH_KEYS and
    the file:// folders of hydra.searchpath)."""
    key, value = override_key(override), override_value(override)
    if value is None:
        return override
    head = override.split("=", 1)[0]
    if key == "hydra.searchpath":
        return f"{head}=" + re.sub(r"file://(?![/~])([^,\]'\"]+)", lambda m: f"file://{cwd / m.group(1)}", value)
    bare = value.strip("'\"")
    new = anchored(key, bare, cwd)
    return override if new == bare else f"{head}={quote(new)}"


def group_composer(overrides: list[str]):
    """compose_for(choices): the config as if a trial's config-group choices ({"method": "smet", "model":
    "small"}: its grid keys without a dot) had been typed with the other overrides, which they replace."""
    from hydra.errors import HydraException

    def compose_for(choices: dict) -> dict:
        for group, option in choices.items():
            if group not in trial_groups():
                raise ConfigError(f"sweep.params.{group}", option, "a config group trials may differ in (one of "
                                  f"{', '.join(trial_groups())}) or a key inside one, e.g. sweep.params.optim.lr")
        typed = [f"{group}={option}" for group, option in choices.items()]
        try:
            cfg = compose([o for o in overrides if override_key(o) not in choices] + typed)
        except HydraException as exc:  # (an option that is not there: "GROUP=OPTION is not allowed: ...")
            head, _, allowed = explain_hydra_error(exc, overrides + typed).partition(" is not allowed: ")
            group, _, option = head.partition("=")
            if group not in choices or not allowed:
                raise ConfigError("sweep.params", " ".join(typed), f"composable ({head}{allowed})") from None
            raise ConfigError(f"sweep.params.{group}", option, allowed) from None
        return OmegaConf.to_container(cfg, resolve=True)

    return compose_for


def run_container(cfg: DictConfig) -> dict:
    """A run's full config as a dict, its paths anchored at the working folder (config.PATH_KEYS): what it
    records (config.yaml, MLflow params, checkpoints), the same files whoever reads them, from anywhere."""
    return anchor_config(OmegaConf.to_container(cfg, resolve=True), Path.cwd())


def to_run_config(cfg: DictConfig | dict) -> RunConfig:
    return run_config_from(OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg))
