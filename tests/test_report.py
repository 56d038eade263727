"""Stability reports and ablation tables (smet_lab.report): pure tables/plots on a hand-made runs
DataFrame, then one real `+sweep=smoke` run (module fixture) read back through MLflow and checked
against the runs' own metrics, the CLI, and the HTML in headless Chromium."""

from __future__ import annotations

import base64
import math
from html import escape as html_escape
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import run_cli
from smet_lab.report import (SweepInfo, build_report, cell_stats, headline, load_spec, partial_note, pivot_table,
                             spec_table, sweep_info_from_params, trial_table, update_deltas, with_missing)
from smet_lab.report.__main__ import main as report_main
from smet_lab.report.specs import SpecError, default_specs, merge_sweeps, write_spec_table
from smet_lab.report.specs import _ordered
from smet_lab.metrics import METRICS, table_metrics
from smet_lab.report.data import positive_probe_jump, with_positive_jump
from smet_lab.report.glossary import glossary
from smet_lab.report.plots import loss_curves_figure, overlay_figure
from smet_lab.report.tables import INDISTINCT, STABILITY_KEYS, pivot_numbers, ranked, trial_notes
from smet_lab.grid import trial_key

PPL, SPIKE, JUMP = "summary/final_val_ppl", "summary/spike_score", "summary/mean_probe_jump"
RATE, POS = "summary/update_spike_rate", "summary/mean_positive_probe_jump"
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


def test_a_config_group_axis_is_a_column_from_the_grid_and_sorts_naturally():
    """`model=llama_20m` names no config key, so no param holds it: the grid's values make the column, and
    two models never merge into one cell as if they were seeds."""
    values = [{"method": "smet", "model": m, "train.seed": 0} for m in ("llama_130m", "llama_20m", "tiny")]
    info = SweepInfo(name="models", status="FINISHED", n_trials=3, seeds=[0], swept=["method", "model"],
                     expected=[(trial_key(v), v) for v in values])
    runs = pd.DataFrame([{"run_id": f"r{i}", "trial": trial_key(v), "status": "FINISHED", "error": None, "history": None,
                          "method": "smet", "train.seed": 0, PPL: ppl} for i, (v, ppl) in enumerate(zip(values, [9.0, 12.0, 30.0]))])
    full = with_missing(runs, info)
    assert list(full["model"]) == ["llama_130m", "llama_20m", "tiny"] and len(full) == 3
    stats = cell_stats(full, ["method", "model"], seeds_asked=1)
    assert list(stats["model"]) == ["llama_20m", "llama_130m", "tiny"]  # no sizes: by name, 20 before 130
    assert list(stats["n"]) == [1, 1, 1] and list(stats[f"{PPL}:mean"]) == [12.0, 9.0, 30.0]
    # The scaling plot: the models in order of their size (summary/parameters), each at its perplexity.
    from smet_lab.report.plots import MODEL_KEY, metric_vs_axis_figure

    full["summary/parameters"] = [1.3e8, 2.0e7, 1.0e5]
    assert list(cell_stats(full, ["method", "model"], seeds_asked=1)["model"]) == ["tiny", "llama_20m", "llama_130m"]
    fig = metric_vs_axis_figure(full, info, MODEL_KEY, PPL, "ppl vs model", order_by="summary/parameters")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["tiny", "llama_20m", "llama_130m"]
    x, y = ax.lines[0].get_data()
    assert list(x) == [1.0e5, 2.0e7, 1.3e8] and list(y) == [30.0, 12.0, 9.0] and ax.get_xscale() == "log"
    full.loc[0, "summary/parameters"] = 2.0e7  # two models of one size: evenly spaced, in order of size
    ax = metric_vs_axis_figure(full, info, MODEL_KEY, PPL, "ppl vs model", order_by="summary/parameters").axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["tiny", "llama_130m", "llama_20m"]
    assert list(ax.lines[0].get_data()[1]) == [30.0, 9.0, 12.0] and ax.get_xscale() == "linear"
    full.loc[0, "summary/parameters"] = math.nan  # a size missing: the names in the runs' order, evenly spaced
    ax = metric_vs_axis_figure(full, info, MODEL_KEY, PPL, "ppl vs model", order_by="summary/parameters").axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["llama_130m", "llama_20m", "tiny"]
    assert list(ax.lines[0].get_data()[0]) == [0, 1, 2]


