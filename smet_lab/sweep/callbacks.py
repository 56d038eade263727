"""Driver-side Ray Tune callbacks: the single MLflow writer of a sweep, the record of what each trial
ended as, and a live progress view.

All are pickled into the experiment state by Tune and come back on `Tuner.restore`, so they keep
only plain settings and find (or create) their MLflow runs again in `setup()`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from ray import tune

from smet_lab.sweep.folder import SUMMARY_FILE, TRIAL_FILE, record_status, sweep_tags
from smet_lab.tracking import TrackingConfig, find_or_start_run

def numeric_metrics(result: dict) -> dict:
    return {k: float(v) for k, v in result.items()
            if "/" in k and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TrialStatuses(tune.Callback):
    """Records what each trial ended as in the sweep folder (STATUS_FILE), with or without MLflow: the
    driver's end-of-sweep accounting, the report and resumed sweeps read it."""

    def __init__(self, sweep_dir: str):
        self.sweep_dir = sweep_dir

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ended(trial, *trial_outcome(trial), completed=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.ended(trial, "FAILED", first_error_line(trial), completed=False)

    def ended(self, trial, status: str, error: str | None, completed: bool) -> None:
        """A trial ended (`completed`: it returned, else it raised)."""
        record_status(self.sweep_dir, trial.config["key"], status, error)


class MlflowSweepLogger(TrialStatuses):
    """One parent run per sweep, one child run per trial (`mlflow.parentRunId`), and the statuses."""

    def __init__(self, tracking: TrackingConfig, sweep_name: str, sweep_dir: str, configs: dict, parent_params: dict):
        super().__init__(sweep_dir)
        self.tracking = tracking
        self.sweep_name = sweep_name
        self.configs = configs
        self.parent_params = parent_params
        self._parent = None
        self._children = {}
        self._tagged = set()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_parent"], state["_children"], state["_tagged"] = None, {}, set()
        return state

    # -------------------------------------------------------------------------------- runs
    def parent(self):
        if self._parent is None:
            self._parent = find_or_start_run(
                self.tracking, run_name=f"sweep:{self.sweep_name}", params=self.parent_params,
                tags={"smet.kind": "sweep", "smet.sweep": self.sweep_name},
                match=sweep_tags(self.sweep_dir))
        return self._parent

    def child(self, key: str):
        if key not in self._children:
            cfg = self.configs[key]
            self._children[key] = find_or_start_run(
                self.tracking, run_name=key, params=cfg,
                tags={"smet.kind": "trial", "smet.sweep": self.sweep_name, "smet.method": cfg["method"]},
                match={"smet.trial_key": key}, parent_run_id=self.parent().run_id)
        return self._children[key]

    # ---------------------------------------------------------------------------- callbacks
    def setup(self, **info):
        self.parent()

    def on_trial_start(self, iteration, trials, trial, **info):
        self.child(trial.config["key"])

    def on_trial_result(self, iteration, trials, trial, result, **info):
        key = trial.config["key"]
        if key not in self._tagged and result.get("smet_data_sha256"):
            self.child(key).set_tags({"smet.data_sha256": result["smet_data_sha256"]})
            self._tagged.add(key)
        metrics = numeric_metrics(result)
        if metrics:
            self.child(key).log_metrics(metrics, int(result.get("step", 0)))

    def ended(self, trial, status: str, error: str | None, completed: bool) -> None:
        tracker = self.child(trial.config["key"])
        if completed and trial.checkpoint is not None:
            with trial.checkpoint.as_directory() as d:
                if (Path(d) / SUMMARY_FILE).is_file():  # the trial's final checkpoint: its artifacts
                    tracker.log_artifacts([p for p in Path(d).iterdir() if p.name not in (SUMMARY_FILE, TRIAL_FILE)])
        resumed = (trial.last_result or {}).get("smet_resumed_from_step") if completed else None
        if resumed:
            tracker.set_tags({"smet.resumed_from_step": resumed})
        tracker.finish(status, error)
        super().ended(trial, status, error, completed)

    def on_experiment_end(self, trials, **info):
        # Stopped by Ctrl-C or a driver shutdown: never leave a child RUNNING. Tune marks the trials it
        # stops at shutdown TERMINATED (as if they had completed), so its status cannot tell; a child
        # that on_trial_complete/on_trial_error already finished ignores this second finish().
        for tracker in self._children.values():
            tracker.finish("KILLED", "sweep interrupted")


def trial_outcome(trial) -> tuple[str, str | None]:
    """(status, error) of a completed trial from its final checkpoint's summary: FINISHED, DIVERGED or
    FAILED (a trial that stopped early, KILLED in a single run, did not finish its grid point)."""
    status, error = "FINISHED", None
    if trial.checkpoint is not None:
        with trial.checkpoint.as_directory() as d:
            summary = Path(d) / SUMMARY_FILE
            if summary.is_file():
                data = json.loads(summary.read_text())
                status, error = data["status"], data["error"]
    return ("FAILED" if status == "KILLED" else status), error


def first_error_line(trial) -> str:
    """The last line of the trial's error file (the exception itself), or a generic message."""
    try:
        text = Path(trial.error_file).read_text() if trial.error_file else ""
    except OSError:
        text = ""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "trial failed")[:500]


