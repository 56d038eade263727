"""Command-line checks before any work: every problem becomes one line (key, value, what is allowed,
a "did you mean" where it helps). Imports no torch, Ray or MLflow.

    split_args(argv)            -> overrides, whether Hydra answers alone, whether only the config is asked
    multirun_overrides(ov)      -> the overrides of `-m a=1,2 b=x,y` as the equivalent `+sweep=grid ...`
    ignored_setting(ov, cfgs)   -> a command-line value that no run would read (e.g. data.path with data=pysource)

Unknown keys and Hydra's own errors are smet_lab/keys.py's.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from smet_lab.config import ConfigError, did_you_mean

CONF_DIR = Path(__file__).resolve().parent / "conf"  # package data: found from any install

# Hydra flags that take a value (their value is not an override).
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                     "--config-dir", "-cd", "--experimental-rerun"}
_FLAGS_THAT_SKIP = {"--hydra-help", "--version", "--info", "-i", "--shell-completion", "-sc"}
MULTIRUN_FLAGS = ("-m", "--multirun")
_OTHER_FLAGS = {"--help", "-h", "--resolve", "--run", "-r", "--plan"}
_DOCUMENTED_FLAGS = ("--plan", "--multirun", "--help", "--cfg", "--hydra-help")  # what a near miss is matched to
# Free-form parts of the config: their keys are checked where they are read (sweep grid expansion).
FREE_FORM = ("sweep.params", "sweep.extra_trials")


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


def unknown_flag(argv: list[str]) -> str | None:
    """One line for a command-line flag neither smet_lab nor Hydra knows (Hydra's own answer is its
    usage text and an error line), or None."""
    alone = _FLAGS_THAT_SKIP | set(MULTIRUN_FLAGS) | _OTHER_FLAGS
    for i, arg in enumerate(argv):
        flag = arg.split("=", 1)[0]
        if flag in ("--cfg", "-c"):  # Hydra's answer to another value is its usage text
            value = arg.split("=", 1)[1] if "=" in arg else argv[i + 1] if i + 1 < len(argv) else ""
            if value not in ("job", "hydra", "all"):
                return f"{flag} {value or '(nothing)'} is not an option: {flag} takes job, hydra or all" + \
                    did_you_mean(value, ("job", "hydra", "all"))
        if not arg.startswith("-") or flag in _FLAGS_WITH_VALUE or arg in alone:
            continue
        if flag in alone:
            return f"{arg} is not an option: {flag} takes no value"
        hint = "; did you mean --plan?" if "dry" in flag else did_you_mean(flag, _DOCUMENTED_FLAGS)
        return (f"{arg} is not an option{hint} (smet_lab's: --plan, -m, --help; Hydra's: --cfg job, --hydra-help; "
                "a setting is KEY=VALUE without dashes)")
    return None


def group_options(group: str) -> list[str]:
    if group == "method":  # the presets are Python data (smet_lab/methods.py), not YAML files
        from smet_lab.methods import METHODS

        return sorted(METHODS)
    files = sorted((CONF_DIR / group).glob("*.yaml"))
    if group == "model":  # by size, as a reader scans them: tiny, small, llama_9m, ..., llama_7b
        from omegaconf import OmegaConf

        def size(path):
            m = OmegaConf.load(path)
            return m.n_layers * (4 * m.dim**2 + 3 * m.dim * m.ffn_dim), m.seq_len

        files.sort(key=size)
    return [p.stem for p in files]


OPTIONAL_GROUPS = ("experiment", "sweep")  # chosen by none of the defaults


def own_config_dirs(overrides: list[str]) -> list[Path]:
    """The folders of `hydra.searchpath=[file://DIR,...]`: the user's own config files (pkg:// ones are not read)."""
    value = next((override_value(o) for o in overrides if override_key(o) == "hydra.searchpath"), "")
    entries = [e.strip(" '\"") for e in value.strip("[]").split(",")]
    return [Path(e.removeprefix("file://")) for e in entries if e.startswith("file://")]