def test_an_experiments_rerun_of_a_setting_and_seed_counts_once(tmp_path):
    """Single runs reported as an experiment: the same setting and seed run twice is one run (the newest; an
    ended one before an unfinished one), not two seeds with a spread of zero."""
    from smet_lab.report.data import newest_per_seed

    rows = [run_row("smet", 0.1, 0, ppl=9.0), run_row("smet", 0.1, 0, ppl=8.0), run_row("smet", 0.1, 1, ppl=10.0),
            run_row("smet", 0.1, 0, "KILLED"), run_row("naive_dst", 0.1, 0, ppl=12.0)]
    runs = pd.DataFrame(rows).assign(start_time=[1, 2, 3, 4, 5])
    kept, left_out = newest_per_seed(runs, KEYS)
    assert left_out == 2 and list(kept["start_time"]) == [2, 3, 5]  # seed 0 of smet: the newest ended run
    stats = cell_stats(kept, KEYS)
    assert cell(stats, "smet", 0.1)["seeds"] == [0, 1] and cell(stats, "smet", 0.1)[f"{PPL}:mean"] == 9.0
    info = SweepInfo(name="smet_lab", experiment="smet_lab", swept=KEYS, left_out=left_out)
    md = (build_report(info, kept, tmp_path / "rep") / "report.md").read_text()
    assert "- runs left out: 2 older run(s) of a setting and seed that a newer run repeats" in md


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
    # No update spike rate logged: ranked by mean positive jump, smet@0.1 (0.01, 0.03) and smet@0.5 (0.02 x 3)
    # tie at 0.02; ppl 8 ± 0 vs 10 ± 1.41: |8 - 10| = 2 > 0 + 1.41, told apart.
    assert text == ("Most stable: smet, sparsity.density=0.1 (mean positive probe jump 0.0200 ± 0.0141, 2 seeds) and "
                    "the runner-up smet, sparsity.density=0.5 (mean positive probe jump 0.0200 ± 0.0000, 3 seeds) are "
                    "indistinguishable (within the seeds' spread); unequal seed counts (2 vs 3 seeds). "
                    "Best: smet, sparsity.density=0.5 (final val ppl 8.00 ± 0.00, 3 seeds), ahead of the next best "
                    "smet, sparsity.density=0.1 (final val ppl 10.00 ± 1.41, 2 seeds) by more than the seeds' spread "
                    "in final val ppl; unequal seed counts (3 vs 2 seeds). Not ranked: 1 diverged and 1 failed runs.")
    only_failed = runs[runs["status"] == "FAILED"]
    assert headline(cell_stats(only_failed, KEYS), KEYS, only_failed).startswith("No configuration has a finished run")


def jump_history(jumps) -> pd.DataFrame:
    """A run history whose topology updates (every 10 steps) logged these probe jumps."""
    steps = np.arange(1, 10 * len(jumps) + 1)
    h = pd.DataFrame({"step": steps, "train/loss": 4.0 - 0.01 * steps})
    h["stability/probe_jump"] = np.nan
    h.loc[steps % 10 == 0, "stability/probe_jump"] = jumps
    return h


def stability_runs(cells: dict) -> pd.DataFrame:
    """Finished runs from {method: [(update spike rate, mean probe jump, jumps or None, ppl) per seed]}."""
    rows = []
    for method, seeds in cells.items():
        for seed, (rate, jump, jumps, ppl) in enumerate(seeds):
            rows.append({"run_id": f"{method}{seed}", "trial": f"method={method},seed={seed}", "status": "FINISHED",
                         "error": None, "history": None if jumps is None else jump_history(jumps), "method": method,
                         "train.seed": seed, RATE: rate, JUMP: jump, PPL: ppl})
    return pd.DataFrame(rows)


def stable_sentence(runs) -> str:
    return headline(cell_stats(runs, ["method"]), ["method"]).split(". Best:")[0]


