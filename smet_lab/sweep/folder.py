"""A sweep's folder, `<storage>/<name>/`, beside Tune's own state in `tune/`: what the sweep was
started with (grid.json, which a resume is checked against, and sweep.json), how each trial ended
(trial_status.json, in our words), the files our checkpoints carry (trial.json, summary.json) and the
lock a running driver holds. No Ray: the pre-flight, `--plan` and the report read these too."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import uuid
from pathlib import Path

from smet_lab.config import ConfigError
from smet_lab.grid import SweepConfig, Trial
from smet_lab.tracking.artifacts import SUMMARY_FILE

DEFAULT_STORAGE = "sweeps"  # where sweeps/<name>/ go without ray.storage or sweep.storage (in the working dir)
# Trial statuses in our words (MLflow's KILLED/FAILED/FINISHED + diverged) by trial key.
STATUS_FILE = "trial_status.json"
TRIALS_FILE = "trials.csv"  # one row per trial with its status and metrics, written at the sweep's end
SWEEP_FILE = "sweep.json"  # the sweep section, n_trials, extensions and the id of this start (sweep_tags)
# In every checkpoint a trial reports: {"trial": key, "step": N} (Tune's folder names cut long keys). The final
# one also holds SUMMARY_FILE (status, error, summary) beside the run's artifacts.
TRIAL_FILE = "trial.json"


# What a resumed sweep must share with the one it resumes: Tune restores the trials it stored, so a
# grid or training setting changed on the command line would silently not apply. (tracking and ray
# settings may change between sessions.)
GRID_FILE = "grid.json"
RESUME_SECTIONS = ("method", "model", "data", "sparsity", "optim", "train")


def trial_signatures(trials: list[Trial], configs: dict) -> dict:
    """{trial key: its training config (RESUME_SECTIONS), JSON-normalised}."""
    return json.loads(json.dumps({t.key: {k: configs[t.key][k] for k in RESUME_SECTIONS if k in configs[t.key]}
                                  for t in trials}))


def _first_difference(old, new, prefix: str = ""):
    """(dotted key, old value, new value) of the first difference between two nested dicts, or None."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            found = _first_difference(old.get(k), new.get(k), f"{prefix}{k}.")
            if found:
                return found
        return None
    return None if old == new else (prefix.rstrip("."), old, new)


def check_resume(sweep: SweepConfig, sweep_dir: Path, trials: list[Trial], configs: dict) -> None:
    """ConfigError when resuming would run a different sweep than the one asked for now."""
    path = sweep_dir / GRID_FILE
    if not sweep.resume or not path.is_file():
        return
    old, new = json.loads(path.read_text()), trial_signatures(trials, configs)
    fix = "add sweep.resume=false to start it afresh, or sweep.name=OTHER to keep both"
    if set(old) != set(new):
        extra = sorted(set(new) - set(old))
        detail = f"; e.g. {extra[0]} is new" if extra else f"; e.g. {sorted(set(old) - set(new))[0]} is gone"
        raise ConfigError("sweep", f"{len(new)} trials", f"resuming {sweep_dir} needs its grid of {len(old)} "
                          f"trials{detail}; {fix}")
    for key in new:
        found = _first_difference(old[key], new[key])
        if found:
            dotted, was, now = found
            raise ConfigError(dotted, now, f"resuming {sweep_dir} needs {was!r}, as its trials were started "
                              f"with (trial {key}); {fix}")


def check_distinct(trials: list[Trial], configs: dict) -> None:
    """ConfigError when two trials would train the same run: a setting applied after the grid's values
    made them equal, and the report would show the same run as two cells."""
    seen: dict[str, str] = {}
    for trial in trials:
        first = seen.setdefault(config_signature(configs[trial.key]), trial.key)
        if first != trial.key:
            why = ("method=dense trains every weight (density 1) whatever the other grid values: give it once, as "
                   "sweep.extra_trials=[{method:dense}]" if configs[first]["method"] == "dense" else
                   "a setting in the sweep file or on the command line overrides what tells them apart: drop one")
            raise ConfigError("sweep", f"{first} and {trial.key}", f"trials that differ; these two would train "
                              f"the same run ({why})")


