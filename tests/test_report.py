"""Stability reports and ablation tables (smet_lab.report): pure tables/plots on a hand-made runs
DataFrame, then one real `+sweep=smoke` run (module fixture) read back through MLflow and checked
against the runs' own metrics, the CLI, and the HTML in headless Chromium."""

from __future__ import annotations

import base64
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from smet_lab.report import (SweepInfo, build_report, cell_stats, headline, load_spec, partial_note, pivot_table,
                             spec_table, sweep_info_from_params, trial_table, update_deltas, with_missing)
from smet_lab.report.__main__ import main as report_main
from smet_lab.report.specs import SpecError, merge_sweeps, write_spec_table
from smet_lab.report.specs import _ordered
from smet_lab.report.tables import pivot_numbers, trial_notes
from smet_lab.sweep.grid import trial_key

PPL, SPIKE, JUMP = "summary/final_val_ppl", "summary/spike_score", "summary/mean_probe_jump"
SEEDS = [0, 1, 2]
CELLS = [("naive_dst", 0.1), ("naive_dst", 0.5), ("smet", 0.1), ("smet", 0.5)]


# ------------------------------------------------------------------------------ hand-made sweep
def history(seed: int, spike_at: int | None = None, steps: int = 60, every: int = 10, window: int = 3) -> pd.DataFrame:
    """A short decaying loss with topology updates every `every` steps and probe rows after each."""
    rng = np.random.default_rng(seed)
    step = np.arange(1, steps + 1)
    loss = 5.0 * np.exp(-step / 80) + rng.normal(0, 0.003, steps)
    if spike_at:
        loss[spike_at - 1] *= 1.5
    df = pd.DataFrame({"step": step, "train/loss": loss})
    df["val/loss"] = np.where(step % 30 == 0, loss - 0.05, np.nan)
    df["topo/density"] = np.where(step % every == 0, 0.25, np.nan)
    probe = np.full(steps, np.nan)
    for u in range(every, steps + 1, every):
        for j in range(window + 1):
            if u + j <= steps:
                probe[u + j - 1] = 4.0 - 0.01 * u + 0.02 * j
    df["stability/probe_loss"] = probe
    return df


def run_row(method, density, seed, status="FINISHED", ppl=math.nan, spike=math.nan, jump=math.nan, error=None):
    values = {"method": method, "sparsity.density": density, "train.seed": seed}
    return {"run_id": f"r{method}{density}{seed}", "trial": trial_key(values), "status": status, "error": error,
            "history": history(seed, spike_at=40 if status == "DIVERGED" else None), **values,
            "optim.regrow.warmup_steps": 0 if method == "naive_dst" else 100, PPL: ppl, SPIKE: spike, JUMP: jump,
            "summary/final_val_loss": math.log(ppl) if ppl == ppl else math.nan,
            "summary/memory/state_ratio_vs_dense_adam": 0.2 + density, "summary/tokens_per_s": 1000.0}


def hand_made() -> tuple[SweepInfo, pd.DataFrame]:
    """Four cells x three seeds asked. naive_dst@0.1: three seeds; naive_dst@0.5: one finished, one
    diverged, one failed (with numbers that must not be averaged in); smet@0.1: two seeds, the third
    missing; smet@0.5: three equal seeds."""
    rows = [run_row("naive_dst", 0.1, s, ppl=p, spike=sp, jump=0.05) for s, p, sp in
            zip(SEEDS, [10.0, 12.0, 14.0], [0.1, 0.2, 0.3])]
    rows += [run_row("naive_dst", 0.5, 0, ppl=20.0, spike=0.4, jump=0.06),
             run_row("naive_dst", 0.5, 1, "DIVERGED", ppl=math.nan, spike=1.0, jump=9.0,
                     error="training diverged: loss is nan at step 41"),
             run_row("naive_dst", 0.5, 2, "FAILED", ppl=999.0, spike=0.9, jump=5.0, error="RuntimeError: boom")]
    rows += [run_row("smet", 0.1, s, ppl=p, spike=0.0, jump=j) for s, p, j in zip([0, 1], [9.0, 11.0], [0.01, 0.03])]
    rows += [run_row("smet", 0.5, s, ppl=8.0, spike=0.05, jump=0.02) for s in SEEDS]
    expected = [(trial_key(v), v) for v in ({"method": m, "sparsity.density": d, "train.seed": s}
                                            for m, d in CELLS for s in SEEDS)]
    info = SweepInfo(name="hand", status="FINISHED", n_trials=12, seeds=SEEDS, swept=["method", "sparsity.density"],
                     expected=expected)
    return info, pd.DataFrame(rows)


