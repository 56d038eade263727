"""What a report is built from: SweepInfo (what the sweep asked for) and the runs DataFrame.

Pure pandas: no MLflow here (smet_lab.report.io reads MLflow into these), so every table and plot can
be built and tested from a hand-made frame.

The runs DataFrame has one row per trial run, with columns
- `run_id`, `trial` (the trial key, e.g. "method=smet,sparsity.density=0.25,seed=0"), `status`
  (FINISHED | DIVERGED | FAILED | KILLED | RUNNING | MISSING), `error`;
- every config param under its dotted name, values parsed to int/float/bool where they look like one
  (`method`, `sparsity.density`, `train.seed`, ...);
- the run-level metrics under their MLflow keys (`summary/final_val_ppl`, ... see smet_lab.metrics); the
  report adds POSITIVE_PROBE_JUMP (with_positive_jump), the only one not logged by the run;
- `history`: the run's per-step history (metrics.parquet) as a DataFrame, or None.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from smet_lab.grid import SweepConfig, expand, leaves
from smet_lab.metrics import FINAL_VAL_LOSS, MEAN_PROBE_JUMP, PARAMETERS, POSITIVE_PROBE_JUMP

SEED = "train.seed"
FINISHED, DIVERGED, FAILED, KILLED, RUNNING, MISSING = "FINISHED", "DIVERGED", "FAILED", "KILLED", "RUNNING", "MISSING"
ENDED = (FINISHED, DIVERGED, FAILED)  # a trial in one of these has nothing left to run
BASE_COLUMNS = ["run_id", "trial", "status", "error", "history"]

PROBE_JUMP = "stability/probe_jump"  # the history column: one value per topology update
CONFIG_SECTIONS = ("method", "model.", "data.", "sparsity.", "optim.", "train.")


@dataclass
class SweepInfo:
    """The sweep a report is about, as its parent MLflow run describes it (all optional but the name)."""

    name: str
    uri: str = ""
    experiment: str | None = None
    parent_run_id: str | None = None
    status: str | None = None  # the parent run's status (RUNNING, FINISHED, KILLED, ...); None: no parent
    sweep_dir: str | None = None
    n_trials: int | None = None  # the grid size
    seeds: list | None = None  # the seeds asked for (sweep.seeds)
    swept: list = field(default_factory=list)  # dotted keys the sweep varies (method first; seed excluded)
    metric: str = FINAL_VAL_LOSS
    mode: str = "min"
    expected: list | None = None  # [(trial key, {dotted key: value})] of the whole grid, when known
    left_out: int = 0  # an experiment's older runs that a newer run of the same cell and seed repeats
    run_dirs: list = field(default_factory=list)  # single runs' output folders it was read from

    @property
    def from_folder(self) -> bool:
        """Read from the sweep's folder (smet_lab.report.folder), not from MLflow."""
        return not self.uri and self.sweep_dir is not None

    @property
    def kind(self) -> str:
        """What the report is of: a sweep (a parent run or a sweep's folder), an experiment's single runs,
        or single runs' output folders (a run, runs)."""
        if self.run_dirs:
            return "run" if len(self.run_dirs) == 1 else "runs"
        return "sweep" if self.parent_run_id or self.from_folder else "experiment"

    @property
    def seeds_asked(self) -> int | None:
        return len(self.seeds) if self.seeds else None


# ----------------------------------------------------------------------------------------- values
def parse_value(text):
    """An MLflow param string as the value it was: int, float, bool or None where it reads as one."""
    if not isinstance(text, str):
        return text
    if text in ("True", "true"):
        return True
    if text in ("False", "false"):
        return False
    if text == "None":
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _yaml(text):
    import yaml

    try:
        return yaml.safe_load(text) if isinstance(text, str) else text
    except yaml.YAMLError:
        return None