def config_groups() -> list[str]:
    return sorted({p.name for p in CONF_DIR.iterdir() if p.is_dir()} | {"method"})


def trial_groups() -> list[str]:
    """The groups a sweep's trials may differ in (a grid axis `sweep.params.model=[tiny,small]`); tracking,
    ray and sweep are the sweep's own."""
    return [g for g in config_groups() if g not in ("tracking", "ray", "sweep")]


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def override_value(override: str) -> str | None:
    return override.split("=", 1)[1] if "=" in override else None


def quote(value: str) -> str:
    """A string as a Hydra override value (quoted unless plainly safe)."""
    return value if re.fullmatch(r"[\w./-]+", value) else "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


# ------------------------------------------------------------------------------------ multirun
def multirun_overrides(overrides: list[str]) -> list[str]:
    """`-m sparsity.density=0.1,0.25 method=smet,naive_dst` as the sweep it means: `+sweep=grid` (unless a
    sweep is named), one `+sweep.params.KEY=[...]` axis per swept key (train.seed feeds sweep.seeds) and a
    sweep name made of the swept keys. Nothing swept: the overrides as they are (a single run)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise ConfigError("-m", " ".join(overrides), str(exc).splitlines()[0]) from None
    swept = [(o, raw) for o, raw in zip(parsed, overrides) if o.is_sweep_override()]
    if not swept:
        return list(overrides)
    driver = set(config_groups()) - set(trial_groups())
    axes, names, rest = [], [], [raw for o, raw in zip(parsed, overrides) if not o.is_sweep_override()]
    for o, raw in swept:
        key, text = o.key_or_group, override_value(raw)
        if not isinstance(o.value(), ChoiceSweep):
            raise ConfigError(key, text, "a multirun sweeps comma-separated values (KEY=A,B,C); "
                                         "range(), interval() and glob() are not supported")
        if key in driver:
            raise ConfigError(key, text, f"a multirun sweeps what trials train with; {key} is the sweep's own "
                                         f"setting: run one sweep per {key}")
        values = f"[{text}]"
        axes.append(f"sweep.seeds={values}" if key == "train.seed" else f"+sweep.params.{key}={values}")
        names.append(key.rsplit(".", 1)[-1])
    has_sweep = any(override_key(r) == "sweep" for r in rest)
    has_name = any(override_key(r) == "sweep.name" for r in rest)
    head = ([] if has_sweep else ["+sweep=grid"]) + ([] if has_name else [f"sweep.name=multirun-{'-'.join(names)}"])
    return head + rest + axes


def extension_entries(overrides: list[str]) -> tuple[str | None, list[str]]:
    """The `extensions=[...]` override and its entries (None, [] when absent)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    found = next((o for o in overrides if override_key(o) == "extensions" and "=" in o), None)
    if found is None:
        return None, []
    try:
        value = OverridesParser.create().parse_overrides([found])[0].value()
    except HydraException as exc:
        raise ConfigError("extensions", override_value(found), str(exc).splitlines()[0]) from None
    entries = value if isinstance(value, list) else [value]
    if not all(isinstance(e, str) and e for e in entries):
        raise ConfigError("extensions", override_value(found), "a list of module names or .py paths")
    return found, entries