KEYS = ["method", "sparsity.density"]


def cell(stats, method, density):
    row = stats[(stats["method"] == method) & (stats["sparsity.density"] == density)]
    assert len(row) == 1
    return row.iloc[0]


def test_cell_stats_mean_std_seed_counts_and_flags():
    info, runs = hand_made()
    runs = with_missing(runs, info)
    assert len(runs) == 12 and (runs["status"] == "MISSING").sum() == 1
    stats = cell_stats(runs, KEYS, seeds_asked=info.seeds_asked)
    assert list(zip(stats["method"], stats["sparsity.density"])) == CELLS
    a = cell(stats, "naive_dst", 0.1)
    assert (a["n"], a["flagged"], a["seeds"]) == (3, False, [0, 1, 2])
    assert a[f"{PPL}:mean"] == pytest.approx(12.0) and a[f"{PPL}:std"] == pytest.approx(2.0)
    assert a[f"{SPIKE}:mean"] == pytest.approx(0.2) and a[f"{SPIKE}:std"] == pytest.approx(0.1)
    b = cell(stats, "naive_dst", 0.5)  # the diverged and failed seeds are counted, never averaged in
    assert (b["n"], b["n_diverged"], b["n_failed"], b["flagged"]) == (1, 1, 1, True)
    assert b[f"{PPL}:mean"] == 20.0 and math.isnan(b[f"{PPL}:std"])
    assert b[f"{SPIKE}:mean"] == pytest.approx(0.4) and b[f"{JUMP}:mean"] == pytest.approx(0.06)
    c = cell(stats, "smet", 0.1)
    assert (c["n"], c["n_unfinished"], c["flagged"], c["seeds"]) == (2, 1, True, [0, 1])
    assert c[f"{PPL}:mean"] == pytest.approx(10.0) and c[f"{PPL}:std"] == pytest.approx(math.sqrt(2.0))
    d = cell(stats, "smet", 0.5)
    assert (d["n"], d["flagged"]) == (3, False) and d[f"{PPL}:std"] == 0.0

    numbers = pivot_numbers(stats, KEYS)
    assert numbers.loc[1, "seeds"] == "0" and bool(numbers.loc[1, "flagged"]) is True
    # Without an explicit count, the seeds asked are the distinct seeds seen (3 here).
    assert cell(cell_stats(runs, KEYS), "smet", 0.1)["asked"] == 3


def test_pivot_and_trial_tables_list_failed_and_diverged_runs():
    info, runs = hand_made()
    runs = with_missing(runs, info)
    stats = cell_stats(runs, KEYS, seeds_asked=3)
    pivot = pivot_table(stats, KEYS)
    by = {(r["method"], r["sparsity.density"]): r for _, r in pivot.iterrows()}
    assert by[("naive_dst", "0.1")]["final val ppl"] == "12.00 ± 2.00"
    assert by[("naive_dst", "0.1")]["seeds"] == "3/3" and by[("naive_dst", "0.1")]["not averaged"] == ""
    assert by[("naive_dst", "0.5")]["final val ppl"] == "20.00"
    assert by[("naive_dst", "0.5")]["seeds"] == "1/3*"
    assert by[("naive_dst", "0.5")]["not averaged"] == "1 diverged, 1 failed"
    assert by[("smet", "0.1")]["seeds"] == "2/3*" and by[("smet", "0.1")]["not averaged"] == "1 missing"
    assert by[("smet", "0.5")]["final val ppl"] == "8.00 ± 0.00"

    trials = trial_table(runs, KEYS)
    assert len(trials) == 12
    statuses = trials.groupby("status").size().to_dict()
    assert statuses == {"FINISHED": 9, "DIVERGED": 1, "FAILED": 1, "MISSING": 1}
    failed = trials[trials["status"] == "FAILED"].iloc[0]
    assert failed["final val ppl"] == "999.00"  # shown as logged, with its status, but not in any mean
    notes = trial_notes(runs, KEYS)
    assert any("DIVERGED: training diverged" in n for n in notes) and any("FAILED: RuntimeError: boom" in n for n in notes)
    assert any("seed=2 — MISSING" in n for n in notes)


