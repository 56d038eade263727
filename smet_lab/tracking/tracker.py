"""One MLflow run per Tracker, through an explicit MlflowClient (no global active run, so a sweep
driver can hold a parent and many child trackers at once). MLflow is imported only in here, lazily."""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import time
from pathlib import Path

from smet_lab.tracking.settings import TrackingConfig, flatten, resolve_uri, sqlite_path

FLUSH_EVERY = 200  # buffered metrics per log_batch round trip
MAX_BATCH = 1000  # mlflow.utils.validation.MAX_METRICS_PER_BATCH
MAX_PARAMS_BATCH = 100  # mlflow.utils.validation.MAX_PARAMS_TAGS_PER_BATCH
DESCRIPTION = ("smet_lab: dynamic sparse training of LLaMA-style models with SMET. Single runs have the tag "
               "smet.kind=run; a sweep is a parent run (smet.kind=sweep, its report in the artifact report/) "
               "with one child run per trial (smet.kind=trial). Metrics: train/*, val/*, topo/*, stability/*, "
               "summary/* (run-level numbers), sweep/* and best/* on sweep parents.")
# Our statuses -> MLflow's terminal statuses. A diverged run is a failed run with a tag saying why.
TERMINAL = {"FINISHED": "FINISHED", "FAILED": "FAILED", "KILLED": "KILLED", "DIVERGED": "FAILED"}


class NullTracker:
    """Tracking disabled: the same methods, doing nothing."""

    run_id = None

    def log_metrics(self, metrics: dict, step: int) -> None:
        pass

    def log_artifacts(self, paths, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict) -> None:
        pass

    def flush(self) -> None:
        pass

    def finish(self, status: str = "FINISHED", error: str | None = None) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        return False


class Tracker(NullTracker):
    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id
        self._buffer: list = []
        self._done = False

    def log_metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        # NaN and +-inf go in as they are: MLflow stores NaN, and clamps +-inf to +-1.7976931348623157e308.
        self._buffer.extend(Metric(k, float(v), ts, int(step)) for k, v in metrics.items())
        if len(self._buffer) >= FLUSH_EVERY:
            self.flush()

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        if tags:
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def flush(self) -> None:
        buffer, self._buffer = self._buffer, []
        for i in range(0, len(buffer), MAX_BATCH):
            self.client.log_batch(self.run_id, metrics=buffer[i:i + MAX_BATCH])

    def log_artifacts(self, paths, artifact_path: str | None = None) -> None:
        for p in map(Path, paths):
            if p.is_dir():  # keep the folder's name in the run: report/ stays report/
                sub = f"{artifact_path}/{p.name}" if artifact_path else p.name
                self.client.log_artifacts(self.run_id, str(p), sub)
            else:
                self.client.log_artifact(self.run_id, str(p), artifact_path)

    def finish(self, status: str = "FINISHED", error: str | None = None) -> None:
        if status not in TERMINAL:
            raise ValueError(f"status must be one of {', '.join(TERMINAL)}, got {status!r}")
        if self._done:
            return
        self._done = True
        try:
            self.flush()
        finally:  # whatever happened to the metrics, the run must not stay RUNNING
            tags = {"smet.status": status}
            if status == "DIVERGED":
                tags["smet.diverged"] = "true"
            if error:
                tags["smet.error"] = str(error)[:500]
            try:
                for k, v in tags.items():
                    self.client.set_tag(self.run_id, k, v)
            finally:
                self.client.set_terminated(self.run_id, TERMINAL[status])

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.finish("FINISHED")  # a no-op when finish() was already called
        elif issubclass(exc_type, KeyboardInterrupt):
            self.finish("KILLED", "KeyboardInterrupt")
        else:
            self.finish("FAILED", f"{exc_type.__name__}: {exc}")
        return False  # never swallow the exception