def test_positive_probe_jump_from_the_history_else_the_clipped_logged_mean():
    assert positive_probe_jump(jump_history([0.05, -0.07])) == pytest.approx(0.025)  # signed mean: -0.01
    assert positive_probe_jump(jump_history([-0.01, -0.02, 0.0])) == 0.0
    assert positive_probe_jump(None, -0.01) == 0.0 and positive_probe_jump(None, 0.003) == pytest.approx(0.003)
    assert math.isnan(positive_probe_jump(None)) and math.isnan(positive_probe_jump(None, None))
    no_probe = pd.DataFrame({"step": [1, 2], "train/loss": [4.0, 3.9]})
    assert positive_probe_jump(no_probe, 0.004) == pytest.approx(0.004)
    runs = stability_runs({"smet": [(0.0, -0.01, [0.05, -0.07], 9.0), (0.0, 0.002, None, 9.0)]})
    assert with_positive_jump(runs)[POS].tolist() == pytest.approx([0.025, 0.002])


def test_a_negative_mean_probe_jump_is_never_ranked_more_stable():
    # naive_dst: mean jump -0.01 (the loss kept falling on average), but half its updates spiked.
    # smet: mean jump +0.002, no update spike. Ranking by the signed jump would pick naive_dst.
    runs = stability_runs({"naive_dst": [(0.5, -0.01, None, 9.0)] * 3, "smet": [(0.0, 0.002, None, 9.0)] * 3})
    stats = cell_stats(runs, ["method"])
    assert stats.set_index("method")[f"{POS}:mean"].to_dict() == pytest.approx({"naive_dst": 0.0, "smet": 0.002})
    text = stable_sentence(runs)
    assert text.startswith("Most stable: smet (update spike rate 0.00 ± 0.00, mean positive probe jump "
                           "0.0020 ± 0.0000, 3 seeds), ahead of the runner-up naive_dst (update spike rate 0.50 ± 0.00")
    assert text.endswith("by more than the seeds' spread in update spike rate")
    # Equal update spike rates: the positive jump decides. From the history, naive_dst's -0.01 mean hides a
    # +0.05 spike (positive mean 0.025 > 0.002), so smet stays ahead.
    runs = stability_runs({"naive_dst": [(0.0, -0.01, [0.05, -0.07], 9.0)] * 2, "smet": [(0.0, 0.002, None, 9.0)] * 2})
    assert stable_sentence(runs).startswith("Most stable: smet (")
    assert "in mean positive probe jump" in stable_sentence(runs)
    # Without histories, a jump <= 0 counts as no spike: 0 beats 0.002, but -0.05 does not beat -0.01.
    runs = stability_runs({"naive_dst": [(0.0, -0.05, None, 9.0)] * 2, "smet": [(0.0, -0.01, None, 9.0)] * 2,
                           "static": [(0.0, 0.002, None, 9.0)] * 2})
    ranked_rows = ranked(cell_stats(runs, ["method"]), STABILITY_KEYS)
    assert ranked_rows["method"].tolist() == ["naive_dst", "smet", "static"]  # the tie keeps the table order
    assert "and the runner-up smet (" in stable_sentence(runs) and INDISTINCT in stable_sentence(runs)


@pytest.mark.parametrize("a, b", [([0.1, 0.2, 0.3], [0.2, 0.3, 0.4]), ([0.0, 0.0, 0.1], [0.5, 0.6, 0.7]),
                                  ([0.0, 0.1], [0.3, 0.4, 0.5]), ([0.2, 0.2, 0.2], [0.25, 0.25, 0.25]),
                                  ([0.0, 0.4], [0.3, 0.5])])
def test_headline_tells_cells_apart_only_beyond_the_seeds_spread(a, b):
    runs = stability_runs({"smet": [(r, 0.001, None, 9.0) for r in a], "naive_dst": [(r, 0.001, None, 9.0) for r in b]})
    text = stable_sentence(runs)
    apart = abs(np.mean(a) - np.mean(b)) > np.std(a, ddof=1) + np.std(b, ddof=1)
    assert text.startswith("Most stable: smet (") and f"{len(a)} seeds)" in text and f"{len(b)} seeds)" in text
    assert (INDISTINCT in text) == (not apart) and ("by more than the seeds' spread" in text) == apart
    assert ("unequal seed counts" in text) == (len(a) != len(b))
    if len(a) != len(b):
        assert f"unequal seed counts ({len(a)} vs {len(b)} seeds)" in text