def test_headline_names_the_most_stable_and_the_best_with_numbers():
    info, runs = hand_made()
    stats = cell_stats(with_missing(runs, info), KEYS, seeds_asked=3)
    text = headline(stats, KEYS)
    assert text == ("Most stable: smet, sparsity.density=0.1 (mean probe jump +0.0200, spike score 0.000, 2 seeds); "
                    "best: smet, sparsity.density=0.5 (final val ppl 8.00 ± 0.00 vs 10.00 for the next best, "
                    "smet, sparsity.density=0.1); not ranked: 1 diverged and 1 failed runs.")
    only_failed = runs[runs["status"] == "FAILED"]
    assert headline(cell_stats(only_failed, KEYS), KEYS, only_failed).startswith("No configuration has a finished run")


def test_partial_note_for_running_interrupted_and_incomplete_sweeps():
    info, runs = hand_made()
    full = with_missing(runs, info)
    assert "11 of 12 trials have ended (1 missing)" in partial_note(info, full)
    complete = runs[runs["trial"] != "nothing"].copy()
    info.expected, info.n_trials = None, 11
    assert partial_note(info, complete) is None
    info.status = "RUNNING"
    assert "still running" in partial_note(info, complete)
    info.status, info.n_trials = "KILLED", 14
    note = partial_note(info, complete)
    assert "interrupted (parent run KILLED)" in note and "11 of 14 trials have ended (3 never started)" in note


def test_sweep_info_from_parent_params_gives_axes_seeds_and_the_grid():
    params = {"sweep.name": "density", "sweep.params.sparsity.density": "[0.1, 0.5]",
              "sweep.params.method": "[naive_dst, smet]",
              "sweep.extra_trials": "[{'method': 'dense', 'sparsity': {'density': 1.0}}]",
              "sweep.seeds": "[0, 1]", "sweep.metric": "summary/final_val_loss", "sweep.mode": "min", "n_trials": "10"}
    info = sweep_info_from_params("density", params)
    assert info.swept == ["method", "sparsity.density"] and info.seeds == [0, 1] and info.n_trials == 10
    keys = [k for k, _ in info.expected]
    assert len(keys) == 10 and "method=dense,sparsity.density=1.0,seed=1" in keys
    assert "method=naive_dst,sparsity.density=0.1,seed=0" in keys


def test_update_deltas_relative_to_the_probe_just_before_each_update():
    h = history(0, steps=30, every=10, window=3)
    d = update_deltas(h)
    assert sorted(d["update_step"].unique()) == [10, 20, 30]
    first = d[d["update_step"] == 10]
    assert list(first["offset"]) == [0, 1, 2, 3]
    assert first["delta"].to_numpy() == pytest.approx([0.0, 0.02, 0.04, 0.06])
    assert list(d[d["update_step"] == 30]["offset"]) == [0]  # the run ended right after this update
    assert update_deltas(h.drop(columns=["stability/probe_loss"])).empty


