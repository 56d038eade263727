"""The report read from a sweep's folder alone (smet_lab.report.folder): tracking=none, or a folder
without its database. Folders are built by hand here, in the layout the sweep runner writes (the real
sweep: test_sweep.py::test_a_sweep_without_tracking_still_knows_how_its_trials_ended)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from helpers import run_to_a_gone_reader

from smet_lab.metrics import METRICS
from smet_lab.report.folder import load_folder
from smet_lab.report.io import load_run_dirs, load_sweep_runs
from smet_lab.sweep.folder import STATUS_FILE, SUMMARY_FILE, SWEEP_FILE, TRIAL_FILE, sweep_lock, write_grid

KEYS = ["method=naive_dst,sparsity.density=0.25,seed=0", "method=smet,sparsity.density=0.25,seed=0",
        "method=smet,sparsity.density=0.5,seed=0"]
SWEEP = {"sweep": {"name": "dens", "params": {"method": ["naive_dst", "smet"], "sparsity": {"density": [0.25, 0.5]}},
                   "extra_trials": [], "seeds": [0], "metric": "summary/final_val_loss", "mode": "min"},
         "n_trials": 4}
USER_METRIC = "summary/last_train_loss"


def config(key: str) -> dict:
    values = dict(part.split("=") for part in key.split(","))
    return {"method": values["method"], "sparsity": {"density": float(values["sparsity.density"]), "block_size": 1},
            "train": {"seed": int(values["seed"]), "max_steps": 30}}


def history(jumps: list[float], steps: int = 30) -> list[dict]:
    """The trainer's rows: a falling train loss, a probe jump at each update (every 10 steps)."""
    rows = [{"step": s, "train/loss": 5.0 - 0.02 * s} for s in range(1, steps + 1)]
    for i, jump in enumerate(jumps):
        rows[10 * (i + 1) - 1].update({"topo/density": 0.25, "stability/probe_jump": jump})
    return rows


def sweep_folder(root, extensions=()) -> object:
    """Trial 0 finished (final checkpoint with summary.json), trial 1 stopped after its step-20
    checkpoint (history inside state.pt), trial 2 never started; the sweep's 4th trial is not in grid.json."""
    folder = root / "dens"
    folder.mkdir(parents=True)
    (folder / "grid.json").write_text(json.dumps({k: config(k) for k in KEYS}))
    (folder / SWEEP_FILE).write_text(json.dumps({**SWEEP, "extensions": list(extensions)}))
    (folder / STATUS_FILE).write_text(json.dumps({KEYS[0]: {"status": "FINISHED", "error": None}}))
    final = folder / "tune" / "run_trial_0" / "checkpoint_000001"
    final.mkdir(parents=True)
    (final / TRIAL_FILE).write_text(json.dumps({"trial": KEYS[0], "step": 30}))
    (final / SUMMARY_FILE).write_text(json.dumps({"status": "FINISHED", "error": None,
                                                  "summary": {"summary/final_val_loss": 4.25, "summary/mean_probe_jump": 0.5}}))
    pd.DataFrame(history([0.25, 0.75])).to_parquet(final / "metrics.parquet")
    older = folder / "tune" / "run_trial_0" / "checkpoint_000000"  # an older checkpoint of the same trial
    older.mkdir()
    (older / TRIAL_FILE).write_text(json.dumps({"trial": KEYS[0], "step": 10}))
    torch.save({"history": history([9.0], steps=10)}, older / "state.pt")
    # Trial 1's checkpoints as Ray Train keeps them (ray.workers_per_trial > 1): the newest step wins.
    for name, steps, jumps in (("checkpoint_000003", 10, [0.125]), ("checkpoint_000004", 20, [0.125, -0.5])):
        stopped = folder / "train" / "train-1" / "TorchTrainer_0" / name
        stopped.mkdir(parents=True)
        (stopped / TRIAL_FILE).write_text(json.dumps({"trial": KEYS[1], "step": steps}))
        torch.save({"history": history(jumps, steps=steps), "model": {"w": torch.zeros(4)}}, stopped / "state.pt")
    return folder