def sweep_info_from_params(name: str, params: dict[str, str], **fields) -> SweepInfo:
    """SweepInfo from a parent run's params (`sweep.params.<dotted key>`, `sweep.extra_trials`,
    `sweep.seeds`, `sweep.metric`, `sweep.mode`, `n_trials`: the flattened sweep config)."""
    nested: dict = {}
    for key, text in params.items():
        if key.startswith("sweep.params.") and key != "sweep.params":
            node = nested
            *path, leaf = key[len("sweep.params."):].split(".")
            for part in path:
                node = node.setdefault(part, {})
            node[leaf] = _yaml(text)
    extra = _yaml(params.get("sweep.extra_trials", "[]"))
    extra = [e for e in extra if isinstance(e, dict)] if isinstance(extra, list) else []
    seeds = _yaml(params.get("sweep.seeds"))
    seeds = seeds if isinstance(seeds, list) and seeds else None
    swept = list(leaves(nested))
    for e in extra:
        swept += [k for k in leaves(e) if k not in swept]
    swept = [k for k in swept if k != SEED]
    swept.sort(key=lambda k: k != "method")  # stable: method first, the rest as the sweep lists them
    n = parse_value(params.get("n_trials"))
    info = SweepInfo(name=name, n_trials=n if isinstance(n, int) else None, seeds=seeds, swept=swept,
                     metric=params.get("sweep.metric", FINAL_VAL_LOSS), mode=params.get("sweep.mode", "min"),
                     **fields)
    try:  # the grid itself, so missing trials can be named
        trials = expand(SweepConfig(name=name, params=nested, extra_trials=extra, seeds=seeds or [0]))
        info.expected = [(t.key, dict(t.values)) for t in trials]
    except Exception:  # a truncated or odd param: the count (n_trials) still says what is missing
        info.expected = None
    return info


def newest_per_seed(runs: pd.DataFrame, keys: list) -> tuple[pd.DataFrame, int]:
    """Of the runs with the same values of `keys` and seed (the same setting run again), the newest, an
    ended one before an unfinished one: an experiment's report counts a re-run once, never as another
    seed. Returns (the runs kept, in their order; how many were left out)."""
    cols = [k for k in [*keys, SEED] if k in runs]
    if runs.empty or not cols or "start_time" not in runs:
        return runs, 0
    same = runs[cols].apply(lambda row: repr(tuple(row)), axis=1)
    ranked = runs.assign(_same=same, _ended=runs["status"].isin(ENDED)).sort_values(["_ended", "start_time"],
                                                                                     kind="stable")
    kept = ranked.drop_duplicates("_same", keep="last").sort_index().drop(columns=["_same", "_ended"])
    return kept, len(runs) - len(kept)


def infer_swept(runs: pd.DataFrame) -> list:
    """Without a parent run: `method` plus the config keys that vary within some method's runs (keys a
    method preset sets vary only between methods, so they are not taken for sweep axes)."""
    if runs.empty:
        return []
    keys = ["method"] if "method" in runs else []
    for col in runs.columns:
        if col in ("method", SEED) or not col.startswith(CONFIG_SECTIONS) or "/" in col:
            continue
        values = runs[col].map(repr)
        groups = values.groupby(runs["method"].map(repr)) if "method" in runs else [(None, values)]
        if any(g.nunique() > 1 for _, g in groups):
            keys.append(col)
    return keys


# -------------------------------------------------------------------------------------- the frame
def empty_runs() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="object") for c in BASE_COLUMNS})


def with_missing(runs: pd.DataFrame, info: SweepInfo) -> pd.DataFrame:
    """The runs with their grid values, plus one MISSING row per grid trial that has no run yet (grid
    known from the parent). A config-group axis (`model=small`) names no config key, so no param holds
    its value: the grid does."""
    if not info.expected:
        return runs
    have = set(runs["trial"]) if "trial" in runs else set()
    groups = {k for _, values in info.expected for k in values if "." not in k and k not in runs}
    if groups and have:
        runs = runs.copy()
        by_trial = dict(info.expected)
        for key in groups:
            runs[key] = [by_trial.get(trial, {}).get(key) for trial in runs["trial"]]
    rows = [{"run_id": None, "trial": key, "status": MISSING, "error": None, "history": None, **values}
            for key, values in info.expected if key not in have]
    if not rows:
        return runs
    missing = pd.DataFrame(rows)
    return pd.concat([runs, missing], ignore_index=True) if len(runs) else missing


def method_rank(value) -> float:
    from smet_lab.methods import METHODS

    names = list(METHODS)
    return names.index(value) if value in names else len(names)


def _sort_key(col: pd.Series) -> pd.Series:
    if col.name == "method":
        return col.map(method_rank)
    numeric = pd.to_numeric(col, errors="coerce")
    if numeric.notna().sum() == col.notna().sum():
        return numeric
    # Numbers inside names compare as numbers: llama_20m before llama_130m.
    return col.map(lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v))
                   else re.sub(r"\d+", lambda m: m.group().zfill(12), str(v)))