def test_spec_table_in_paper_layout(tmp_path):
    info, runs = hand_made()
    spec_path = tmp_path / "ablation.yaml"
    spec_path.write_text("title: Ablation\nsweep: hand\nrows: method\ncolumns: sparsity.density\n"
                         "metric: summary/final_val_ppl\nformat: '{:.1f}'\nbetter: min\nrow_order: [smet, naive_dst]\n"
                         "row_labels: {smet: SMET}\ncolumn_title: density\n")
    spec = load_spec(spec_path)
    assert spec.name == "ablation" and spec.sweep == ["hand"]
    only_bad = run_row("naive_dst", 0.9, 0, "DIVERGED")
    runs = pd.concat([with_missing(runs, info), pd.DataFrame([only_bad])], ignore_index=True)
    table, notes, bold = spec_table(spec, runs, seeds_asked=3)
    assert list(table.columns) == ["method \\ density", "0.1", "0.5", "0.9"]
    assert table.iloc[0].tolist() == ["SMET", "10.0 ± 1.4*", "8.0 ± 0.0", "—"]
    assert table.iloc[1].tolist() == ["naive_dst", "12.0 ± 2.0", "20.0*†", "diverged"]
    assert bold == {(0, "0.1"), (0, "0.5")}
    assert any("fewer finished seeds" in n for n in notes) and any("diverged or failed" in n for n in notes)
    paths = write_spec_table(spec, runs, tmp_path / "tables", seeds_asked=3, sources="sweep hand")
    md, csv, tex = (p.read_text() for p in paths)
    assert "| SMET | **10.0 ± 1.4*** | **8.0 ± 0.0** | — |" in md and "Source: sweep hand." in md
    assert pd.read_csv(paths[1]).iloc[1, 3] == "diverged"
    assert r"\textbf{10.0 $\pm$ 1.4*}" in tex and r"20.0*$^\dagger$" in tex and r"\begin{tabular}{lrrr}" in tex
    # Duplicated (row, column, seed) across sweeps: the first sweep listed wins.
    merged = merge_sweeps([runs.iloc[:3], runs.iloc[:3].assign(**{PPL: 1.0})], ["method", "sparsity.density"])
    assert len(merged) == 3 and merged[PPL].tolist() == [10.0, 12.0, 14.0]
    # Without an explicit order numeric columns read ascending (the dense reference at 1.0 last), text as given.
    assert _ordered([1.0, 0.1, 0.25], None) == [0.1, 0.25, 1.0] and _ordered(["smet", "dense"], None) == ["smet", "dense"]
    assert _ordered([1.0, 0.1, 0.25], [0.25]) == [0.25, 1.0, 0.1]
    (tmp_path / "bad.yaml").write_text("sweep: x\nrows: method\nmetric: m\ncolum: typo\n")
    with pytest.raises(SpecError, match="unknown key"):
        load_spec(tmp_path / "bad.yaml")


def test_shipped_table_specs_load():
    root = Path(__file__).resolve().parent.parent / "analysis"
    specs = {p.stem: load_spec(p) for p in sorted(root.glob("*.yaml"))}
    assert set(specs) == {"ablation_components", "warmup", "lr_scaling", "update_every", "stability_probe_jump",
                          "stability_update_spike_rate", "stability_spike_score"}
    assert specs["stability_update_spike_rate"].metric == "summary/update_spike_rate"
    assert specs["ablation_components"].rows == "method" and specs["ablation_components"].columns == "sparsity.density"
    assert specs["ablation_components"].metric == PPL
    assert specs["warmup"].columns == "optim.regrow.warmup_steps"
    assert specs["lr_scaling"].rows == "optim.lr_scaling.rule"
    assert specs["update_every"].columns == "sparsity.update_every"


def img_sources(html: str) -> list[str]:
    return re.findall(r"<img[^>]*\ssrc=\"([^\"]*)\"", html)


def check_inline_images(html: str) -> int:
    """Every <img> is an inline PNG that decodes; nothing points at a file."""
    import io

    from PIL import Image

    sources = img_sources(html)
    for src in sources:
        assert src.startswith("data:image/png;base64,"), src[:80]
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True))) as im:
            im.verify()
    assert not re.search(r"(src|href)=\"(?!data:)[^\"]+\"", html)
    return len(sources)


