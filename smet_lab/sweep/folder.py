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
from pathlib import Path

from smet_lab.config import ConfigError
from smet_lab.grid import SweepConfig, Trial

DEFAULT_STORAGE = "sweeps"  # where sweeps/<name>/ go without ray.storage or sweep.storage (in the working dir)
# Trial statuses in our words (MLflow's KILLED/FAILED/FINISHED + diverged) by trial key.
STATUS_FILE = "trial_status.json"
SWEEP_FILE = "sweep.json"  # the sweep section as run, n_trials and extensions: what the report needs without MLflow
# In every checkpoint a trial reports: {"trial": key, "step": N} (Tune's folder names cut long keys). The final
# one also holds SUMMARY_FILE (status, error, summary) beside the run's artifacts.
TRIAL_FILE = "trial.json"
SUMMARY_FILE = "summary.json"


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


def write_grid(sweep_dir: Path, trials: list[Trial], configs: dict, sweep_params: dict | None = None) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / GRID_FILE).write_text(json.dumps(trial_signatures(trials, configs), indent=1))
    if sweep_params is not None:
        (sweep_dir / SWEEP_FILE).write_text(json.dumps(sweep_params, indent=1, default=str))


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