# ---------------------------------------------------------------------------- ignored settings
def _get(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _static(c):
    return _get(c, "sparsity.update_every") == 0 and f"sparsity.update_every=0 (method={c['method']}: a fixed topology)"


def _untracked(c):
    return not _get(c, "tracking.enabled") and "tracking.enabled=false (tracking=none)"


def _dense(c):
    return _get(c, "sparsity.density") == 1.0 and f"sparsity.density=1.0 (method={c['method']}: every weight trains)"


# (key prefix, why a config ignores it, or a falsy value where it reads it). Keys read only by some options.
IGNORED_WHEN = [
    ("data.path", lambda c: _get(c, "data.name") not in ("text_files", "c4")
     and f"data={_get(c, 'data.name')} (read only by data=text_files or data=c4)"),
    ("model.vocab_size", lambda c: "the tokenizer's vocabulary (data.tokenizer) sets it"),
    ("optim.lr_scaling.power", lambda c: _get(c, "optim.lr_scaling.rule") != "power"
     and f"optim.lr_scaling.rule={_get(c, 'optim.lr_scaling.rule')} (read only with optim.lr_scaling.rule=power)"),
    ("optim.lr_scaling.scope", lambda c: _get(c, "optim.lr_scaling.rule") == "none"
     and f"optim.lr_scaling.rule=none (method={c['method']})"),
    ("optim.min_lr_ratio", lambda c: _get(c, "optim.schedule") == "constant" and "optim.schedule=constant"),
    ("optim.regrow.warmup_kind", lambda c: _static(c) or (_get(c, "optim.regrow.warmup_steps") == 0
     and f"optim.regrow.warmup_steps=0 (method={c['method']})")),
    ("optim.regrow.", _static),
    ("sparsity.prune", _static),
    ("sparsity.growth", _static),
    ("sparsity.distribution", _dense),
    ("sparsity.block_size", _dense),
    ("sparsity.dense_patterns", _dense),
    ("sparsity.weights", _dense),
    ("tracking.uri", _untracked),
    ("tracking.experiment", _untracked),
    ("tracking.tags.", _untracked),
    ("train.dist_backend", lambda c: int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1
     and _get(c, "ray.workers_per_trial") <= 1
     and "one process (read only under torchrun or with ray.workers_per_trial > 1)"),
    ("ray.num_cpus", lambda c: _get(c, "ray.address") != "local" and "ray.address is a cluster (it owns its CPUs)"),
    ("ray.autoscaling", lambda c: _get(c, "ray.address") == "local" and "ray.address=local (a Ray of this machine)"),
]
SWEEP_ONLY = ("ray.",)
SWEEP_FOLDER = "a sweep writes into sweeps/<sweep.name>, or <ray.storage>/<sweep.name> with ray.storage=DIR"


def overridden_by_grid(overrides: list[str], trials: list) -> str | None:
    """One line for a value typed on the command line that every trial of a sweep sets itself (a grid
    axis, the seeds: the trial's value wins, so the typed one would be silently ignored), or None."""
    for override in overrides:
        key, value = override_key(override), override_value(override)
        if value is None or override.startswith("~") or key.startswith(("sweep.", "hydra.")):
            continue
        if trials and all(key in t.values for t in trials):
            values = ", ".join(map(str, dict.fromkeys(t.values[key] for t in trials)))
            axis = "sweep.seeds" if key == "train.seed" else f"sweep.params.{key}"
            return (f"{key}={value} is not allowed: every trial of this sweep sets {key} itself ({values}); to run "
                    f"{value} instead, give it as {axis}=[{value}]")
    return None


def ignored_setting(overrides: list[str], configs: list[dict], is_sweep: bool) -> str | None:
    """One line for a value typed on the command line that no run would read, or None. `configs` are
    the runs' full configs (one for a single run, every trial's for a sweep: ignored by all of them)."""
    for override in overrides:
        key, value = override_key(override), override_value(override)
        if value is None or override.startswith("~") or "=" not in override:
            continue
        if not is_sweep and key.startswith(SWEEP_ONLY):
            return f"{key}={value} is not allowed: ray.* keys are read only by sweeps (+sweep=NAME or -m)"
        if is_sweep and key.startswith("hydra.run."):  # a single run's folder
            return f"{key}={value} is not allowed: ignored by a sweep: {SWEEP_FOLDER}"
        for prefix, why in IGNORED_WHEN:
            if key == prefix or (prefix.endswith(".") and key.startswith(prefix)) or key.startswith(prefix + "_"):
                reasons = [why(c) for c in configs]
                if reasons and all(reasons):
                    return f"{key}={value} is not allowed: ignored with {reasons[0]}"
    return None