def test_one_seed_per_cell_is_never_told_apart():
    runs = stability_runs({"smet": [(0.0, 0.001, None, 8.0)], "naive_dst": [(0.9, 0.2, None, 30.0)]})
    text = headline(cell_stats(runs, ["method"]), ["method"])
    assert text == ("Most stable: smet (update spike rate 0.00, mean positive probe jump 0.0010, 1 seed) and the "
                    "runner-up naive_dst (update spike rate 0.90, mean positive probe jump 0.2000, 1 seed) are "
                    "indistinguishable (within the seeds' spread): one seed has no spread, so no difference can be "
                    "claimed. Best: smet (final val ppl 8.00, 1 seed) and the next best naive_dst (final val ppl "
                    "30.00, 1 seed) are indistinguishable (within the seeds' spread).")  # the reason said once
    # Three seeds against one: still no claim, and the counts are named.
    runs = stability_runs({"smet": [(0.0, 0.001, None, 8.0)] * 3, "naive_dst": [(0.9, 0.2, None, 30.0)]})
    text = headline(cell_stats(runs, ["method"]), ["method"])
    assert text.count(INDISTINCT) == 2 and text.count("unequal seed counts (3 vs 1 seeds)") == 2


def test_cells_without_probe_jumps_are_not_ranked_for_stability():
    runs = stability_runs({"dense": [(math.nan, math.nan, None, 7.0)] * 2, "smet": [(0.1, 0.003, None, 9.0)] * 2})
    text = headline(cell_stats(runs, ["method"]), ["method"])
    assert text.startswith("Most stable: smet (update spike rate 0.10 ± 0.00, mean positive probe jump 0.0030 ± "
                           "0.0000, 2 seeds) (no other cell to compare). Best: dense (final val ppl 7.00 ± 0.00")
    dense = stability_runs({"dense": [(math.nan, math.nan, None, 7.0)] * 2})
    assert headline(cell_stats(dense, ["method"]), ["method"]).startswith(
        "Stability: no finished run has probe jumps (no topology update, or none followed by a whole probe window), "
        "so none is ranked. Best: dense")


def test_partial_note_for_running_interrupted_and_incomplete_sweeps():
    info, runs = hand_made()
    full = with_missing(runs, info)
    assert "11 of 12 trials have ended (1 missing)" in partial_note(info, full)
    complete = full[full["status"] != "MISSING"]  # the trials that ran: a sweep of 11 that ended
    assert len(complete) == len(full) - 1
    info.expected, info.n_trials = None, 11
    assert partial_note(info, complete) is None
    info.status = "RUNNING"
    assert "still running" in partial_note(info, complete)
    info.status, info.n_trials = "KILLED", 14
    note = partial_note(info, complete)
    assert "still running" not in note and "11 of 14 trials have ended (3 never started)" in note
    info.parent_run_id = "p" * 32
    assert "interrupted (parent run KILLED); run the same command again" in partial_note(info, complete)
    info.status, info.n_trials = "FAILED", 11  # a sweep that ended with a failed trial was not interrupted
    assert partial_note(info, complete) is None


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
    specs = {p.stem: load_spec(p) for p in default_specs()}
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
    assert "- seeds asked: [0, 1, 2]" in md and "![Train loss of every cell overlaid" in md
    html = (out / "report.html").read_text()
    assert check_inline_images(html) == 5 and "<li>seeds asked: [0, 1, 2]</li>" in html
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 12 and set(trials["status"]) == {"FINISHED", "DIVERGED", "FAILED", "MISSING"}
    # W swept (and nothing else but the method): the W plot appears, the density plots do not.
    info2 = SweepInfo(name="w", status="FINISHED", seeds=SEEDS, swept=["method", "optim.regrow.warmup_steps"])
    names2 = {p.name for p in build_report(info2, runs, tmp_path / "rep2").iterdir()}
    assert "probe_jump_vs_warmup.png" in names2 and "val_ppl_vs_density.png" not in names2


