"""Which config keys exist, and a bad key, value or Hydra setting as one line: key, value, what is
allowed, a "did you mean" where it helps. Imports no torch, Ray or MLflow.

    unknown_key(container, ov)  -> the first key of a composed config that the schema does not know
    hydra_setting(ov)           -> a Hydra setting that smet_lab does not read (its launcher, sweeper, ...)
    null_group(ov)              -> GROUP=null, which Hydra answers with a traceback
    explain_hydra_error(e, ov)  -> Hydra's multi-line composition error as one line
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from smet_lab.config import dataclass_type, did_you_mean
from smet_lab.preflight import (FREE_FORM, OPTIONAL_GROUPS, SWEEP_FOLDER, config_groups, group_options, override_key,
                                override_value, own_config_dirs)


def _fields(cls) -> dict[str, Any]:
    """{name: the field's dataclass type, or None for a leaf}."""
    return {f.name: dataclass_type(f) for f in dataclasses.fields(cls)}


def _schema_node(section: str | None):
    """The dataclass of a dotted section (None = the whole config; `hydra...` = Hydra's own settings),
    or None if it has none."""
    from hydra.conf import HydraConf

    from smet_lab.grid import SweepConfig
    from smet_lab.schema import AppConfig

    cls, parts = AppConfig, section.split(".") if section else []
    if parts[:1] == ["hydra"]:
        cls, parts = HydraConf, parts[1:]
    for part in parts:
        sub = _fields(cls).get(part) if cls else None
        cls = SweepConfig if (cls is AppConfig and part == "sweep") else sub
    return cls


def _mapping(key: str) -> bool:
    """Whether KEY is a free-form mapping (tracking.tags, hydra.job.env_set): a new key in it takes a plus."""
    section, _, name = key.rpartition(".")
    node = _schema_node(section or None)
    field = next((f for f in dataclasses.fields(node) if f.name == name), None) if node else None
    return field is not None and "dict" in str(field.type).lower()


def all_keys(root: str | None = None) -> list[str]:
    """Every dotted key of the schema, or of its section `root` (sections and leaves)."""
    out = []

    def walk(section: str | None):
        for name, sub in _fields(_schema_node(section)).items():
            key = f"{section}.{name}" if section else name
            out.append(key)
            if sub is not None or key == "sweep":
                walk(key)

    walk(root)
    return out


def unknown_key_message(key: str, value) -> str:
    section = key.rsplit(".", 1)[0] if "." in key else None
    node = _schema_node(section)
    known = ", ".join(_fields(node)) if node else "none"
    if section is None and key in config_groups():  # `sweep=smoke`: an optional group needs its plus
        return f"{key}={value} is not allowed: {key} is an optional config group; add it with a plus: +{key}={value}"
    if "/" in key:  # GROUP/SUB=x: a config group path that does not exist
        groups = [*config_groups(), "hydra/job_logging", "hydra/hydra_logging"]
        return (f"{key}={value} is not allowed: no such config group{did_you_mean(key, groups)}; "
                f"the groups are {', '.join(groups)}")
    if section and _mapping(section):
        return f"{key}={value} is not allowed: a new key of {section} takes a plus: +{key}={value}"
    hint = did_you_mean(key, all_keys("hydra" if key.startswith("hydra.") else None))
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
    missing = re.search(r"Could not find '([\w/-]+)/([^'/]+)'", text)
    if missing:
        group, option = missing.groups()
        own = own_config_dirs(overrides)
        listed = re.search(r"Available options in '[^']+':\n((?:\t.*\n?)*)", text)  # Hydra's own groups
        options = group_options(group) if not group.startswith("hydra/") else listed.group(1).split() if listed else []
        options += sorted({p.stem for d in own for p in (d / group).glob("*.yaml")} - set(options))
        hint = did_you_mean(option, options)
        if not hint and own:
            hint = f"; not in {', '.join(str(d / group) for d in own)} either"
        elif not hint and group in OPTIONAL_GROUPS:
            hint = f"; your own {group} is a file conf/{group}/{option}.yaml added with hydra.searchpath=[file://conf]"
        return f"{group}={option} is not allowed: one of {', '.join(options)}{hint}"
    twice = re.search(r"Multiple values for ([\w/-]+)|([\w/-]+) appears more than once in the final defaults", text)
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


# ---------------------------------------------------------------------------- Hydra's own settings
_RAY_RUNS_IT = "smet_lab runs a -m multirun as a Ray Tune sweep (+sweep=grid), and ray.* says where its trials run"
# Hydra settings smet_lab does not read (each with the keys and options below it), and what does their job.
HYDRA_UNREAD = {
    "hydra/launcher": _RAY_RUNS_IT,
    "hydra/sweeper": _RAY_RUNS_IT,
    "hydra.launcher": _RAY_RUNS_IT,
    "hydra.sweeper": _RAY_RUNS_IT,
    "hydra.mode": "-m (or --multirun) runs the values of KEY=A,B as a Ray Tune sweep",
    "hydra.sweep": f"not read: {SWEEP_FOLDER}",
    "hydra.job.chdir": "only false: smet_lab stays in the folder it is started from, where relative paths are read "
                       "(tracking.uri=sqlite:///mlflow.db, data.path, ...); hydra.run.dir is the run's folder",
}


def hydra_setting(overrides: list[str]) -> str | None:
    """One line for a Hydra setting on the command line that smet_lab does not read (Hydra would accept
    it and nothing would change, or fail with a traceback: `hydra.sweeper.params.x=1`), or None."""
    for override in overrides:
        key, value = override_key(override), override_value(override)
        if key == "hydra.job.chdir" and str(value).lower() == "false":
            continue
        for unread, why in HYDRA_UNREAD.items():
            if key == unread or key.startswith((unread + ".", unread + "/")):
                typed = override.lstrip("+") if value is None else f"{key}={value}"
                return f"{typed} is not allowed: {why}"
    return None