def write_grid(sweep_dir: Path, trials: list[Trial], configs: dict, sweep_params: dict | None = None) -> None:
    """grid.json, and sweep.json (`sweep_params` with a new id): the sweep's start."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / GRID_FILE).write_text(json.dumps(trial_signatures(trials, configs), indent=1))
    if sweep_params is not None:
        (sweep_dir / SWEEP_FILE).write_text(json.dumps({**sweep_params, "id": uuid.uuid4().hex}, indent=1, default=str))


@contextlib.contextmanager
def sweep_lock(root: Path, name: str):
    """Held while a driver runs the sweep `name`: a second driver of it (the same command in another
    terminal) would resume it while it runs and train its trials twice into one folder. The lock
    file sits beside the sweep's folder, so `sweep.resume=false` can delete that folder; the OS
    releases the lock however the driver ends, and flock works across NFSv4 clients (a cluster)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise ConfigError("sweep.name", name, f"the name of a sweep that is not running already ({holder} is "
                              f"running {root / name}); wait for it to end, or give another sweep.name") from None
        lock.truncate(0)
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}")
        lock.flush()
        yield


def sweep_tags(sweep_dir) -> dict[str, str]:
    """The MLflow tags that find this sweep's parent run: its folder, and the id of this start (sweep.json):
    a sweep started afresh in the same folder (sweep.resume=false) gets new runs, a resumed one its own."""
    tags = {"smet.sweep_dir": str(sweep_dir)}
    sweep_id = (read_json(Path(sweep_dir) / SWEEP_FILE) or {}).get("id")
    if sweep_id:  # (folders from before the id: by the folder alone)
        tags["smet.sweep_id"] = str(sweep_id)
    return tags


def sweep_running(sweep_dir) -> bool:
    """Whether a driver holds the sweep's lock now (read without creating the lock file)."""
    lock_path = Path(sweep_dir).parent / f".{Path(sweep_dir).name}.lock"
    if not lock_path.is_file():
        return False
    with open(lock_path) as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(lock, fcntl.LOCK_UN)
        return False


def read_statuses(sweep_dir) -> dict:
    path = Path(sweep_dir) / STATUS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_statuses(sweep_dir, data: dict) -> None:
    path = Path(sweep_dir) / STATUS_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def record_status(sweep_dir: str, key: str, status: str, error: str | None) -> None:
    """A small file next to Tune's state: what each trial ended as, in our words (FINISHED,
    DIVERGED, FAILED), for the report and for resumed runs."""
    data = read_statuses(sweep_dir)
    data[key] = {"status": status, "error": error}
    _write_statuses(sweep_dir, data)


def forget_failed(sweep_dir: str) -> None:
    """Trials about to be retried have not ended: an interrupted retry then reads as interrupted."""
    _write_statuses(sweep_dir, {k: v for k, v in read_statuses(sweep_dir).items() if v["status"] != "FAILED"})


# ------------------------------------------------------------------------------ trials' checkpoints
CHECKPOINT_GLOBS = ("tune/*/checkpoint_*", "train/**/checkpoint_*")  # Tune's trials; Ray Train's runs


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # a file being written as we read: as if it were not there yet
        return None


def config_signature(config: dict) -> str:
    """A trial config's training sections as one string: equal for configs that train the same run."""
    return json.dumps({k: config[k] for k in RESUME_SECTIONS if k in config}, sort_keys=True, default=str)


def _trial_of(checkpoint: Path, by_signature: dict) -> tuple[str | None, int]:
    """(the trial a checkpoint belongs to, its step): its trial.json, else (a checkpoint written before
    trial.json existed; its step unknown, Tune's zero-padded folder names then order them) the grid
    trial whose config it holds: config.yaml in a final checkpoint, config.json in a training one."""
    import yaml

    named = read_json(checkpoint / TRIAL_FILE)
    if isinstance(named, dict) and named.get("trial"):
        return named["trial"], int(named.get("step", -1))
    for name, parse in (("config.yaml", yaml.safe_load), ("config.json", json.loads)):
        try:
            config = parse((checkpoint / name).read_text())
        except (OSError, ValueError, yaml.YAMLError):
            continue
        if isinstance(config, dict):
            return by_signature.get(config_signature(config)), -1
    return None, -1