def test_a_folder_gives_every_grid_trial_with_its_status_summary_and_history(tmp_path):
    info, runs = load_folder(sweep_folder(tmp_path))
    runs = runs.set_index("trial")
    assert list(runs.index) == KEYS and list(runs["status"]) == ["FINISHED", "KILLED", "MISSING"]
    assert (info.name, info.n_trials, info.status, info.seeds, info.swept) == (
        "dens", 4, "KILLED", [0], ["method", "sparsity.density"])
    assert sorted(k for k, _ in info.expected) == sorted([*KEYS, "method=naive_dst,sparsity.density=0.5,seed=0"])
    done, stopped, never = (runs.loc[k] for k in KEYS)
    assert done["summary/final_val_loss"] == 4.25 and done["sparsity.density"] == 0.25 and done["method"] == "naive_dst"
    assert list(done["history"]["stability/probe_jump"].dropna()) == [0.25, 0.75]  # the final checkpoint, not the older
    assert len(stopped["history"]) == 20 and stopped["error"] == "sweep interrupted"
    assert never["history"] is None and pd.isna(never["summary/final_val_loss"])


def test_an_unfinished_trials_metrics_are_recomputed_from_its_checkpoint(tmp_path):
    _, runs = load_sweep_runs(f"sqlite:///{tmp_path}/no.db", str(sweep_folder(tmp_path)))
    runs = runs.set_index("trial")
    assert runs.loc[KEYS[1], "summary/mean_probe_jump"] == pytest.approx(np.mean([0.125, -0.5]))
    assert runs.loc[KEYS[1], "summary/max_probe_jump"] == pytest.approx(0.125)
    assert runs.loc[KEYS[0], "summary/mean_probe_jump"] == 0.5  # logged values are kept


def test_a_running_driver_makes_unfinished_trials_running(tmp_path):
    folder = sweep_folder(tmp_path)
    with sweep_lock(tmp_path, "dens"):
        info, runs = load_folder(folder)
    assert info.status == "RUNNING" and list(runs["status"]) == ["FINISHED", "RUNNING", "RUNNING"]
    info, _ = load_folder(folder)  # the lock released
    assert info.status == "KILLED"


def test_a_checkpoint_without_trial_file_is_matched_by_its_config(tmp_path):
    """Folders written before checkpoints carried trial.json: the config a checkpoint holds names its trial."""
    folder = sweep_folder(tmp_path)
    final = folder / "tune" / "run_trial_0" / "checkpoint_000001"
    (final / TRIAL_FILE).unlink()
    (final / "config.yaml").write_text(yaml.safe_dump({**config(KEYS[0]), "tracking": {"enabled": False}}))
    for stopped in (folder / "train").glob("**/checkpoint_*"):  # trial 1's training checkpoints: config.json
        (stopped / TRIAL_FILE).unlink()
        (stopped / "config.json").write_text(json.dumps({**config(KEYS[1]), "tracking": {"enabled": False}}))
    _, runs = load_folder(folder)
    runs = runs.set_index("trial")
    assert runs.loc[KEYS[0], "summary/final_val_loss"] == 4.25
    assert runs.loc[KEYS[1], "status"] == "KILLED"  # not MISSING: its newest checkpoint (step 20) is read
    assert list(runs.loc[KEYS[1], "history"]["step"])[-1] == 20


def test_the_sweeps_extensions_compute_a_users_metric_for_an_unfinished_trial(tmp_path):
    """The extensions are imported before the metrics are recomputed: a user's metric with a compute
    gets its value for the trial that logged no summary."""
    rules = tmp_path / "my_metric.py"
    rules.write_text("from smet_lab.extend import register_metric\n"
                     f"register_metric({USER_METRIC!r}, 'last train loss', '{{:.3f}}', 'lower', 'The last train loss.',\n"
                     "                compute=lambda rows: [r['train/loss'] for r in rows if 'train/loss' in r][-1])\n")
    saved = dict(METRICS)
    try:
        _, runs = load_sweep_runs(f"sqlite:///{tmp_path}/no.db", str(sweep_folder(tmp_path, [str(rules)])))
    finally:
        METRICS.clear()
        METRICS.update(saved)
    assert runs.set_index("trial").loc[KEYS[1], USER_METRIC] == pytest.approx(5.0 - 0.02 * 20)