def test_seeds_asked_are_printed_as_a_list(tmp_path):
    _, runs = hand_made()
    for seeds, shown in (([0], "[0]"), ([0, 1, 2], "[0, 1, 2]")):
        info = SweepInfo(name="s", status="FINISHED", seeds=seeds, swept=["method", "sparsity.density"])
        out = build_report(info, runs[runs["train.seed"].isin(seeds)], tmp_path / str(len(seeds)))
        md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
        assert f"- seeds asked: {shown}\n" in md and f"<li>seeds asked: {shown}</li>" in page
        # one seed: no mean ± std table repeating the trial table, a line saying how to get one instead
        for text in (md, page):
            assert ("One seed per cell: the trial table above is each cell" in text) == (len(seeds) == 1)
            assert ("Mean ± std (ddof=1) over the FINISHED runs" in text) == (len(seeds) > 1)
        assert len(pd.read_csv(out / "pivot.csv")) == 4  # the files keep the table either way


def test_overlay_draws_one_line_per_cell_with_the_mean_over_finished_seeds():
    info, runs = hand_made()
    # A cell whose only run diverged: drawn dashed from that run, not left out.
    runs = pd.concat([runs, pd.DataFrame([run_row("smet", 0.9, 0, "DIVERGED")])], ignore_index=True)
    fig = overlay_figure(runs, info)
    lines = [ln for ln in fig.axes[0].get_lines() if not ln.get_label().startswith("_")]
    assert len(fig.axes) == 1 and len(lines) == 5
    by_label = {ln.get_label(): ln for ln in lines}
    assert list(by_label) == ["naive_dst, sparsity.density=0.1 (3 seeds)", "naive_dst, sparsity.density=0.5 (1 seed)",
                              "smet, sparsity.density=0.1 (2 seeds)", "smet, sparsity.density=0.5 (3 seeds)",
                              "smet, sparsity.density=0.9 (1 seed, none finished: diverged)"]
    expected = np.mean([history(s)["train/loss"].to_numpy() for s in (0, 1)], axis=0)  # smet@0.1: seeds 0 and 1
    line = by_label["smet, sparsity.density=0.1 (2 seeds)"]
    assert line.get_xdata().tolist() == list(range(1, 61)) and line.get_ydata() == pytest.approx(expected)
    # naive_dst@0.5: the diverged and failed seeds (1, 2) are not averaged in.
    assert by_label["naive_dst, sparsity.density=0.5 (1 seed)"].get_ydata() == pytest.approx(history(0)["train/loss"])
    assert by_label["smet, sparsity.density=0.9 (1 seed, none finished: diverged)"].get_linestyle() == "--"
    assert overlay_figure(runs.assign(history=None), info) is None


def test_long_curves_are_smoothed_and_the_y_range_leaves_out_the_shared_drop():
    info, runs = hand_made()
    runs = runs[(runs["method"] == "smet") & (runs["sparsity.density"] == 0.1)]  # seeds 0 and 1
    raw = {s: history(s, steps=600)["train/loss"].to_numpy() for s in (0, 1)}
    runs = runs.assign(history=[history(s, steps=600) for s in runs["train.seed"]])

    def centred(y, half=5):  # 600 points / 60 -> a window of 10, made odd: 11 points, fewer at the ends
        return np.array([y[max(0, i - half): i + half + 1].mean() for i in range(len(y))])

    fig = overlay_figure(runs, info)
    ax = fig.axes[0]
    (line,) = [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]
    expected = centred((raw[0] + raw[1]) / 2)
    assert line.get_ydata() == pytest.approx(expected) and "centred mean over 11 logged steps" in ax.get_title()
    # y range: from the lowest point to the value after the first 10 % of the steps (the curve decays)
    low, high = expected.min(), expected[60]  # step 61 is the first at or after 1 + 0.1 * 599
    pad = 0.05 * (high - low)
    assert ax.get_ylim() == pytest.approx((low - pad, high + pad)) and expected[0] > high + pad
    # The panels: each seed smoothed (labelled) over its raw curve drawn faintly in the same colour.
    panel = loss_curves_figure(runs, info).axes[0]
    labelled = {ln.get_label(): ln for ln in panel.get_lines() if not ln.get_label().startswith("_")}
    faint = [ln for ln in panel.get_lines() if ln.get_alpha() == 0.25]
    for seed in (0, 1):
        smooth = labelled[f"sparsity.density=0.1, seed {seed}"]
        assert smooth.get_ydata() == pytest.approx(centred(raw[seed]))
        (under,) = [ln for ln in faint if ln.get_color() == smooth.get_color()]
        assert under.get_ydata() == pytest.approx(raw[seed])
        # its topology updates (every 10 steps) as ticks along the bottom edge, in axes coordinates
        (ticks,) = [ln for ln in panel.get_lines() if ln.get_marker() == "|" and ln.get_color() == smooth.get_color()]
        assert list(ticks.get_xdata()) == list(range(10, 601, 10)) and set(ticks.get_ydata()) == {0.015}
        assert ticks.get_transform() == panel.get_xaxis_transform()