def mlflow_client(uri: str):
    """An MlflowClient on `uri`. A new SQLite database gets its tables when the first client opens it,
    and two processes doing that at once fail ('table alembic_version already exists'), so clients
    open a database one at a time, under a lock of its folder."""
    from mlflow.tracking import MlflowClient

    db = sqlite_path(uri)
    if db is None:
        return MlflowClient(tracking_uri=uri)
    fd = os.open(db.parent, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a file system without flock on folders: go on unlocked, as before
            pass
        return MlflowClient(tracking_uri=uri)
    finally:
        os.close(fd)  # releases the lock


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def _experiment_id(client, name: str, uri: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        db = sqlite_path(uri)
        # Client-side sqlite would put artifacts in ./mlruns of whatever cwd; keep them next to the DB.
        location = str(db.parent / "mlartifacts" / re.sub(r"[^\w.-]+", "_", name)) if db is not None else None
        try:
            return client.create_experiment(name, artifact_location=location, tags={"mlflow.note.content": DESCRIPTION})
        except MlflowException:  # another process created it first
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":  # a deleted name cannot be reused; bring it back instead
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def start_run(cfg: TrackingConfig, run_name: str, params: dict, tags: dict[str, str],
              parent_run_id: str | None = None) -> NullTracker:
    """A Tracker on a new MLflow run (experiment created if missing), or a NullTracker if disabled."""
    if not cfg.enabled:
        return NullTracker()
    from mlflow.entities import Param

    uri = resolve_uri(cfg.uri)
    client = mlflow_client(uri)
    exp_id = _experiment_id(client, cfg.experiment, uri)
    all_tags = {k: str(v) for k, v in {**cfg.tags, **tags}.items()}
    sha = git_sha()
    if sha:
        all_tags.setdefault("smet.git_sha", sha)
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    tracker = Tracker(client, run.info.run_id)
    try:
        items = [Param(k, v) for k, v in flatten(params).items()]
        for i in range(0, len(items), MAX_PARAMS_BATCH):
            client.log_batch(tracker.run_id, params=items[i:i + MAX_PARAMS_BATCH])
    except BaseException as e:
        tracker.finish("FAILED", f"logging params: {type(e).__name__}: {e}")
        raise
    return tracker


def continue_run(cfg: TrackingConfig, run_id: str, tags: dict[str, str]) -> NullTracker | None:
    """A Tracker on an existing run of this store (set RUNNING again, `tags` added), or None when the
    store no longer has it (deleted, or another database)."""
    if not cfg.enabled:
        return NullTracker()
    from mlflow.exceptions import MlflowException

    client = mlflow_client(resolve_uri(cfg.uri))
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    if run.info.lifecycle_stage != "active":
        return None
    client.update_run(run_id, status="RUNNING")
    tracker = Tracker(client, run_id)
    tracker.set_tags({**cfg.tags, **tags})
    return tracker


def find_or_start_run(cfg: TrackingConfig, run_name: str, params: dict, tags: dict[str, str],
                      match: dict[str, str], parent_run_id: str | None = None,
                      mark_resumed: bool = True) -> NullTracker:
    """Reuse the newest run of the experiment whose tags equal `match` (a resumed sweep must not
    duplicate its runs): it is set RUNNING again. Otherwise start a new run carrying those tags."""
    if not cfg.enabled:
        return NullTracker()
    uri = resolve_uri(cfg.uri)
    client = mlflow_client(uri)
    exp_id = _experiment_id(client, cfg.experiment, uri)
    conditions = [f"tags.`{k}` = '{v}'" for k, v in match.items()]
    if parent_run_id:
        conditions.append(f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    found = client.search_runs([exp_id], filter_string=" and ".join(conditions), max_results=1,
                               order_by=["attributes.start_time DESC"])
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        tracker = Tracker(client, run_id)
        tracker.set_tags({**cfg.tags, **({"smet.resumed": "true"} if mark_resumed else {})})
        return tracker
    return start_run(cfg, run_name, params, {**tags, **match}, parent_run_id)
