"""Command-line checks before any work: every problem becomes one line (key, value, what is allowed,
a "did you mean" where it helps). Imports no torch, Ray or MLflow.

    split_args(argv)            -> overrides, whether Hydra answers alone, whether only the config is asked
    multirun_overrides(ov)      -> the overrides of `-m a=1,2 b=x,y` as the equivalent `+sweep=grid ...`
    explain_hydra_error(e, ov)  -> Hydra's multi-line composition error as one line
    unknown_key(container)      -> the first key of a composed config that the schema does not know
    ignored_setting(ov, cfgs)   -> a command-line value that no run would read (e.g. data.path with data=pysource)
    help_text()                 -> `python -m smet_lab --help` (the main commands and every config group's options)
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

from smet_lab.config import ConfigError, dataclass_type, did_you_mean

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
    for arg in argv:
        flag = arg.split("=", 1)[0]
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


# ------------------------------------------------------------------------------- schema keys
def _fields(cls) -> dict[str, Any]:
    """{name: the field's dataclass type, or None for a leaf}."""
    return {f.name: dataclass_type(f) for f in dataclasses.fields(cls)}


def _schema_node(section: str | None):
    """The dataclass of a dotted section (None = the whole config), or None if it has none."""
    from smet_lab.grid import SweepConfig
    from smet_lab.schema import AppConfig

    cls = AppConfig
    for part in (section.split(".") if section else []):
        sub = _fields(cls).get(part) if cls else None
        cls = SweepConfig if (cls is AppConfig and part == "sweep") else sub
    return cls


def all_keys() -> list[str]:
    """Every dotted key of the schema (sections and leaves)."""
    out = []

    def walk(section: str | None):
        for name, sub in _fields(_schema_node(section)).items():
            key = f"{section}.{name}" if section else name
            out.append(key)
            if sub is not None or key == "sweep":
                walk(key)

    walk(None)
    return out


def unknown_key_message(key: str, value) -> str:
    section = key.rsplit(".", 1)[0] if "." in key else None
    node = _schema_node(section)
    known = ", ".join(_fields(node)) if node else "none"
    if section is None and key in config_groups():  # `sweep=smoke`: an optional group needs its plus
        return f"{key}={value} is not allowed: {key} is an optional config group; add it with a plus: +{key}={value}"
    hint = did_you_mean(key, all_keys())
    return f"{key}={value} is not allowed: unknown key{hint}; known keys of {section or 'the config'}: {known}"


def unknown_key(container: dict, overrides: list[str]) -> str | None:
    """One line for the first key of the composed config that the schema does not know, or None."""

    def walk(node: dict, section: str | None):
        cls = _schema_node(section)
        known = _fields(cls) if cls else {}
        for name, value in node.items():
            key = f"{section}.{name}" if section else name
            if name not in known:
                typed = next((override_value(o) for o in overrides if override_key(o) == key), value)
                return unknown_key_message(key, typed)
            if isinstance(value, dict) and key not in FREE_FORM and (known[name] is not None or key == "sweep"):
                found = walk(value, key)
                if found:
                    return found
        return None

    return walk(container, None)


def null_group(overrides: list[str]) -> str | None:
    """One line for GROUP=null (Hydra raises a bare ValueError with a traceback for it), or None."""
    for o in overrides:
        key, value = override_key(o), override_value(o)
        if value is not None and value.lower() == "null" and key in config_groups():
            typed = o.split("=", 1)[0]
            return (f"{typed}=null is not allowed: one of {', '.join(group_options(key))} "
                    f"(leave {typed}= out for {'none' if key in OPTIONAL_GROUPS else 'the default'})")
    return None


def explain_hydra_error(exc: Exception, overrides: list[str]) -> str:
    """Hydra's multi-line composition errors as one line: key, value, what is allowed."""
    text = str(exc) + ("\n" + str(exc.__cause__) if exc.__cause__ else "")
    missing = re.search(r"Could not find '([\w-]+)/([^']+)'", text)
    if missing:
        group, option = missing.groups()
        own = own_config_dirs(overrides)
        options = group_options(group)
        options += sorted({p.stem for d in own for p in (d / group).glob("*.yaml")} - set(options))
        hint = did_you_mean(option, options)
        if not hint and own:
            hint = f"; not in {', '.join(str(d / group) for d in own)} either"
        elif not hint and group in OPTIONAL_GROUPS:
            hint = f"; your own {group} is a file conf/{group}/{option}.yaml added with hydra.searchpath=[file://conf]"
        return f"{group}={option} is not allowed: one of {', '.join(options)}{hint}"
    twice = re.search(r"Multiple values for ([\w-]+)|([\w-]+) appears more than once in the final defaults", text)
    if twice:  # `+experiment=x`: the group is in the defaults list already, so a plus would add it twice
        group = twice.group(1) or twice.group(2)
        option = next((override_value(o) for o in overrides if override_key(o) == group), "NAME")
        return (f"+{group}={option} is not allowed: {group} is in the defaults list; "
                f"choose it without the plus: {group}={option}")
    override = re.search(r"Could not override '([^']+)'", text)
    key_error = re.search(r"Key '([^']+)' not in '(\w+)'", text)
    if override or key_error:
        key = override.group(1) if override else key_error.group(1)
        full = next((override_key(o) for o in overrides if override_key(o).endswith(key)), key)
        value = next((override_value(o) for o in overrides if override_key(o) == full), None)
        if full.startswith("sweep.params."):
            return (f"{full}={value} is not allowed: not an axis of this sweep; add an axis with "
                    f"+{full}=[...] (the key must be a config key, e.g. +sweep.params.optim.lr=[0.001,0.002])")
        if full.startswith("tracking.tags."):
            return f"{full}={value} is not allowed: a new tag takes a plus: +{full}={value}"
        return unknown_key_message(full, value)
    required = re.search(r"field '([\w.]+)' is not Optional", text)
    if required:  # KEY=null on a key that needs a value
        key = required.group(1)
        section, name = key.rsplit(".", 1) if "." in key else (None, key)
        node = _schema_node(section)
        kind = next((f.type for f in dataclasses.fields(node) if f.name == name), None) if node else None
        kind = kind if isinstance(kind, str) or kind is None else getattr(kind, "__name__", str(kind))
        return f"{key}=null is not allowed: a value{f' of type {kind}' if kind else ''} is required, not null"
    typed = re.search(r"Value '([^']*)' (?:of type '\w+' )?could not be converted to (\w+)", text)
    full_key = re.search(r"full_key: ([\w.]+)", text)
    if typed and full_key:
        return f"{full_key.group(1)}={typed.group(1)} is not allowed: must be of type {typed.group(2)}"
    invalid = re.search(r"Value '([^']*)' is not a valid (\w+)", text)
    if invalid and full_key:
        kind = invalid.group(2)
        return (f"{full_key.group(1)}={invalid.group(1)} is not allowed: must be a {kind}"
                + (": true or false" if kind == "bool" else ""))
    nested = re.search(r"Cannot convert '(\w+)' to (\w+)", text)
    if nested and full_key:  # +tracking.tags.a.b=1: a dot nests keys, and a tag's value must be a string
        key = full_key.group(1)
        typed_key = next((override_key(o) for o in overrides if override_key(o).startswith(key + ".")), key)
        value = next((override_value(o) for o in overrides if override_key(o) == typed_key), None)
        return (f"{typed_key}={value} is not allowed: {key} must be a {nested.group(2)}, not a {nested.group(1)} "
                "(a dot in a key nests it)")
    if "Ambiguous value for argument" in text:
        key = re.search(r"argument '([^'=]+)", text)
        return (f"{key.group(1) if key else 'a value'}: a comma-separated list sweeps values only in a multirun: "
                f"add -m (python -m smet_lab -m KEY=A,B), or quote it for a single value")
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


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
        for prefix, why in IGNORED_WHEN:
            if key == prefix or (prefix.endswith(".") and key.startswith(prefix)) or key.startswith(prefix + "_"):
                reasons = [why(c) for c in configs]
                if reasons and all(reasons):
                    return f"{key}={value} is not allowed: ignored with {reasons[0]}"
    return None