def test_glossary_defines_every_metric_the_report_shows(tmp_path):
    labels = [METRICS[k].label for k in table_metrics()]
    assert labels == ["update spike rate", "mean positive probe jump", "mean probe jump", "max probe jump",
                      "spike score", "spike events", "regrow update ratio", "final val loss", "final val ppl",
                      "state memory / dense Adam", "tokens/s"]  # the report's columns, in this order
    assert list(trial_table(hand_made()[1], KEYS).columns) == ["method", "sparsity.density", "seed", "status", *labels]
    terms = dict(glossary())
    assert [t for t in terms if t in labels] == labels
    assert {"probe jump", "mean ± std", INDISTINCT} <= set(terms) and "train loss" not in terms
    assert "at least 1% of the probe loss" in terms["update spike rate"]  # metrics.UPDATE_SPIKE_THRESHOLD = 0.01
    assert "A jump <= 0 means the loss kept falling: no spike." in terms["probe jump"]
    assert "mean of max(probe jump, 0)" in terms["mean positive probe jump"].lower()
    assert "previous 50 steps" in terms["spike score"] and "12 B" in terms["state memory / dense Adam"]
    assert "more than the sum of their stds" in terms[INDISTINCT]
    assert set(dict(glossary(["loss_overlay.png"]))) - set(terms) == {"train loss"}
    assert set(dict(glossary(["loss_curves.png", "update_zoom.png"]))) - set(terms) == {"train loss", "val loss",
                                                                                          "probe loss"}
    assert set(dict(glossary(metrics=[PPL]))) == {"probe jump", "final val ppl", "mean ± std", INDISTINCT}

    info, runs = hand_made()
    out = build_report(info, runs, tmp_path / "rep")
    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    glossary_md = md.split("## Glossary\n", 1)[1]
    glossary_html = html.split("<h2>Glossary</h2>", 1)[1]
    shown = glossary(["loss_curves.png", "loss_overlay.png", "update_zoom.png"])
    for term, text in shown:
        assert f"- **{term}**: {text}\n" in glossary_md
        assert f"<dt>{html_escape(term)}</dt><dd>{html_escape(text)}</dd>" in glossary_html
    assert glossary_html.count("<dt>") == len(shown) == len(labels) + 6


