"""Your own rules without forking: a decorator makes a function a config option everywhere
(validation, the command line, sweeps, reports).

    # my_rules.py, anywhere:  python -m smet_lab extensions=[my_rules] sparsity.growth=lowest_free
    import torch
    from smet_lab.extend import register_growth

    @register_growth("lowest_free")
    def lowest_free(ctx):                       # ctx: smet_lab.sparse.criteria.GrowthContext
        taken = torch.cat([ctx.active, ctx.excluded])
        free = torch.ones(ctx.n_blocks, dtype=torch.bool)
        free[taken] = False
        return free.nonzero().flatten()[:ctx.n]  # ctx.n distinct ids, inactive, not excluded

`register_metric(name, label, definition=..., compute=fn)` adds a run-level metric (`fn(history_rows) ->
float`, logged at the end of every run, shown in the report's tables and glossary).

Registering a name that exists is an error unless `replace=True`. Extensions load from the top-level
config key `extensions` (module names or .py paths; sweeps load them in every Ray trial too) and from
installed packages' entry points in the group `smet_lab.extensions`.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import math
import sys
from pathlib import Path
from typing import Callable

from smet_lab.config import ConfigError, RuleError, RunConfig, did_you_mean
from smet_lab.metrics import DEFAULT_FMT, METRICS, Metric

ENTRY_POINT_GROUP = "smet_lab.extensions"


class RegistrationError(ValueError):
    """A register_* call that cannot work: a taken name, a function that cannot take its arguments."""


def _register(table: dict, kind: str, name: str, value, replace: bool):
    if not isinstance(name, str) or not name:
        raise RegistrationError(f"a {kind} needs a non-empty name, got {name!r}")
    if name in table and not replace:
        raise RegistrationError(f"{kind} {name!r} is already registered; pass replace=True to replace it")
    table[name] = value


def _check_signature(kind: str, name: str, fn, params: tuple[str, ...]) -> None:
    """A function that cannot be called as the contract calls it is refused when it registers (so the
    extension registering it is refused in one line before anything runs), not at its first call."""
    if not callable(fn):
        raise RegistrationError(f"{kind} {name!r} must be a function, got {type(fn).__name__}")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some built-ins have none: they are called as they are
        return
    try:
        signature.bind(*params)
    except TypeError:
        raise RegistrationError(f"{kind} {name!r}: {getattr(fn, '__name__', 'it')}{signature} must take "
                                f"({', '.join(params)})") from None


def _number(out, allowed: str, ok) -> float:
    """out as a float when it is a real number that `ok` accepts, else a RuleError saying `allowed`."""
    try:
        value = None if isinstance(out, (str, bytes, bool)) else float(out)
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several numbers
        value = None
    if value is None or not ok(value):
        raise RuleError(f"returned {_short(out)}; it must return {allowed}")
    return value


def _short(out) -> str:
    text = repr(out)
    return text if len(text) <= 80 else text[:77] + "..."


def _called(label: str, fn, check):
    """fn, with an exception inside it or a result that `check(out, *args)` refuses turned into one
    RuleError line naming the rule as a config value (e.g. optim.lr_scaling.rule=half)."""
    @functools.wraps(fn)
    def call(*args):
        try:
            out = fn(*args)
        except Exception as exc:  # noqa: BLE001 - the user's code: one line with where it raised
            raise RuleError.raised(label, exc, fn) from exc
        try:
            return check(out, *args)
        except RuleError as exc:
            raise RuleError(f"{label} {exc}") from None
    return call


def _decorator(table: dict, kind: str, name: str, replace: bool, params: tuple[str, ...],
               wrap=lambda fn: fn) -> Callable:
    def deco(fn):
        _check_signature(kind, name, fn, params)
        _register(table, kind, name, wrap(fn), replace)
        return fn
    return deco


# What a rule of each kind must return (checked on every call).
def _densities(out, shapes, density) -> list[float]:
    if isinstance(out, (str, bytes)) or not hasattr(out, "__len__") or len(out) != len(shapes):
        raise RuleError(f"returned {_short(out)}; it must return one density per sparse layer ({len(shapes)})")
    return [_number(d, "densities in (0, 1]", lambda v: 0 < v <= 1) for d in out]


def _prune_multiplier(out, progress) -> float:
    return _number(out, "a finite number >= 0 (a multiplier of sparsity.prune_rate)", lambda v: 0 <= v < math.inf)


def _lr_multiplier(out, density, power) -> float:
    return _number(out, "a finite number > 0 (the sparse layers' lr multiplier)", lambda v: 0 < v < math.inf)


def register_growth(name: str, needs_dense_grad: bool = False, replace: bool = False) -> Callable:
    """`fn(ctx: GrowthContext) -> int64 ids` (sparsity.growth=NAME). needs_dense_grad: the updater
    captures the dense weight gradient at update steps and passes it as ctx.dense_grad (RigL)."""
    from smet_lab.sparse.criteria import GROWTH, GrowthRule

    return _decorator(GROWTH, "growth rule", name, replace, ("ctx",), lambda fn: GrowthRule(fn, needs_dense_grad))


def register_prune(name: str, replace: bool = False) -> Callable:
    """`fn(ctx: PruneContext) -> int64 slots` (positions in ctx.active) to vacate (sparsity.prune=NAME)."""
    from smet_lab.sparse.criteria import PRUNE

    return _decorator(PRUNE, "prune rule", name, replace, ("ctx",))


def register_prune_schedule(name: str, replace: bool = False) -> Callable:
    """`fn(progress in [0, 1]) -> multiplier of sparsity.prune_rate` (sparsity.prune_schedule=NAME)."""
    from smet_lab.sparse.schedules import SCHEDULES

    return _decorator(SCHEDULES, "prune schedule", name, replace, ("progress",),
                      lambda fn: _called(f"sparsity.prune_schedule={name}", fn, _prune_multiplier))


def register_lr_scaling(name: str, replace: bool = False) -> Callable:
    """`fn(density, power) -> lr multiplier of the sparse layers` (optim.lr_scaling.rule=NAME)."""
    from smet_lab.optim.options import LR_SCALING

    return _decorator(LR_SCALING, "LR-scaling rule", name, replace, ("density", "power"),
                      lambda fn: _called(f"optim.lr_scaling.rule={name}", fn, _lr_multiplier))


def register_distribution(name: str, replace: bool = False) -> Callable:
    """`fn(shapes, density) -> one density per sparse layer` (sparsity.distribution=NAME)."""
    from smet_lab.sparse.topology import DISTRIBUTIONS

    return _decorator(DISTRIBUTIONS, "distribution", name, replace, ("shapes", "density"),
                      lambda fn: _called(f"sparsity.distribution={name}", fn, _densities))


def register_metric(name: str, label: str, fmt: str = DEFAULT_FMT, better: str = "lower", definition: str = "",
                    compute: Callable[[list], float] | None = None, replace: bool = False):
    """A run-level metric (smet_lab.metrics): a column of the report's tables and a glossary entry
    (`definition`, required). `compute(history_rows) -> float` (one dict per optimizer step, as in
    RunResult.history) makes the trainer log it under `name` at the end of every run, and the report
    recompute it for runs that logged no summary; without one, something else has to log it. better:
    lower | higher | none. Returns the Metric."""
    if compute is not None:
        _check_signature("metric", name, compute, ("history_rows",))
    try:
        metric = Metric(name, label, fmt, better, definition, from_history=compute is not None, compute=compute)
    except ValueError as exc:
        raise RegistrationError(str(exc)) from None
    _register(METRICS, "metric", name, metric, replace)
    return metric


def _dotted(prefix: str, value) -> dict:
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in _dotted(f"{prefix}.{key}", sub).items()}
    return {prefix: value}


def register_method(name: str, replace: bool = False, **preset_keys) -> dict:
    """A method preset as data: `register_method("smet_w50", optim={"regrow": {"warmup_steps": 50},
    "lr_scaling": {"rule": "inverse"}})` (nested, or dotted keys through **{...}); `method=NAME` then
    works on the command line and in sweeps like the built-in presets. Returns the dotted preset."""
    from smet_lab.methods import METHODS

    preset = {k: v for key, value in preset_keys.items() for k, v in _dotted(key, value).items()}
    for dotted in preset:
        node = RunConfig()
        for part in dotted.split("."):
            if not hasattr(node, part) or part == "method":
                raise RegistrationError(f"method {name!r}: {dotted} is not a config key")
            node = getattr(node, part)
    _register(METHODS, "method", name, preset, replace)
    return preset


# ------------------------------------------------------------------------------------- loading
def _import(entry: str):
    if entry.endswith(".py"):
        path = Path(entry).expanduser().resolve()
        name = path.stem
        if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
            return sys.modules[name]
        if not path.is_file():
            raise FileNotFoundError(f"no file {path}" + did_you_mean(str(path), map(str, path.parent.glob("*.py"))))
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        return module
    return importlib.import_module(entry)


def resolve(entry: str) -> str:
    """What a Ray worker (another working directory) can import: a .py path made absolute; a module
    found as a plain file outside site-packages becomes its path; an installed module stays a name."""
    if entry.endswith(".py"):
        return str(Path(entry).expanduser().resolve())
    spec = importlib.util.find_spec(entry)
    origin = getattr(spec, "origin", None) or ""
    if origin.endswith(".py") and "site-packages" not in origin and not origin.endswith("__init__.py"):
        return origin
    return entry


def load_extensions(entries=()) -> list[str]:
    """Import the extensions named in the config and those of installed packages' entry points;
    returns the entries resolved for other processes. ConfigError (one line) when one fails."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            importlib.import_module(ep.value.split(":")[0])
        except Exception as exc:  # noqa: BLE001 - a broken plug-in is one line, not a traceback
            raise ConfigError("extensions", f"entry point {ep.name}={ep.value}", f"it failed to import: "
                              f"{type(exc).__name__}: {exc}") from None
    resolved = []
    for entry in entries or ():
        try:
            _import(str(entry))
            resolved.append(resolve(str(entry)))
        except RegistrationError as exc:
            raise ConfigError("extensions", str(entry), f"it registers what cannot work: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - idem
            raise ConfigError("extensions", str(entry), f"it failed to import ({type(exc).__name__}: {exc}); give "
                              f"an importable module name or a .py file path") from None
    return resolved