def report_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "smet_lab.report", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_report_cli_builds_from_a_folder_without_a_database(tmp_path):
    folder = sweep_folder(tmp_path / "sweeps")
    proc = report_cli(str(folder), "--tracking-uri", f"sqlite:///{tmp_path}/no.db", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (f"smet_lab: report of sweep dens: {folder / 'report' / 'report.html'} (read from "
                                   f"its folder's files: sqlite:///{tmp_path}/no.db does not have it)")
    md = (folder / "report" / "report.md").read_text()
    assert "sweep status: KILLED" in md and "Partial report: the sweep was interrupted; run the same command" in md
    assert "1 of 4 trials have ended" in md and not (tmp_path / "no.db").exists()
    trials = pd.read_csv(folder / "report" / "trials.csv").set_index("trial")
    assert trials.loc[KEYS[0], "summary/final_val_loss"] == 4.25 and len(trials) == 4
    # By name: the sweep's folder in the default storage (sweeps/NAME), for the report and for the tables.
    proc = report_cli("dens", "--out", "by_name", cwd=tmp_path)
    assert proc.returncode == 0 and (tmp_path / "by_name" / "report.md").read_text().startswith("# Stability report: sweep `dens`")
    # Its one line of output to a reader that has gone (`| head -0`): the report is written all the same.
    gone = run_to_a_gone_reader([sys.executable, "-m", "smet_lab.report", "dens", "--out", "to_head"], cwd=tmp_path)
    assert gone.returncode == 141 and gone.stderr == "", gone.stderr
    undated = lambda folder: [l for l in (tmp_path / folder / "report.md").read_text().splitlines() if "generated" not in l]
    assert undated("to_head") == undated("by_name")
    (tmp_path / "spec.yaml").write_text("sweep: dens\nrows: method\ncolumns: sparsity.density\nmetric: summary/final_val_loss\n")
    proc = report_cli("--tables", "spec.yaml", "--out", "tables", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(tmp_path / "tables" / "spec.csv")
    assert table.values.tolist() == [["naive_dst", "4.2500", "not run"], ["smet", "not run", "not run"]]
    assert f"Source: sweep dens (folder {folder}, KILLED)." in (tmp_path / "tables" / "spec.md").read_text()
    # A spec whose second sweep is nowhere: built from the first, with how to run the missing one.
    (tmp_path / "two.yaml").write_text("sweep: [dens, warmup]\nrows: method\nmetric: summary/final_val_loss\n")
    proc = report_cli("--tables", "two.yaml", "--out", "tables", cwd=tmp_path)
    assert proc.returncode == 0 and (tmp_path / "tables" / "two.csv").is_file()
    assert proc.stderr == ("smet_lab: warning: table two: sweep(s) warmup not found; built from the others; "
                           "run `python -m smet_lab +sweep=warmup`\n")
    assert not (tmp_path / "mlflow.db").exists()


def test_a_folder_that_is_no_sweep_is_one_line(tmp_path):
    import mlflow

    (tmp_path / "plain").mkdir()
    db = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.MlflowClient(tracking_uri=db).create_experiment("e")
    proc = report_cli(str(tmp_path / "plain"), "--tracking-uri", db, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"{tmp_path / 'plain'} is neither a sweep's folder (no grid.json there) nor a run's" in proc.stderr


def run_folder(root, name: str, method: str, jumps: list[float], ended: bool, mtime: float):
    """A single run's output folder as run_single leaves it: .hydra/, checkpoints/ (each with the run's
    config.json and its history in state.pt), and at its end config.yaml, metrics.parquet and
    summary.json; a run killed hard has only the first two."""
    folder = root / name
    step = folder / "checkpoints" / "step_20"
    step.mkdir(parents=True)
    (folder / ".hydra").mkdir()
    run_config = config(f"method={method},sparsity.density=0.25,seed=0")
    (step / "config.json").write_text(json.dumps(run_config))
    rows = history(jumps, steps=20)
    torch.save({"history": rows}, step / "state.pt")
    written = [step / "config.json", step / "state.pt"]
    if ended:
        (folder / "config.yaml").write_text(yaml.safe_dump({**run_config, "tracking": {"enabled": False},
                                                            "extensions": []}))
        pd.DataFrame(rows).to_parquet(folder / "metrics.parquet")
        (folder / SUMMARY_FILE).write_text(json.dumps({"status": "FINISHED", "error": None,
                                                       "summary": {"summary/final_val_loss": 4.5}}))
        written.append(folder / "config.yaml")
    for path in written:
        os.utime(path, (mtime, mtime))
    return folder


def test_run_folders_are_one_report_a_rerun_counted_once(tmp_path):
    """Two finished runs of one setting and seed (the newer counts) and a run killed hard: its status,
    and its metrics recomputed from its checkpoint's history."""
    old = run_folder(tmp_path, "old-smet", "smet", [9.0, 9.0], ended=True, mtime=1_000)
    new = run_folder(tmp_path, "new-smet", "smet", [0.25, 0.75], ended=True, mtime=2_000)
    hard = run_folder(tmp_path, "killed-naive", "naive_dst", [0.5, -0.25], ended=False, mtime=1_500)
    info, runs = load_run_dirs([old, hard, new])
    assert (info.kind, info.name, info.left_out, info.swept) == ("runs", "3 runs", 1, ["method"])
    runs = runs.set_index("trial")
    assert list(runs.index) == [str(hard), str(new)] and list(runs["status"]) == ["KILLED", "FINISHED"]
    assert runs.loc[str(new), "summary/final_val_loss"] == 4.5
    assert runs.loc[str(new), "summary/mean_probe_jump"] == pytest.approx(0.5)  # (0.25 + 0.75) / 2
    assert runs.loc[str(hard), "summary/mean_probe_jump"] == pytest.approx(0.125)  # from state.pt's history
    assert runs.loc[str(hard), "error"].startswith("no summary.json: stopped before its end")
    assert runs.loc[str(hard), "sparsity.density"] == 0.25  # its config from its checkpoint (no config.yaml)
    proc = report_cli(str(old), str(hard), str(new), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (out,) = (tmp_path / "reports").iterdir()
    assert proc.stdout.strip() == f"smet_lab: report of 3 runs: reports/{out.name}/report.html (read from the runs' folders)"
    md = (out / "report.md").read_text()
    assert md.startswith("# Stability report: 3 runs\n") and "- runs left out: 1 older run(s)" in md
    assert "\n- differing keys: method\n" in md and "Running each setting again with train.seed=1" in md
    one = report_cli(str(new), cwd=tmp_path)
    md = (new / "report" / "report.md").read_text()
    assert one.returncode == 0 and md.startswith("# Stability report: run `new-smet`") and "- differing keys: —\n" in md
    mixed = report_cli(str(new), str(sweep_folder(tmp_path)), cwd=tmp_path)
    assert mixed.returncode == 2 and mixed.stderr.strip().count("\n") == 0
    assert f"{tmp_path / 'dens'}: a sweep's folder (a report of several targets reads single runs' output" in mixed.stderr


def test_write_grid_records_the_sweep_for_the_report(tmp_path):
    from smet_lab.grid import SweepConfig, expand

    trials = expand(SweepConfig(name="s", params={"method": ["smet"]}, seeds=[0, 1]))
    write_grid(tmp_path, trials, {t.key: {"method": "smet", "train": {"seed": t.values["train.seed"]}} for t in trials},
               {**SWEEP, "extensions": ["/x/rules.py"]})
    assert json.loads((tmp_path / SWEEP_FILE).read_text())["extensions"] == ["/x/rules.py"]
    info, runs = load_folder(tmp_path)
    assert list(runs["status"]) == ["MISSING", "MISSING"] and list(runs["train.seed"]) == [0, 1]


def test_usage_errors_name_the_sweeps_there_are(tmp_path, monkeypatch, capsys):
    from smet_lab.report.__main__ import main

    sweep_folder(tmp_path / "sweeps")
    monkeypatch.chdir(tmp_path)
    assert main([]) == 2
    assert capsys.readouterr().err == ("smet_lab: error: give a sweep name, a sweep folder, an experiment name, a "
                                       "parent run id or run folders (or --tables); sweep folders in sweeps/: dens\n")
    assert main(["dense"]) == 2
    assert capsys.readouterr().err == ("smet_lab: error: no sweep folder dense or sweeps/dense, and no MLflow database "
                                       f"at {tmp_path / 'mlflow.db'} (--tracking-uri sqlite:///mlflow.db); sweep "
                                       "folders in sweeps/: dens; did you mean dens?\n")


@pytest.mark.e2e
def test_real_runs_report_the_numbers_they_printed(tmp_path):
    """Two real runs (tracking=none) and the report of their folders: each row's final val loss is the
    one its run printed, its mean probe jump the mean of the jumps in its metrics.parquet."""
    import re

    from helpers import run_cli

    folders, printed = [], {}
    for method in ("smet", "naive_dst"):
        folder = tmp_path / method
        proc = run_cli(["train.max_steps=30", "sparsity.update_every=10", "train.probe_window=10", "tracking=none",
                        f"method={method}",
                        f"hydra.run.dir={folder}"], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        printed[str(folder)] = float(re.search(r"final val loss ([\d.]+)", proc.stdout).group(1))
        folders.append(str(folder))
    proc = report_cli(*folders, "--out", str(tmp_path / "rep"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = pd.read_csv(tmp_path / "rep" / "trials.csv").set_index("trial")
    assert sorted(rows.index) == sorted(folders) and set(rows["status"]) == {"FINISHED"}
    for folder in folders:
        jumps = pd.read_parquet(f"{folder}/metrics.parquet")["stability/probe_jump"].dropna()
        assert len(jumps) == 2  # updates at steps 10 and 20
        assert rows.loc[folder, "summary/final_val_loss"] == pytest.approx(printed[folder], abs=5e-5)
        assert rows.loc[folder, "summary/mean_probe_jump"] == pytest.approx(jumps.mean())