def trial_checkpoints(sweep_dir) -> dict[str, list[Path]]:
    """{trial key: its checkpoints by step, oldest first; a final one (with summary.json) last}."""
    sweep_dir = Path(sweep_dir)
    grid = read_json(sweep_dir / GRID_FILE) or {}
    by_signature = {config_signature(config): key for key, config in grid.items()}
    found: dict[str, list] = {}
    for pattern in CHECKPOINT_GLOBS:
        for checkpoint in sweep_dir.glob(pattern):
            key, step = _trial_of(checkpoint, by_signature)
            if key is not None:
                found.setdefault(key, []).append(((checkpoint / SUMMARY_FILE).is_file(), step, checkpoint.name, checkpoint))
    return {key: [c for *_, c in sorted(items)] for key, items in found.items()}


def sweep_folder_of(path) -> Path | None:
    """The sweep folder that holds `path` (itself included), or None."""
    path = Path(path).resolve()
    return next((p for p in (path, *path.parents) if (p / GRID_FILE).is_file()), None)


def final_summaries(sweep_dir) -> dict[str, dict]:
    """{trial key: the summary in its final checkpoint's summary.json} for the trials that have one."""
    found = {key: read_json(checkpoints[-1] / SUMMARY_FILE) for key, checkpoints in trial_checkpoints(sweep_dir).items()}
    return {key: ended.get("summary") or {} for key, ended in found.items() if isinstance(ended, dict)}


def best_trial(sweep_dir, metric: str | None = None, mode: str | None = None) -> tuple[str, str, float] | None:
    """(trial key, metric, value) of the best FINISHED trial by `metric` and `mode` (default: the sweep's,
    from sweep.json), read from the trials' final checkpoints (summary.json): a sweep still running
    has the best of its trials finished so far. None if none has a finite value."""
    import math

    from smet_lab.metrics import FINAL_VAL_LOSS

    sweep_dir = Path(sweep_dir)
    sweep = (read_json(sweep_dir / SWEEP_FILE) or {}).get("sweep") or {}
    metric, mode = metric or sweep.get("metric", FINAL_VAL_LOSS), mode or sweep.get("mode", "min")
    statuses = read_statuses(sweep_dir)
    values = {}
    for key, summary in final_summaries(sweep_dir).items():
        value = summary.get(metric)
        if (statuses.get(key) or {}).get("status") == "FINISHED" and isinstance(value, (int, float)) \
                and math.isfinite(value):
            values[key] = float(value)
    if not values:
        return None
    key = (min if mode == "min" else max)(values, key=values.get)
    return key, metric, values[key]


# ------------------------------------------------------------------------------ what a resume does
def resume_plan(sweep, sweep_dir: Path, trials) -> tuple[str, dict, int]:
    """(what happens to the sweep folder, {trial key: what happens to the trial}, how many trials will run)
    when the sweep starts now: --plan shows it, the runner says it when it resumes."""
    if not sweep_dir.exists():
        return "new", {t.key: "to run" for t in trials}, len(trials)
    if not sweep.resume:
        return (f"starts afresh: sweep.resume=false deletes {sweep_dir} first", {t.key: "to run" for t in trials},
                len(trials))
    if not (sweep_dir / "tune").is_dir():
        return "new (the folder holds no sweep state yet)", {t.key: "to run" for t in trials}, len(trials)
    ended = read_statuses(sweep_dir)
    starts = resume_points(sweep_dir)
    states = {}
    for t in trials:
        status = ended.get(t.key, {}).get("status")
        if status in ("FINISHED", "DIVERGED"):
            states[t.key] = f"{status.lower()}: kept"
        elif status == "FAILED":
            states[t.key] = (f"failed: runs again {starts.get(t.key, 'from the start')}" if sweep.retry_failed
                             else "failed: kept (sweep.retry_failed=true runs it again)")
        else:
            states[t.key] = f"to run {starts.get(t.key, 'from the start')}"
    todo = sum(s.startswith(("to run", "failed: runs")) for s in states.values())
    return f"resumes: {len(trials) - todo} of {len(trials)} trials kept, {todo} to run", states, todo


def resume_points(sweep_dir) -> dict[str, str]:
    """{trial key: "from its step-N checkpoint"} for the trials with a training checkpoint to resume from."""
    from smet_lab.train.checkpoint import STATE_FILE

    points = {}
    for key, checkpoints in trial_checkpoints(sweep_dir).items():
        resumable = [c for c in checkpoints if (c / STATE_FILE).is_file()]
        if resumable:
            step = (read_json(resumable[-1] / TRIAL_FILE) or {}).get("step")
            points[key] = f"from its step-{step} checkpoint" if step is not None else "from its last checkpoint"
    return points
