"""Reading a sweep out of MLflow, once, into (SweepInfo, runs DataFrame); logging the report back.

MLflow is imported inside the functions only. A target is resolved in this order: a run id (a sweep's
parent run), a sweep name (tag smet.sweep on parent runs; the newest parent wins), an experiment name
(its newest sweep; an experiment without sweeps gives its single runs). Anything else is a ReportError
with a one-line message.
"""

from __future__ import annotations

import math
import re
import tempfile
from pathlib import Path

import pandas as pd

from smet_lab.metrics import METRICS, computed
from smet_lab.report.data import (DIVERGED, RUNNING, SweepInfo, empty_runs, infer_swept, parse_value,
                                  sweep_info_from_params)

MAX_RUNS = 50000  # MlflowClient.search_runs' largest page
HISTORY_KEYS = ("train/loss", "val/loss", "topo/density", "stability/probe_loss", "stability/probe_jump")
RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class ReportError(Exception):
    """A one-line user error: unknown sweep, empty experiment, no database (exit code 2)."""


def client_for(uri: str):
    """An MlflowClient; a sqlite URI must name an existing database (MLflow would create an empty one)."""
    from mlflow.tracking import MlflowClient

    from smet_lab.tracking.settings import resolve_uri, sqlite_path

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
    if exp is not None:
        parent = _newest(client, [exp.experiment_id], "tags.`smet.kind` = 'sweep'")
        if parent is not None:
            return parent, exp, None
        runs = client.search_runs([exp.experiment_id], max_results=MAX_RUNS)
        if not runs:
            raise ReportError(f"experiment '{target}' has no runs")
        return None, exp, runs
    if Path(target).is_dir():  # a sweep's folder, e.g. sweeps/density
        folder = str(Path(target).resolve())
        parent = _newest(client, experiments, f"tags.`smet.kind` = 'sweep' and tags.`smet.sweep_dir` = '{_q(folder)}'")
        if parent is not None:
            return parent, experiments.get(parent.info.experiment_id), None
        raise ReportError(f"no sweep parent run for the folder {folder} in {client.tracking_uri} (a sweep run "
                          "with tracking=none has no report: its results are in that folder's trials.csv)")
    parents = client.search_runs(list(experiments), filter_string="tags.`smet.kind` = 'sweep'",
                                 max_results=MAX_RUNS) if experiments else []
    sweeps = sorted({r.data.tags.get("smet.sweep") for r in parents} - {None})
    known = f"sweeps there: {', '.join(sweeps)}" if sweeps else "no sweeps there"
    raise ReportError(f"no sweep, experiment or parent run '{target}' in {client.tracking_uri} ({known}; "
                      f"experiments: {', '.join(sorted(e.name for e in experiments.values()))})")


def find_parent_by_dir(client, experiment: str, sweep_dir: str):
    """The newest parent run of the sweep stored in sweep_dir (tag smet.sweep_dir), or None."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    return _newest(client, [exp.experiment_id],
                   f"tags.`smet.kind` = 'sweep' and tags.`smet.sweep_dir` = '{_q(sweep_dir)}'")


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


def from_history(history: pd.DataFrame, logged: dict) -> dict:
    """The metrics recomputable from the history that the run did not log (failed, killed or still
    running trials log no summary): spike and probe metrics, and registered metrics with a compute."""
    from smet_lab.spikes import run_spike_summary

    missing = [k for k, m in METRICS.items() if m.from_history and not math.isfinite(logged.get(k, math.nan))]
    if not missing:
        return {}
    found = run_spike_summary(history) if "train/loss" in history else {}
    if any(METRICS[k].compute for k in missing):  # compute() takes the trainer's rows: one dict per step, no NaN
        found.update(computed([{k: v for k, v in row.items() if pd.notna(v)} for row in history.to_dict("records")]))
    return {k: found[k] for k in missing if k in found}


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
            if history is not None:
                metrics.update(from_history(history, metrics))
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


def load_sweep_runs(uri: str, target: str) -> tuple[SweepInfo, pd.DataFrame]:
    """(what the sweep asked for, its runs) for a sweep name, an experiment name or a parent run id."""
    client, uri = client_for(uri)
    parent, exp, loose = resolve(client, target)
    if parent is not None:
        return load_parent(client, uri, parent, exp)
    runs = runs_frame(client, loose)
    running = (runs["status"] == RUNNING).any()
    info = SweepInfo(name=exp.name, uri=uri, experiment=exp.name, status=RUNNING if running else None,
                     swept=infer_swept(runs))
    return info, runs


def load_sweep_dir(uri: str, experiment: str, sweep_dir: str) -> tuple[SweepInfo, pd.DataFrame]:
    """The sweep stored in sweep_dir (the sweep runner's own hook)."""
    client, uri = client_for(uri)
    parent = find_parent_by_dir(client, experiment, sweep_dir)
    if parent is None:
        raise ReportError(f"no parent run with tag smet.sweep_dir={sweep_dir} in experiment '{experiment}'")
    return load_parent(client, uri, parent)


def log_report(uri: str, parent_run_id: str, report_dir: Path) -> None:
    """The report folder as the parent run's artifact `report/`."""
    from smet_lab.tracking import Tracker

    client, _ = client_for(uri)
    Tracker(client, parent_run_id).log_artifacts([Path(report_dir)])

