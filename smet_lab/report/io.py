"""Reading a sweep out of MLflow, once, into (SweepInfo, runs DataFrame); logging the report back.

MLflow is imported inside the functions only. A target is resolved in this order: a run id (a sweep's
parent run), a sweep name (tag smet.sweep on parent runs; the newest parent wins), an experiment name
(its newest sweep; an experiment without sweeps gives its single runs). Anything else is a ReportError
with a one-line message.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pandas as pd

from smet_lab.config import did_you_mean, no_such_path
from smet_lab.report.data import (DIVERGED, RUNNING, SweepInfo, _yaml, empty_runs, infer_swept, newest_per_seed,
                                  parse_value, sweep_info_from_params, with_history_metrics)
from smet_lab.report.folder import is_run_folder, is_sweep_folder, load_folder, load_run_folders
from smet_lab.sweep.folder import DEFAULT_STORAGE, sweep_tags
from smet_lab.tracking.settings import sqlite_path

MAX_RUNS = 50000  # MlflowClient.search_runs' largest page
HISTORY_KEYS = ("train/loss", "val/loss", "topo/density", "stability/probe_loss", "stability/probe_jump")
RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class ReportError(Exception):
    """A one-line user error: unknown sweep, empty experiment, no database (exit code 2)."""


def client_for(uri: str):
    """An MlflowClient; a sqlite URI must name an existing database (MLflow would create an empty one)."""
    from mlflow.tracking import MlflowClient

    from smet_lab.tracking.settings import resolve_uri

    path = sqlite_path(uri)
    if uri.startswith("sqlite:") and (path is None or not path.is_file()):
        raise ReportError(f"no MLflow database at {path or uri} (--tracking-uri {uri})")
    return MlflowClient(tracking_uri=resolve_uri(uri)), resolve_uri(uri)


def _q(value: str) -> str:
    return str(value).replace("'", "\\'")


def _experiments(client) -> dict:
    return {e.experiment_id: e for e in client.search_experiments()}


def _newest(client, exp_ids, filter_string):
    if not exp_ids:
        return None
    found = client.search_runs(list(exp_ids), filter_string=filter_string, max_results=1,
                               order_by=["attributes.start_time DESC"])
    return found[0] if found else None


def resolve(client, target: str):
    """(parent run or None, experiment, runs of an experiment without sweeps or None)."""
    experiments = _experiments(client)
    if RUN_ID.match(target):
        from mlflow.exceptions import MlflowException

        try:
            run = client.get_run(target)
        except MlflowException:
            run = None
        if run is not None:
            if run.data.tags.get("smet.kind") != "sweep":
                raise ReportError(f"run {target} is not a sweep's parent run (tag smet.kind="
                                  f"{run.data.tags.get('smet.kind', 'missing')}); give its sweep or experiment")
            return run, experiments.get(run.info.experiment_id), None
    parent = _newest(client, experiments, f"tags.`smet.kind` = 'sweep' and tags.`smet.sweep` = '{_q(target)}'")
    if parent is not None:
        return parent, experiments.get(parent.info.experiment_id), None
    exp = next((e for e in experiments.values() if e.name == target), None)
    if exp is not None:  # its single runs (sweeps share the experiment, `smet_lab` by default), else its newest sweep
        runs = [r for r in client.search_runs([exp.experiment_id], max_results=MAX_RUNS)
                if r.data.tags.get("smet.kind") not in ("sweep", "trial")]
        if runs:
            return None, exp, runs
        parent = _newest(client, [exp.experiment_id], "tags.`smet.kind` = 'sweep'")
        if parent is not None:
            return parent, exp, None
        raise ReportError(f"experiment '{target}' has no runs")
    if Path(target).is_dir():  # a sweep's folder, e.g. sweeps/density
        folder = str(Path(target).resolve())
        parent = _newest(client, experiments, _parent_filter(folder))
        if parent is not None:
            return parent, experiments.get(parent.info.experiment_id), None
        if is_sweep_folder(folder):  # (load_sweep_runs reads it from its files)
            raise ReportError(f"no sweep parent run for the folder {folder} in {client.tracking_uri}")
        raise ReportError(f"{folder} is neither a sweep's folder (no grid.json there) nor a run's (no config.yaml "
                          f"and checkpoints/), and no sweep parent run names it in {client.tracking_uri}")
    sweeps, names = tracked_sweeps(client, experiments), sorted(e.name for e in experiments.values())
    known = f"sweeps there: {', '.join(sweeps)}" if sweeps else "no sweeps there"
    hint = did_you_mean(target, [*sweeps, *names, *sweep_folders()])
    raise ReportError(f"no sweep, experiment or parent run '{target}' in {client.tracking_uri}{hint} ({known}; "
                      f"experiments: {', '.join(names)}){folders_note()}")


def tracked_sweeps(client, experiments=None) -> list[str]:
    experiments = _experiments(client) if experiments is None else experiments
    parents = client.search_runs(list(experiments), filter_string="tags.`smet.kind` = 'sweep'",
                                 max_results=MAX_RUNS) if experiments else []
    return sorted({r.data.tags.get("smet.sweep") for r in parents} - {None, ""})


def sweep_folders() -> list[str]:
    """The names of the sweeps stored in the default storage (sweeps/ in the working dir)."""
    return sorted(p.name for p in Path(DEFAULT_STORAGE).glob("*") if is_sweep_folder(p))


def folders_note() -> str:
    """"; sweep folders in sweeps/: a, b" for the sweeps stored in the default storage, else ""."""
    names = sweep_folders()
    return f"; sweep folders in {DEFAULT_STORAGE}/: {', '.join(names)}" if names else ""


def known_sweeps(uri: str) -> str:
    """What a user could name: the sweeps in `uri` and the sweep folders in sweeps/ (for a usage error)."""
    tracked = []
    if has_database(uri) and uri.startswith("sqlite:"):  # a server is not asked just to word an error
        tracked = tracked_sweeps(client_for(uri)[0])
    return (f"; sweeps in {uri}: {', '.join(tracked)}" if tracked else "") + folders_note()


def find_parent_by_dir(client, experiment: str, sweep_dir: str):
    """The newest parent run of the sweep stored in sweep_dir (its sweep_tags), or None."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    return _newest(client, [exp.experiment_id], _parent_filter(sweep_dir))