class SweepProgress(tune.Callback):
    """A compact live view that reads well in a terminal and in CI logs: one line every `every_s`
    seconds and one per finished trial, with how far each running trial is and an ETA from the steps
    trained so far in this session (so it shows before the first trial ends, and counts concurrency),
    each trial's steps weighted by `step_work` (its relative cost per step; default: all alike)."""

    def __init__(self, name: str, metric: str, mode: str, steps: dict[str, int],
                 step_work: dict[str, float] | None = None, every_s: float = 15.0):
        self.name, self.metric, self.mode, self.steps, self.every_s = name, metric, mode, steps, every_s
        self.work = {k: (step_work or {}).get(k, 1.0) for k in steps}
        self.n_trials = len(steps)
        self._reset()

    def _reset(self):
        self.start = time.time()
        self.last = 0.0
        self.best = None
        self.first, self.latest = {}, {}  # trial key -> first / latest step it reported in this session
        self.ended = {}  # trial key -> "done" | "failed" (Tune's own status lags the callbacks)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(start=0.0, last=0.0, best=None, first={}, latest={}, ended={})
        return state

    def __setstate__(self, state):  # (Tune restores the callbacks: one pickled before step_work counts its steps alike)
        self.__dict__.update({"work": {k: 1.0 for k in state.get("steps", {})}, **state})

    def setup(self, **info):
        self._reset()
        print(f"[sweep {self.name}] {self.n_trials} trials; progress every {self.every_s:.0f}s", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        step = result.get("step")
        if isinstance(step, (int, float)) and not isinstance(step, bool):
            self.first.setdefault(trial.config["key"], step)
            self.latest[trial.config["key"]] = step

    def _consider(self, trial, result):
        value = result.get(self.metric) if result else None
        if isinstance(value, (int, float)) and math.isfinite(value):
            better = self.best is None or (value < self.best[0] if self.mode == "min" else value > self.best[0])
            if better:
                self.best = (value, trial.config["key"])

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        self._consider(trial, result)
        self.ended[trial.config["key"]] = "done"
        status = result.get("smet_status", "FINISHED")
        value = result.get(self.metric)
        shown = f"{self.metric}={value:.4f}" if isinstance(value, (int, float)) else "no metric"
        print(f"[sweep {self.name}] done {trial.config['key']}: {status}, {shown}", flush=True)
        self.line(trials, force=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.ended[trial.config["key"]] = "failed"
        print(f"[sweep {self.name}] FAILED {trial.config['key']}: {first_error_line(trial)}", flush=True)
        self.line(trials, force=True)

    def on_step_end(self, iteration, trials, **info):
        self.line(trials)

    def line(self, trials, force: bool = False):
        now = time.time()
        if not force and now - self.last < self.every_s:
            return
        self.last = now
        ended = dict(self.ended)
        for t in trials:  # trials that ended in an earlier (interrupted) session of this sweep
            if t.config["key"] not in ended and t.status in ("TERMINATED", "ERROR"):
                ended[t.config["key"]] = "done" if t.status == "TERMINATED" else "failed"
        done = sum(v == "done" for v in ended.values())
        failed = len(ended) - done
        running = [t.config["key"] for t in trials if t.status == "RUNNING" and t.config["key"] not in ended]
        shares = [f"{100 * self.latest[k] / self.steps[k]:.0f} %" for k in running if k in self.latest and k in self.steps]
        how_far = f" ({', '.join(shares)})" if 0 < len(shares) <= 4 else ""
        eta = ""
        # work = steps x each trial's cost per step, all trials, this session
        trained = sum((self.latest[k] - self.first[k]) * self.work.get(k, 1.0) for k in self.latest)
        left = sum((n - self.latest.get(k, 0)) * self.work[k] for k, n in self.steps.items() if k not in ended)
        if trained > 0 and left > 0:
            eta = f", ETA ~{left / (trained / (now - self.start)) / 60:.1f} min"
        best = f", best {self.metric}={self.best[0]:.4f} ({self.best[1]})" if self.best else ""
        print(f"[sweep {self.name}] {done}/{self.n_trials} done, {len(running)} running{how_far}, {failed} failed, "
              f"{now - self.start:.0f}s{eta}{best}", flush=True)