def test_report_cli_usage_errors_are_one_line(tmp_path, capsys):
    assert report_main(["nosuch", "--tracking-uri", f"sqlite:///{tmp_path}/none.db"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("smet_lab: error: no sweep folder nosuch or sweeps/nosuch, and no MLflow database at "
                          f"{tmp_path / 'none.db'}") and err.count("\n") == 1
    with pytest.raises(SystemExit) as exc:
        report_main(["--bogus"])
    assert exc.value.code == 2 and capsys.readouterr().err.startswith("smet_lab: error: unrecognized arguments")
    assert report_main(["--tracking-uri", "sqlite:///x.db"]) == 2
    # A server that does not answer: one line in seconds (MLflow's client would retry for minutes).
    from helpers import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    for args in (["nosuch"], ["--tables"]):
        capsys.readouterr()
        assert report_main([*args, "--tracking-uri", uri]) == 2
        err = capsys.readouterr().err
        assert err == f"smet_lab: error: --tracking-uri {uri}: no MLflow server answers at {uri} " \
                      "(start one with `mlflow server --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 " \
                      "--port 5000` or use sqlite:///mlflow.db)\n"


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
    # A sweep in the same experiment (as `smet_lab` holds both by default): the experiment's report is of its
    # single runs, never of the sweep's parent or trials.
    parent = client.create_run(exp, tags={"smet.kind": "sweep", "smet.sweep": "other"}).info.run_id
    trial = client.create_run(exp, tags={"smet.kind": "trial", "mlflow.parentRunId": parent}).info.run_id
    client.log_param(trial, "method", "dense")
    client.log_metric(trial, PPL, 10.0)
    assert report_main(["single", "--tracking-uri", uri, "--out", str(tmp_path / "rep")]) == 0
    assert "report of experiment single" in capsys.readouterr().out
    trials = pd.read_csv(tmp_path / "rep" / "trials.csv")
    assert list(trials.columns[:5]) == ["trial", "method", "sparsity.density", "train.seed", "status"]
    assert trials[PPL].tolist() == [30.0, 25.0, 20.0, 18.0] and set(trials["status"]) == {"FINISHED"}
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "swept keys: method, sparsity.density" in md and "Best: smet, sparsity.density=0.5" in md
    assert md.startswith("# Stability report: the single runs of experiment `single`")
    assert "loss_curves.png" in md  # drawn from MLflow's metric history (no metrics.parquet artifact)


# ------------------------------------------------------------------------------- a real sweep
@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One `+sweep=smoke` run (40 steps, two methods) in a subprocess; its report is built by the runner."""
    tmp = tmp_path_factory.mktemp("report_smoke")
    args = ["+sweep=smoke", "train.max_steps=40", f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"ray.storage={tmp}/sw"]
    proc = run_cli(args, cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return tmp, proc


def independent_runs(tmp: Path) -> pd.DataFrame:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    return mlflow.search_runs(search_all_experiments=True)


@pytest.mark.e2e
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


@pytest.mark.e2e
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
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    for key, row in trials.iterrows():  # the ranking's positive jump, from the jumps MLflow holds
        jumps = [m.value for m in client.get_metric_history(children.loc[key, "run_id"], "stability/probe_jump")]
        assert jumps and row[POS] == pytest.approx(np.mean(np.maximum(jumps, 0.0)))
    best = children.sort_values(f"metrics.{PPL}").iloc[0]
    other = children.sort_values(f"metrics.{PPL}").iloc[1]
    md = (tmp / "sw" / "smoke" / "report" / "report.md").read_text()
    assert (f"Best: {best['params.method']} (final val ppl {best[f'metrics.{PPL}']:.2f}, 1 seed) and the next best "
            f"{other['params.method']} (final val ppl {other[f'metrics.{PPL}']:.2f}, 1 seed) are {INDISTINCT}") in md
    assert "- seeds asked: [0]\n" in md
    table_md = (tmp / "sw" / "smoke" / "report" / "trials.md").read_text()
    assert f"| {best[f'metrics.{PPL}']:.2f} |" in table_md


@pytest.mark.e2e
def test_report_cli_resolves_sweep_name_run_id_and_experiment(smoke, tmp_path, capsys):
    tmp, _ = smoke
    uri = f"sqlite:///{tmp}/mlflow.db"
    runs = independent_runs(tmp)
    parent_id = runs[runs["tags.smet.kind"] == "sweep"].iloc[0]["run_id"]
    reference = pd.read_csv(tmp / "sw" / "smoke" / "report" / "trials.csv")
    for target in ("smoke", parent_id, "smet_lab", str(tmp / "sw" / "smoke")):
        out = tmp_path / Path(target).name
        assert report_main([target, "--tracking-uri", uri, "--out", str(out), "--no-log"]) == 0
        assert f"report of sweep smoke: {out / 'report.html'}" in capsys.readouterr().out
        pd.testing.assert_frame_equal(pd.read_csv(out / "trials.csv"), reference)
    assert report_main(["nosuch", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert err.startswith("smet_lab: error: no sweep, experiment or parent run 'nosuch'") and err.count("\n") == 1
    assert "did you mean" not in err
    assert report_main(["smokee", "--tracking-uri", uri]) == 2  # a near miss of the sweep's name
    assert f"'smokee' in {uri}; did you mean smoke? (sweeps there: smoke;" in capsys.readouterr().err
    assert report_main([str(tmp_path), "--tracking-uri", uri]) == 2  # a folder that holds no sweep
    assert capsys.readouterr().err.startswith(f"smet_lab: error: {tmp_path} is neither a sweep's folder (no grid.json")
    # The same sweep read from its folder alone (its database elsewhere): the same table, no run ids.
    out = tmp_path / "from_folder"
    assert report_main([str(tmp / "sw" / "smoke"), "--tracking-uri", f"sqlite:///{tmp_path}/none.db", "--out", str(out)]) == 0
    assert f"report of sweep smoke: {out / 'report.html'} (read from its folder's files: " in capsys.readouterr().out
    from_folder = pd.read_csv(out / "trials.csv")
    assert from_folder["run_id"].isna().all()
    pd.testing.assert_frame_equal(from_folder.drop(columns="run_id"), reference.drop(columns="run_id"))
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).create_experiment("empty")
    assert report_main(["empty", "--tracking-uri", uri]) == 2
    assert capsys.readouterr().err == "smet_lab: error: experiment 'empty' has no runs\n"
    (tmp_path / "a_file").write_text("x")
    assert report_main(["smoke", "--tracking-uri", uri, "--out", str(tmp_path / "a_file" / "report")]) == 2
    assert capsys.readouterr().err == (f"smet_lab: error: --out {tmp_path / 'a_file' / 'report'}: a folder that can be "
                                       f"written ({tmp_path / 'a_file'} is a file)\n")


@pytest.mark.e2e
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


@pytest.mark.e2e
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
    # The shipped specs name sweeps this database does not have: one line naming them all, exit 2.
    assert report_main(["--tables", "--tracking-uri", uri, "--out", str(tmp_path / "none")]) == 2
    (err,) = capsys.readouterr().err.splitlines()
    assert err.startswith("smet_lab: error: no table rendered: none of the specs' sweeps (ablation, density, lr_scaling, "
                          "update_every, warmup) was found; no sweep, experiment or parent run 'ablation' in ")
    assert err.endswith("; run `python -m smet_lab +sweep=NAME` for each of ablation, density, lr_scaling, update_every, warmup")
    assert not (tmp_path / "none").exists()
    # With one of them there (smoke, as a spec beside the shipped ones), the rest are skipped, each with a warning.
    assert report_main(["--tables", str(spec), *map(str, default_specs()), "--tracking-uri", uri,
                        "--out", str(tmp_path / "some")]) == 0
    captured = capsys.readouterr()
    assert "table ablation_components skipped: " in captured.err and "smoke_ppl.csv" in captured.out


@pytest.mark.e2e
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


def test_the_report_names_the_rules_that_ran():
    from smet_lab.report.build import _rules

    runs = pd.DataFrame({"sparsity.growth": ["lowest_free", "random", "random"], "sparsity.prune": ["magnitude"] * 3,
                         "extensions": ["[]"] * 3})
    assert _rules(runs) == "sparsity.growth=lowest_free | random, sparsity.prune=magnitude"
    assert _rules(pd.DataFrame({"method": ["smet"]})) == "—"


def test_regrown_update_share_heat_map_means_over_a_methods_runs():
    """Two smet runs with shares at updates 100 and 200 and one naive run: the heat map's table for smet
    is the mean per (layer, update), rows in model order; runs without the metric are skipped."""
    from smet_lab.report import attribution

    def hist(a100, a200):
        return pd.DataFrame({"step": [100, 150, 200],
                             "stability/regrown_update_share/l0.weight": [a100, None, a200],
                             "stability/regrown_update_share/l1.weight": [1 - a100, None, 1 - a200]})

    runs = pd.DataFrame({"method": ["smet", "smet", "naive_dst", "static"],
                         "status": ["FINISHED", "DIVERGED", "FINISHED", "FINISHED"],
                         "history": [hist(0.2, 0.5), hist(0.4, 0.7), hist(0.9, 0.9), pd.DataFrame({"step": [1]})]})
    tables = attribution.shares(runs)
    assert set(tables) == {"naive_dst", "smet"}
    smet = tables["smet"]
    assert list(smet.index) == ["l0.weight", "l1.weight"] and list(smet.columns) == [100, 200]
    np.testing.assert_allclose(smet.to_numpy(), [[0.3, 0.6], [0.7, 0.4]])
    assert attribution.figure(runs) is not None
    assert attribution.figure(runs.iloc[3:]) is None