def _parent_filter(sweep_dir) -> str:
    """The parent run of the sweep now in sweep_dir: a parent of an earlier start of the same folder
    (sweep.resume=false, then tracking=none) is not it."""
    tags = {"smet.kind": "sweep", **sweep_tags(sweep_dir)}
    return " and ".join(f"tags.`{k}` = '{_q(v)}'" for k, v in tags.items())


# ------------------------------------------------------------------------------------------- runs
def _artifact(client, run, name: str, tmp: Path) -> Path | None:
    """A local path to the run's artifact `name`: read in place from a local artifact store, else
    downloaded into tmp (MLflow's progress bar off)."""
    import os
    from urllib.parse import urlparse

    uri = run.info.artifact_uri or ""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        path = Path(parsed.path if parsed.scheme else uri) / name
        return path if path.is_file() else None
    if name not in {a.path for a in client.list_artifacts(run.info.run_id)}:
        return None
    old = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        return Path(client.download_artifacts(run.info.run_id, name, str(tmp)))
    finally:
        if old is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = old


def read_history(client, run, tmp: Path) -> pd.DataFrame | None:
    """metrics.parquet (the full history) when the run has it, else what MLflow holds of the main keys
    (a failed, killed or running trial has no artifacts yet)."""
    try:
        path = _artifact(client, run, "metrics.parquet", tmp)
        if path is not None:
            return pd.read_parquet(path)
    except Exception:  # an unreadable artifact store: fall back on the metric histories
        pass
    series = {}
    for key in HISTORY_KEYS:
        if key in run.data.metrics:
            points = client.get_metric_history(run.info.run_id, key)
            series[key] = pd.Series({m.step: m.value for m in points}, dtype="float64")
    if not series:
        return None
    frame = pd.DataFrame(series).sort_index()
    frame.index.name = "step"
    return frame.reset_index().astype({"step": "int64"})


def trial_status(run) -> str:
    tags = run.data.tags
    if tags.get("smet.diverged") == "true":
        return DIVERGED
    return tags.get("smet.status") or run.info.status