def test_build_report_from_a_hand_made_sweep(tmp_path):
    info, runs = hand_made()
    info.status = "RUNNING"
    out = build_report(info, runs, tmp_path / "rep")
    names = {p.name for p in out.iterdir()}
    assert {"report.md", "report.html", "trials.csv", "trials.md", "pivot.csv", "pivot.md", "pivot.tex",
            "loss_curves.png", "update_zoom.png", "val_ppl_vs_density.png", "memory_vs_density.png"} <= names
    assert "probe_jump_vs_warmup.png" not in names  # W is not swept here
    md = (out / "report.md").read_text()
    assert "Partial report: the sweep is still running" in md and "Most stable: smet, sparsity.density=0.1" in md
    html = (out / "report.html").read_text()
    assert check_inline_images(html) == 4
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 12 and set(trials["status"]) == {"FINISHED", "DIVERGED", "FAILED", "MISSING"}
    # W swept (and nothing else but the method): the W plot appears, the density plots do not.
    info2 = SweepInfo(name="w", status="FINISHED", seeds=SEEDS, swept=["method", "optim.regrow.warmup_steps"])
    names2 = {p.name for p in build_report(info2, runs, tmp_path / "rep2").iterdir()}
    assert "probe_jump_vs_warmup.png" in names2 and "val_ppl_vs_density.png" not in names2