def sort_runs(runs: pd.DataFrame, keys: list) -> pd.DataFrame:
    """By the swept keys (methods in their canonical order, models by size where every run has its size,
    numbers numerically, names naturally), then seed."""
    keys = [k for k in [*keys, SEED] if k in runs]
    if not keys or runs.empty:
        return runs.reset_index(drop=True)
    size = pd.to_numeric(runs[PARAMETERS], errors="coerce") if "model" in keys and PARAMETERS in runs else None
    if size is not None and size.notna().all():
        keys = ["_size" if k == "model" else k for k in keys]
        runs = runs.assign(_size=size)
    out = runs.sort_values(keys, key=_sort_key, kind="stable", na_position="last").reset_index(drop=True)
    return out.drop(columns="_size", errors="ignore")


def cell_label(values: dict, keys: list) -> str:
    """"smet, sparsity.density=0.25": the method bare, other keys as key=value."""
    parts = []
    for k in keys:
        v = values.get(k)
        parts.append(fmt_value(v) if k == "method" else f"{k}={fmt_value(v)}")
    return ", ".join(parts) if parts else "all runs"


def fmt_value(v) -> str:
    """A key's value as text: floats in their shortest form (0.25, 1, 1e-08), missing as an em dash."""
    if v is None or (isinstance(v, (float, np.floating)) and math.isnan(v)):
        return "—"
    if isinstance(v, (float, np.floating)) and not isinstance(v, bool):
        return f"{float(v):g}"
    return str(v)


def positive_probe_jump(history, mean_jump=math.nan) -> float:
    """Mean of max(jump, 0) over the run's topology updates: a jump <= 0 (the probe loss kept falling)
    counts as no spike, so falling faster after one update cannot offset a spike after another.
    Without probe jumps in the history: max(mean_jump, 0), a lower bound of the same number."""
    if isinstance(history, pd.DataFrame) and PROBE_JUMP in history:
        jumps = pd.to_numeric(history[PROBE_JUMP], errors="coerce").dropna().to_numpy(float)
        if len(jumps):
            return float(np.maximum(jumps, 0.0).mean())
    mean_jump = pd.to_numeric(mean_jump, errors="coerce")
    return max(float(mean_jump), 0.0) if pd.notna(mean_jump) else math.nan


def with_positive_jump(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs with the POSITIVE_PROBE_JUMP column (from each run's history, else its logged mean jump)."""
    jumps = runs[MEAN_PROBE_JUMP] if MEAN_PROBE_JUMP in runs else pd.Series(math.nan, index=runs.index)
    values = [positive_probe_jump(h, j) for h, j in zip(histories(runs), jumps)]
    return runs.assign(**{POSITIVE_PROBE_JUMP: pd.Series(values, index=runs.index, dtype="float64")})


def histories(runs: pd.DataFrame) -> pd.Series:
    """The history column with None for runs without one."""
    if "history" not in runs:
        return pd.Series([None] * len(runs), index=runs.index, dtype="object")
    return runs["history"].map(lambda h: h if isinstance(h, pd.DataFrame) and not h.empty else None)


def from_history(history: pd.DataFrame, logged: dict) -> dict:
    """The metrics recomputable from the history that the run did not log (failed, killed or still
    running trials log no summary): spike and probe metrics, and registered metrics with a compute."""
    from smet_lab.metrics import METRICS, computed
    from smet_lab.spikes import run_spike_summary

    missing = [k for k, m in METRICS.items() if m.from_history and not math.isfinite(logged.get(k, math.nan))]
    if not missing:
        return {}
    found = run_spike_summary(history) if "train/loss" in history else {}
    if any(METRICS[k].compute for k in missing):  # compute() takes the trainer's rows: one dict per step, no NaN
        found.update(computed([{k: v for k, v in row.items() if pd.notna(v)} for row in history.to_dict("records")]))
    return {k: found[k] for k in missing if k in found}


def with_history_metrics(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs with from_history's values filled in where a run has a history but did not log them."""
    runs = runs.copy()
    for index, history in histories(runs).items():
        if history is None:
            continue
        row = runs.loc[index]
        logged = {k: v for k, v in row.items() if isinstance(v, (int, float, np.floating)) and not isinstance(v, bool)}
        for key, value in from_history(history, logged).items():
            if key not in runs:
                runs[key] = math.nan
            runs.at[index, key] = value
    return runs
