"""A sweep read from its folder alone (`<storage>/<name>/`), into the same (SweepInfo, runs DataFrame)
that smet_lab.report.io reads out of MLflow: for a sweep run with tracking=none, or a folder copied to
a machine without the sweep's database. Single runs' output folders are read the same way.

What each trial has there: its config (grid.json), how it ended (trial_status.json) and its checkpoints
under Tune's `tune/` (and Ray Train's `train/` with ray.workers_per_trial > 1), each naming its trial
(trial.json). An ended trial's final checkpoint holds summary.json and metrics.parquet; an unfinished
one's newest checkpoint holds the history so far inside state.pt. No MLflow, no Ray.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from smet_lab.report.data import (ENDED, FAILED, FINISHED, KILLED, MISSING, RUNNING, SweepInfo, empty_runs,
                                  infer_swept, newest_per_seed, parse_value, sweep_info_from_params)
from smet_lab.sweep.folder import (GRID_FILE, RESUME_SECTIONS, SUMMARY_FILE, SWEEP_FILE, read_json, read_statuses,
                                   sweep_running, trial_checkpoints)
from smet_lab.tracking.settings import flatten


def is_sweep_folder(path) -> bool:
    return (Path(path) / GRID_FILE).is_file()


def is_run_folder(path) -> bool:
    """A single run's output folder (outputs/<date>/<time>-<method>): checkpoints/ beside the config.yaml
    written at its end, or beside Hydra's .hydra/ (a run killed before its end)."""
    path = Path(path)
    return (path / "checkpoints").is_dir() and ((path / "config.yaml").is_file() or (path / ".hydra").is_dir())


def read_history(checkpoint: Path) -> pd.DataFrame | None:
    """The run's per-step history: metrics.parquet of a final checkpoint, else the history inside
    state.pt (memory-mapped: the tensors are not read)."""
    try:
        if (checkpoint / "metrics.parquet").is_file():
            return pd.read_parquet(checkpoint / "metrics.parquet")
        from smet_lab.train.checkpoint import STATE_FILE

        if (checkpoint / STATE_FILE).is_file():
            import torch

            from smet_lab.tracking.artifacts import history_frame

            rows = torch.load(checkpoint / STATE_FILE, map_location="cpu", mmap=True, weights_only=False)["history"]
            return history_frame(rows) if rows else None
    except Exception:  # noqa: BLE001 - a checkpoint cut short or being written: the trial shows without a history
        return None
    return None


def trial_row(key: str, config: dict, extensions: list, ended: dict | None, checkpoint: Path | None,
              running: bool) -> dict:
    """One row of the runs frame (the columns of smet_lab.report.data), as runs_frame builds it from MLflow."""
    params = {k: parse_value(v) for k, v in flatten({**config, "extensions": extensions}).items()}
    summary = read_json(checkpoint / SUMMARY_FILE) if checkpoint is not None else None
    metrics = {k: float(v) for k, v in (summary or {}).get("summary", {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if ended:
        status, error = ended["status"], ended.get("error")
    elif checkpoint is None:
        status, error = (RUNNING if running else MISSING), None
    else:
        status, error = (RUNNING if running else KILLED), None if running else "sweep interrupted"
    return {**params, **metrics, "run_id": None, "trial": key, "status": status, "error": error,
            "history": read_history(checkpoint) if checkpoint is not None else None}


def load_folder(sweep_dir, running: bool | None = None) -> tuple[SweepInfo, pd.DataFrame]:
    """(what the sweep asked for, one row per grid trial) from a sweep's folder. `running`: whether its
    driver runs now (default: whether one holds the sweep's lock)."""
    sweep_dir = Path(sweep_dir).resolve()
    grid = json.loads((sweep_dir / GRID_FILE).read_text())
    meta = read_json(sweep_dir / SWEEP_FILE) or {}
    running = sweep_running(sweep_dir) if running is None else running
    statuses = read_statuses(sweep_dir)
    checkpoints = {key: found[-1] for key, found in trial_checkpoints(sweep_dir).items()}
    rows = [trial_row(key, config, meta.get("extensions") or [], statuses.get(key), checkpoints.get(key), running)
            for key, config in grid.items()]
    runs = pd.DataFrame(rows) if rows else empty_runs()
    # No parent run here: the sweep's status is what its trials say (a FAILED trial fails it, as in MLflow).
    ended = runs["status"].isin(ENDED).all()
    status = RUNNING if running else (FAILED if (runs["status"] == FAILED).any() else FINISHED) if ended else KILLED
    fields = {"uri": "", "status": status, "sweep_dir": str(sweep_dir)}
    if meta:
        name = (meta.get("sweep") or {}).get("name") or sweep_dir.name
        info = sweep_info_from_params(name, flatten({k: meta[k] for k in ("sweep", "n_trials") if k in meta}), **fields)
    else:  # a folder from before sweep.json: the grid is all there is
        info = SweepInfo(name=sweep_dir.name, n_trials=len(grid), **fields)
    if not info.swept:
        info.swept = infer_swept(runs)
    return info, runs


def load_run_folders(folders: list) -> tuple[SweepInfo, pd.DataFrame]:
    """(the runs as one report's cells, one row per run) from single runs' output folders: the config
    they trained with (config.yaml), how each ended and its summary (summary.json, written at its end),
    its history (metrics.parquet, or the newest checkpoint's of a run stopped before it wrote one).
    Runs of the same setting and seed count once: the newest (SweepInfo.left_out says how many not)."""
    from omegaconf import OmegaConf

    from smet_lab.train.checkpoint import CONFIG_FILE, newest

    rows = []
    for folder in map(Path, folders):
        checkpoint, written = newest(folder), folder / "config.yaml"
        # A run killed before its end has no config.yaml: its newest checkpoint holds its config.
        config = (OmegaConf.to_container(OmegaConf.load(written)) if written.is_file()
                  else read_json(checkpoint / CONFIG_FILE) if checkpoint else None) or {}
        core = {k: v for k, v in config.items() if k in RESUME_SECTIONS}
        ended = read_json(folder / SUMMARY_FILE)
        source = folder if (folder / "metrics.parquet").is_file() else checkpoint
        row = trial_row(str(folder), core, config.get("extensions") or [], ended, source, running=False)
        if ended is None:
            row["error"] = "no summary.json: stopped before its end, still running, or from an older smet_lab"
        stamps = [p.stat().st_mtime for p in (written, checkpoint) if p is not None and p.exists()]
        rows.append({**row, "start_time": max(stamps, default=0.0)})  # orders re-runs: the newest counts
    runs = pd.DataFrame(rows)
    name = Path(folders[0]).name if len(folders) == 1 else f"{len(folders)} runs"
    info = SweepInfo(name=name, run_dirs=[str(Path(f).resolve()) for f in folders], swept=infer_swept(runs))
    runs, info.left_out = newest_per_seed(runs, info.swept)
    return info, runs.drop(columns="start_time")