def test_report_cli_usage_errors_are_one_line(tmp_path, capsys):
    assert report_main(["nosuch", "--tracking-uri", f"sqlite:///{tmp_path}/none.db"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("smet_lab: error: no MLflow database at") and err.count("\n") == 1
    with pytest.raises(SystemExit) as exc:
        report_main(["--bogus"])
    assert exc.value.code == 2 and capsys.readouterr().err.startswith("smet_lab: error: unrecognized arguments")
    assert report_main(["--tracking-uri", "sqlite:///x.db"]) == 2


def test_report_of_an_experiment_without_a_sweep_parent(tmp_path, capsys):
    """Single runs (`python -m smet_lab ...`, no parent): the swept keys are inferred, keys a method preset
    sets (they differ between methods only) are not taken for axes."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("single", artifact_location=str(tmp_path / "artifacts"))
    for method, density, ppl in [("naive_dst", 0.1, 30.0), ("naive_dst", 0.5, 25.0), ("smet", 0.1, 20.0),
                                 ("smet", 0.5, 18.0)]:
        run_id = client.create_run(exp, tags={"smet.kind": "run", "smet.method": method}).info.run_id
        for key, value in {"method": method, "sparsity.density": density, "train.seed": 0,
                           "optim.lr_scaling.rule": "none" if method == "naive_dst" else "inverse"}.items():
            client.log_param(run_id, key, value)
        client.log_metric(run_id, PPL, ppl)
        for step in range(1, 6):
            client.log_metric(run_id, "train/loss", 5.0 - 0.1 * step, step=step)
        client.set_terminated(run_id)
    assert report_main(["single", "--tracking-uri", uri, "--out", str(tmp_path / "rep")]) == 0
    assert "report of sweep single" in capsys.readouterr().out
    trials = pd.read_csv(tmp_path / "rep" / "trials.csv")
    assert list(trials.columns[:5]) == ["trial", "method", "sparsity.density", "train.seed", "status"]
    assert trials[PPL].tolist() == [30.0, 25.0, 20.0, 18.0] and set(trials["status"]) == {"FINISHED"}
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "swept keys: method, sparsity.density" in md and "best: smet, sparsity.density=0.5" in md
    assert "loss_curves.png" in md  # drawn from MLflow's metric history (no metrics.parquet artifact)


# ------------------------------------------------------------------------------- a real sweep
@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One `+sweep=smoke` run (40 steps, two methods) in a subprocess; its report is built by the runner."""
    tmp = tmp_path_factory.mktemp("report_smoke")
    args = ["+sweep=smoke", "train.max_steps=40", f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"ray.storage={tmp}/sw",
            f"hydra.run.dir={tmp}/out"]
    proc = subprocess.run([sys.executable, "-m", "smet_lab", *args], cwd=tmp, capture_output=True, text=True,
                          timeout=400, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return tmp, proc


def independent_runs(tmp: Path) -> pd.DataFrame:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    return mlflow.search_runs(search_all_experiments=True)


def test_sweep_writes_its_report_and_logs_it_to_the_parent(smoke):
    tmp, proc = smoke
    out = tmp / "sw" / "smoke" / "report"
    assert f"[sweep smoke] report: {out / 'report.html'}" in proc.stdout
    assert "warning: no report" not in proc.stderr
    assert {"report.md", "report.html", "trials.csv", "pivot.csv", "pivot.tex", "loss_curves.png",
            "update_zoom.png"} <= {p.name for p in out.iterdir()}
    from mlflow.tracking import MlflowClient

    runs = independent_runs(tmp)
    parent = runs[runs["tags.smet.kind"] == "sweep"].iloc[0]
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    logged = {a.path for a in client.list_artifacts(parent["run_id"], "report")}
    assert {"report/report.html", "report/report.md", "report/trials.csv", "report/loss_curves.png"} <= logged
    md = (out / "report.md").read_text()
    assert "Partial report" not in md and "parent status: FINISHED" in md  # built before the parent closed


def test_report_numbers_match_the_runs_own_metrics(smoke):
    tmp, _ = smoke
    runs = independent_runs(tmp)
    children = runs[runs["tags.smet.kind"] == "trial"].set_index("tags.smet.trial_key")
    trials = pd.read_csv(tmp / "sw" / "smoke" / "report" / "trials.csv").set_index("trial")
    assert sorted(trials.index) == sorted(children.index) == ["method=naive_dst,seed=0", "method=smet,seed=0"]
    metrics = [PPL, "summary/final_val_loss", SPIKE, "summary/spike_events", JUMP, "summary/max_probe_jump",
               "summary/mean_regrow_update_ratio", "summary/memory/state_ratio_vs_dense_adam", "summary/tokens_per_s"]
    for key, row in trials.iterrows():
        assert row["status"] == children.loc[key, "tags.smet.status"] == "FINISHED"
        assert row["method"] == children.loc[key, "params.method"]
        for m in metrics:
            assert row[m] == pytest.approx(children.loc[key, f"metrics.{m}"], rel=1e-9), (key, m)
    pivot = pd.read_csv(tmp / "sw" / "smoke" / "report" / "pivot.csv").set_index("method")
    for key, child in children.iterrows():  # one seed per cell: the mean is the run's own value
        cell_row = pivot.loc[child["params.method"]]
        assert cell_row["n"] == 1 and not cell_row["flagged"]
        assert cell_row[f"{PPL}:mean"] == pytest.approx(child[f"metrics.{PPL}"])
    best = children.sort_values(f"metrics.{PPL}").iloc[0]
    other = children.sort_values(f"metrics.{PPL}").iloc[1]
    md = (tmp / "sw" / "smoke" / "report" / "report.md").read_text()
    assert (f"{best['params.method']} is both" in md or f"best: {best['params.method']} " in md)
    assert f"final val ppl {best[f'metrics.{PPL}']:.2f} vs {other[f'metrics.{PPL}']:.2f}" in md
    table_md = (tmp / "sw" / "smoke" / "report" / "trials.md").read_text()
    assert f"| {best[f'metrics.{PPL}']:.2f} |" in table_md


def test_report_cli_resolves_sweep_name_run_id_and_experiment(smoke, tmp_path, capsys):
    tmp, _ = smoke
    uri = f"sqlite:///{tmp}/mlflow.db"
    runs = independent_runs(tmp)
    parent_id = runs[runs["tags.smet.kind"] == "sweep"].iloc[0]["run_id"]
    reference = pd.read_csv(tmp / "sw" / "smoke" / "report" / "trials.csv")
    for target in ("smoke", parent_id, "smet_lab"):
        out = tmp_path / target
        assert report_main([target, "--tracking-uri", uri, "--out", str(out), "--no-log"]) == 0
        assert f"report of sweep smoke: {out / 'report.html'}" in capsys.readouterr().out
        pd.testing.assert_frame_equal(pd.read_csv(out / "trials.csv"), reference)
    assert report_main(["nosuch", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert err.startswith("smet_lab: error: no sweep, experiment or parent run 'nosuch'") and err.count("\n") == 1
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).create_experiment("empty")
    assert report_main(["empty", "--tracking-uri", uri]) == 2
    assert capsys.readouterr().err == "smet_lab: error: experiment 'empty' has no runs\n"


def test_partial_report_of_a_running_sweep_with_a_lost_trial(smoke, tmp_path):
    """A copy of the database where the parent is still RUNNING and one trial's run is gone."""
    tmp, _ = smoke
    shutil.copy(tmp / "mlflow.db", tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    from mlflow.tracking import MlflowClient

    from smet_lab.report.build import report_for_target

    runs = independent_runs(tmp_path)
    client = MlflowClient(uri)
    client.update_run(runs[runs["tags.smet.kind"] == "sweep"].iloc[0]["run_id"], status="RUNNING")
    client.delete_run(runs[runs["tags.smet.method"] == "naive_dst"].iloc[0]["run_id"])
    info, out = report_for_target(uri, "smoke", tmp_path / "rep", log=False)
    md = (out / "report.md").read_text()
    assert "Partial report: the sweep is still running" in md and "1 of 2 trials have ended (1 missing)" in md
    trials = pd.read_csv(out / "trials.csv")
    assert dict(zip(trials["method"], trials["status"])) == {"naive_dst": "MISSING", "smet": "FINISHED"}


def test_tables_cli_renders_a_spec_from_the_sweep(smoke, tmp_path, capsys):
    tmp, _ = smoke
    spec = tmp_path / "smoke_ppl.yaml"
    spec.write_text("sweep: smoke\nrows: method\ncolumns: sparsity.density\nmetric: summary/final_val_ppl\n"
                    "format: '{:.3f}'\nbetter: min\n")
    uri = f"sqlite:///{tmp}/mlflow.db"
    assert report_main(["--tables", str(spec), "--tracking-uri", uri, "--out", str(tmp_path / "t")]) == 0
    csv = pd.read_csv(tmp_path / "t" / "smoke_ppl.csv", dtype=str).set_index("method \\ sparsity.density")
    runs = independent_runs(tmp)
    for _, child in runs[runs["tags.smet.kind"] == "trial"].iterrows():
        assert csv.loc[child["params.method"], child["params.sparsity.density"]] == f"{child[f'metrics.{PPL}']:.3f}"
    assert {"smoke_ppl.md", "smoke_ppl.csv", "smoke_ppl.tex"} <= {p.name for p in (tmp_path / "t").iterdir()}
    # The shipped specs name sweeps this database does not have: a one-line error per table, exit 2.
    assert report_main(["--tables", "--tracking-uri", uri, "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "table ablation_components skipped" in err and err.strip().splitlines()[-1].startswith("smet_lab: error:")


def test_report_html_renders_in_headless_chromium(smoke, tmp_path):
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if binary is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install -y chromium)")
    tmp, _ = smoke
    page = tmp / "sw" / "smoke" / "report" / "report.html"
    html = page.read_text()
    assert check_inline_images(html) >= 2  # loss curves + update zoom, both inline
    shot = tmp_path / "report.png"
    proc = subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                           "--window-size=1200,2000", "--enable-logging=stderr", f"file://{page}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    assert "ERR_FILE_NOT_FOUND" not in proc.stderr and "Not allowed to load local resource" not in proc.stderr
    assert not re.search(r"CONSOLE\(\d+\)", proc.stderr), proc.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1200, 2000)
        pixels = np.asarray(im.convert("L"), dtype=float)
    assert pixels.std() > 10  # not a blank page
    assert (pixels < 128).mean() > 0.01  # text, tables and plots drew dark pixels