def runs_frame(client, runs, load_histories: bool = True) -> pd.DataFrame:
    """One row per run (see smet_lab.report.data for the columns)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="smet_report_") as tmp:
        for i, run in enumerate(runs):
            params = {k: parse_value(v) for k, v in run.data.params.items()}
            metrics = {k: float(v) for k, v in run.data.metrics.items()}
            where = Path(tmp, str(i))
            where.mkdir()
            history = read_history(client, run, where) if load_histories else None
            tags = run.data.tags
            rows.append({**params, **metrics, "method": tags.get("smet.method", params.get("method")),
                         "run_id": run.info.run_id,
                         "trial": tags.get("smet.trial_key") or tags.get("mlflow.runName") or run.info.run_id,
                         "status": trial_status(run), "error": tags.get("smet.error"), "history": history,
                         "start_time": run.info.start_time})
    return pd.DataFrame(rows) if rows else empty_runs()


def load_parent(client, uri: str, parent, experiment=None) -> tuple[SweepInfo, pd.DataFrame]:
    exp_id = parent.info.experiment_id
    children = client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                                  max_results=MAX_RUNS, order_by=["attributes.start_time ASC"])
    tags = parent.data.tags
    info = sweep_info_from_params(
        tags.get("smet.sweep", parent.info.run_name), parent.data.params, uri=uri,
        experiment=experiment.name if experiment is not None else client.get_experiment(exp_id).name,
        parent_run_id=parent.info.run_id, status=parent.info.status, sweep_dir=tags.get("smet.sweep_dir"))
    runs = runs_frame(client, children)
    if not info.swept:
        info.swept = infer_swept(runs)
    return info, runs


def load_sweep_runs(uri: str, target: str, warn=print) -> tuple[SweepInfo, pd.DataFrame]:
    """(what the sweep asked for, its runs) for a sweep name, an experiment name, a parent run id or a
    sweep's folder. A folder, or a name whose folder is in the default storage (sweeps/NAME), that `uri`
    does not know (tracking=none, or its database elsewhere) is read from its own files."""
    folder = next((f for f in (Path(target), Path(DEFAULT_STORAGE) / target) if is_sweep_folder(f)), None)
    if not has_database(uri):
        if folder is not None:
            return prepared(*load_folder(folder), warn)
        raise ReportError(f"no sweep folder {target} or {DEFAULT_STORAGE}/{target}, and no MLflow database at "
                          f"{sqlite_path(uri)} (--tracking-uri {uri}){folders_note()}"
                          f"{did_you_mean(target, sweep_folders())}")
    client, uri = client_for(uri)
    try:
        parent, exp, loose = resolve(client, target)
    except ReportError:
        if folder is None:
            raise
        return prepared(*load_folder(folder), warn)
    if parent is not None:
        return prepared(*load_parent(client, uri, parent, exp), warn)
    runs = runs_frame(client, loose)
    running = (runs["status"] == RUNNING).any()
    info = SweepInfo(name=exp.name, uri=uri, experiment=exp.name, status=RUNNING if running else None,
                     swept=infer_swept(runs))
    runs, info.left_out = newest_per_seed(runs, info.swept)
    return prepared(info, runs, warn)


def load_run_dirs(folders: list, warn=print) -> tuple[SweepInfo, pd.DataFrame]:
    """Single runs' output folders as one report's runs; anything else among them is one line."""
    for folder in folders:
        if not is_run_folder(folder):
            what = "a sweep's folder" if is_sweep_folder(folder) else no_such_path(folder) or "not a run's output folder"
            raise ReportError(f"{folder}: {what} (a report of several targets reads single runs' output folders, "
                              "outputs/<date>/<time>-<method>, each with config.yaml and checkpoints/)")
    return prepared(*load_run_folders(folders), warn)


def load_sweep_dir(uri: str | None, experiment: str, sweep_dir: str, warn=print) -> tuple[SweepInfo, pd.DataFrame]:
    """The sweep stored in sweep_dir (the sweep runner's own hook): from MLflow, or with uri None
    (tracking=none) from the folder, whose driver is the caller."""
    if uri is None:
        return prepared(*load_folder(sweep_dir, running=False), warn)
    client, uri = client_for(uri)
    parent = find_parent_by_dir(client, experiment, sweep_dir)
    if parent is None:
        raise ReportError(f"no parent run with tag smet.sweep_dir={sweep_dir} in experiment '{experiment}'")
    return prepared(*load_parent(client, uri, parent), warn)


def has_database(uri: str) -> bool:
    """False for a sqlite URI whose file does not exist (anything else may hold the sweep)."""
    path = sqlite_path(uri)
    return not uri.startswith("sqlite:") or (path is not None and path.is_file())


def prepared(info: SweepInfo, runs: pd.DataFrame, warn) -> tuple[SweepInfo, pd.DataFrame]:
    """The runs with the extensions they trained with imported (so a user's metrics have their labels
    and computes), then the metrics that unfinished runs did not log recomputed from their histories."""
    import_run_extensions(runs, warn)
    return info, with_history_metrics(runs)


def import_run_extensions(runs: pd.DataFrame, warn) -> None:
    """Import the extensions the runs trained with (their `extensions` param, e.g. '[/home/me/rules.py]');
    `warn(line)` for one that cannot be imported here (its metrics then show under their MLflow keys)."""
    from smet_lab.config import ConfigError
    from smet_lab.extend import load_extensions

    listed = runs["extensions"].dropna() if "extensions" in runs else []
    lists = [_yaml(v) for v in listed]  # flatten() wrote each as "[a, b]"
    entries = sorted({str(e) for found in lists if isinstance(found, list) for e in found if e})
    for entry in entries:
        try:
            load_extensions([entry])
        except ConfigError as exc:
            warn(f"{exc}; the metrics it registers show under their MLflow keys")


def log_report(uri: str, parent_run_id: str, report_dir: Path) -> None:
    """The report folder as the parent run's artifact `report/`."""
    from smet_lab.tracking import Tracker

    client, _ = client_for(uri)
    Tracker(client, parent_run_id).log_artifacts([Path(report_dir)])

