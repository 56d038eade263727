"""Spike metrics (smet_lab.spikes) on synthetic losses with known injected spikes, and the trainer hook."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from smet_lab.spikes import probe_summary, run_spike_summary, spike_events, spike_flags, spike_score

W = 50  # the default window


def curve(n: int, seed: int = 0) -> np.ndarray:
    """Steps 1..n of a slowly decaying loss with small seeded noise. Up to n = 3000 the noise (sd 0.002)
    stays small next to the trend's spread within a window, and the trend goes down, so the clean curve
    never flags upward (a flat noisy tail would: ~0.1 % of pure-noise steps pass 3 sds)."""
    t = np.arange(1, n + 1)
    return 3.0 + 2.0 * np.exp(-t / 1500.0) + np.random.default_rng(seed).normal(0.0, 0.002, n)


def inject(x: np.ndarray, step: int, height: float, recover: int) -> None:
    """Multiply the loss by 1 + height at `step`, falling linearly back to the clean curve `recover` steps later."""
    for j in range(recover):
        x[step - 1 + j] *= 1.0 + height * (1.0 - j / recover)


def reference_flags(x, window=W, k=3.0, burn_in=None) -> list[int]:
    """Flagged steps (1-based) by a plain loop over the definition, for cross-checking the pandas version."""
    burn_in = window if burn_in is None else burn_in
    out = []
    for i in range(burn_in, len(x) if len(x) > max(window, burn_in) else 0):
        if not np.isfinite(x[i]):
            out.append(i + 1)
            continue
        prev = np.log(x[max(0, i - window):i])
        prev = prev[np.isfinite(prev)]
        if len(prev) >= max(2, window // 2) and prev.std(ddof=1) > 1e-7 and \
                (np.log(x[i]) - prev.mean()) / prev.std(ddof=1) >= k:
            out.append(i + 1)
    return out


def history(x, update_steps=()) -> list[dict]:
    rows = [{"step": i + 1, "train/loss": float(v)} for i, v in enumerate(x)]
    for s in update_steps:
        rows[s - 1]["topo/density"] = 0.25
    return rows


def flagged(x, **kw) -> list[int]:
    f = spike_flags(pd.Series(x, index=np.arange(1, len(x) + 1)), **kw)
    return f.index[f].tolist()


# ------------------------------------------------------------------------------------ spike_score
def test_score_matches_a_hand_enumeration():
    x = [1, 1.1, 1, 1.1, 1, 3, 1.1, 1, math.nan, 1.1, 3, 1]
    # window 4, burn-in 4: rows 4..11 (0-based) are judged, 8 of them.
    # row 5: log 3 = 1.099 vs previous [0, .095, 0, .095] (mean .048, sd .055): z ~ 19 -> spike.
    # rows 6, 7, 9, 11 sit below a mean inflated by an earlier 3; row 8 is NaN -> spike;
    # row 10: previous finite logs [.095, 0, .095] (the NaN is skipped): z ~ 18 -> spike.
    assert spike_flags(x, window=4).tolist() == [i in (5, 8, 10) for i in range(12)]
    assert spike_score(x, window=4) == pytest.approx(3 / 8)
    assert spike_score(x, window=4, burn_in=6) == pytest.approx(2 / 6)  # rows 6..11: the NaN and row 10


def test_clean_curve_has_no_spikes_and_reference_agrees():
    x = curve(1200)
    assert flagged(x) == reference_flags(x) == []
    assert spike_score(x) == 0.0 and spike_events(x).empty


def test_constant_series_has_no_spikes():
    assert spike_score([2.0] * 200) == 0.0
    assert spike_events([2.0] * 200).empty
    assert spike_score(np.full(200, 0.7), window=10, k=0.0) == 0.0  # std 0 is guarded even at k = 0


def test_too_short_for_the_window_scores_zero():
    x = curve(W)
    x[-1] *= 10.0
    assert spike_score(x) == 0.0 and spike_events(x).empty and not spike_flags(x).any()
    assert spike_score([]) == 0.0 and spike_events([]).empty
    y = np.append(curve(W), 40.0)  # window + 1 rows: exactly one row judged, and it spikes
    assert spike_score(y) == 1.0 and spike_events(y)["start_step"].tolist() == [W]  # bare list: index 0..n-1


# ----------------------------------------------------------------------------------- spike_events
def test_events_of_injected_spikes_with_linear_recovery():
    x = curve(1200)
    inject(x, 400, 1.0, 10)
    inject(x, 700, 0.5, 20)
    inject(x, 1000, 2.0, 5)
    hist = history(x, update_steps=[390, 650, 1000])
    ev = spike_events(hist)
    assert flagged(x) == reference_flags(x)
    assert ev["start_step"].tolist() == [400, 700, 1000]
    assert ev["peak_step"].tolist() == [400, 700, 1000]
    # The first steps of the recovering tail are still >= 3 sds above a window that now holds the peak
    # (h = 1: log 1.7 = .53 against a threshold of ~.50 three steps on, log 1.6 = .47 against ~.55 at four).
    assert flagged(x) == [400, 401, 402, 403, 700, 701, 702, 703, 1000, 1001, 1002]
    assert ev["end_step"].tolist() == [403, 703, 1002]
    for (_, e), p, h in zip(ev.iterrows(), [400, 700, 1000], [1.0, 0.5, 2.0]):
        before = x[p - 1 - W:p - 1]
        assert e["baseline"] == pytest.approx(before.mean())
        assert e["peak_loss"] == x[p - 1]
        assert e["peak_ratio"] == pytest.approx(x[p - 1] / before.mean())
        assert e["peak_ratio"] == pytest.approx(1.0 + h, rel=0.03)  # the slow trend is < 3 % over a window
    # One step before the end of a linear recovery the loss is still 1 + h/R above; at R it is back on the curve.
    assert ev["recovery_steps"].tolist() == [10.0, 20.0, 5.0]
    assert not ev["censored"].any()
    # Updates at 390, 650, 1000: 10 and 50 steps before the first two events; the update at 1000 runs after
    # step 1000's loss, so the third event is attributed to 650 (350 steps).
    assert ev["steps_after_update"].tolist() == [10.0, 50.0, 350.0]
    assert ev["near_update"].tolist() == [True, False, False]
    assert spike_events(hist, update_window=60)["near_update"].tolist() == [True, True, False]
    bare = spike_events(pd.Series(x, index=np.arange(1, 1201)))  # no update steps known
    assert bare["steps_after_update"].isna().all() and not bare["near_update"].any()


def test_exponential_recovery_matches_the_definition():
    x = curve(800)
    for j in range(60):
        x[499 + j] *= 1.0 + 1.5 * math.exp(-j / 6.0)
    ev = spike_events(x)  # bare array: step = 0-based row
    assert len(ev) == 1 and ev["peak_step"][0] == 499
    before = x[499 - W:499]
    threshold = before.mean() + before.std(ddof=1)
    expected = next(j for j in range(1, 300) if x[499 + j] <= threshold)
    assert ev["recovery_steps"][0] == expected
    assert ev["peak_ratio"][0] == pytest.approx(2.5, rel=0.03)


@pytest.mark.parametrize("gap, n_events", [(3, 1), (10, 2)])
def test_merge_gap(gap, n_events):
    x = curve(600)
    x[299] *= 2.0
    x[299 + gap] *= 2.5  # the second one is higher: the merged event peaks there
    assert flagged(x) == [300, 300 + gap]
    ev = spike_events(pd.Series(x, index=np.arange(1, 601)), merge_gap=5)
    assert len(ev) == n_events
    if n_events == 1:
        assert (ev["start_step"][0], ev["peak_step"][0], ev["end_step"][0]) == (300, 303, 303)
        assert ev["recovery_steps"][0] == 1.0  # back on the curve the step after the peak
    else:
        assert ev["start_step"].tolist() == ev["peak_step"].tolist() == [300, 310]
    assert len(spike_events(pd.Series(x, index=np.arange(1, 601)), merge_gap=gap - 1)) == 2


def test_nan_counts_as_a_spike_without_poisoning_later_windows():
    clean = curve(600)
    inject(clean, 320, 1.0, 1)  # a real spike inside the window that follows the NaN
    x = clean.copy()
    x[299] = math.nan
    assert flagged(x) == reference_flags(x) == [300, 320]
    assert flagged(clean) == [320]  # every step but the NaN itself is judged as without it
    assert spike_score(x) == pytest.approx(2 / (600 - W))
    ev = spike_events(x, merge_gap=5)
    assert ev["start_step"].tolist() == [299, 319]  # bare array: 0-based rows
    assert math.isnan(ev["peak_loss"][0]) and math.isnan(ev["peak_ratio"][0])
    assert ev["recovery_steps"].tolist() == [1.0, 1.0]
    assert ev["peak_ratio"][1] == pytest.approx(2.0, rel=0.03)
    y = curve(600)
    y[299] = math.inf
    assert flagged(y) == [300]


def test_a_final_spike_that_never_recovers_is_censored():
    x = curve(500)
    inject(x, 400, 1.0, 10)
    for j in range(20):  # rises until the end: no row is back near the baseline
        x[480 + j] *= 1.5 + 0.05 * j
    ev = spike_events(history(x))
    assert ev["start_step"].tolist()[0] == 400 and ev["start_step"].tolist()[-1] == 481
    assert bool(ev["censored"].iloc[-1]) and math.isnan(ev["recovery_steps"].iloc[-1])
    assert not ev["censored"].iloc[0] and ev["recovery_steps"].iloc[0] == 10.0
    s = run_spike_summary(history(x))
    assert s["summary/mean_recovery_steps"] == 10.0  # the censored event is left out


# ------------------------------------------------------------------------------ summaries, inputs
def test_history_forms_agree_and_late_rows_are_not_losses():
    x = curve(300)
    inject(x, 200, 1.0, 4)
    rows = history(x, update_steps=[190])
    rows[189]["stability/probe_jump"] = 0.5
    rows[189]["stability/regrow_update_ratio"] = 0.1
    a = run_spike_summary(rows)
    b = run_spike_summary(pd.DataFrame(rows).sample(frac=1.0, random_state=0))  # order does not matter
    assert a == b
    assert a["summary/spike_events"] == 1.0 and a["summary/spike_events_near_update"] == 1.0
    assert a["summary/spike_score"] == pytest.approx(len(reference_flags(x)) / 250)
    assert a["summary/mean_recovery_steps"] == 4.0
    assert a["summary/mean_spike_peak_ratio"] == pytest.approx(2.0, rel=0.03)
    # A DataFrame row with no loss (e.g. a metric logged for an earlier step) is not part of the series;
    # the diverged row's NaN is.
    df = pd.concat([pd.DataFrame(rows), pd.DataFrame([{"step": 301, "train/loss": math.nan, "train/diverged": 1.0},
                                                     {"step": 150.5, "val/loss": 3.0}])])
    assert flagged(x) + [301] == [int(s) for s in spike_flags(df).pipe(lambda f: f.index[f])]


def test_update_spike_rate_counts_updates_whose_probe_jump_crosses_the_threshold():
    # Four updates, probe loss before each on the update's own row: relative jumps 2 %, 0.5 %, 1 % (on
    # the threshold: counted), -1 %; a fifth update's jump is NaN (run ended inside its window): left out.
    rows = [{"step": 100, "stability/probe_loss": 2.0, "stability/probe_jump": 0.04},
            {"step": 101, "stability/probe_loss": 2.1},  # probe rows inside the window carry no jump
            {"step": 200, "stability/probe_loss": 2.0, "stability/probe_jump": 0.01},
            {"step": 300, "stability/probe_loss": 1.5, "stability/probe_jump": 0.015},
            {"step": 400, "stability/probe_loss": 1.0, "stability/probe_jump": -0.01},
            {"step": 500, "stability/probe_loss": 1.0, "stability/probe_jump": math.nan}]
    assert probe_summary(rows)["summary/update_spike_rate"] == pytest.approx(2 / 4)
    assert probe_summary(rows, jump_threshold=0.005)["summary/update_spike_rate"] == pytest.approx(3 / 4)
    assert run_spike_summary(rows)["summary/update_spike_rate"] == pytest.approx(0.5)
    # Without the probe loss before the update there is nothing to compare the jump with.
    assert "summary/update_spike_rate" not in probe_summary([{"step": 1, "stability/probe_jump": 0.3}])


def test_probe_means_are_step_order_sums_bit_for_bit():
    # 30 updates: numpy's pairwise sum would round differently; the logged means must not depend on who
    # computes them (trainer at the end of a run, report from the history), so both add in step order.
    jumps = np.random.default_rng(8).normal(0.0, 0.01, 30).tolist()
    rows = [{"step": 100 * (i + 1), "stability/probe_jump": j, "stability/regrow_update_ratio": abs(j)}
            for i, j in enumerate(jumps)]
    total, ratio_total = 0.0, 0.0
    for j in jumps:
        total, ratio_total = total + j, ratio_total + abs(j)
    s = probe_summary(pd.DataFrame(rows))
    assert float(np.mean(jumps)) != total / 30 and float(np.mean(np.abs(jumps))) != ratio_total / 30  # the case guarded
    assert (s["summary/mean_probe_jump"], s["summary/max_probe_jump"]) == (total / 30, max(jumps))
    assert s["summary/mean_regrow_update_ratio"] == ratio_total / 30


def test_probe_summary_is_nan_safe_and_omits_absent_keys():
    rows = [{"step": 1, "stability/probe_jump": 0.2, "stability/regrow_update_ratio": 3.0},
            {"step": 2, "stability/probe_jump": math.nan},
            {"step": 3, "stability/probe_jump": 0.6, "stability/regrow_update_ratio": 1.0}]
    assert probe_summary(rows) == pytest.approx({"summary/mean_probe_jump": 0.4, "summary/max_probe_jump": 0.6,
                                                 "summary/mean_regrow_update_ratio": 2.0})
    assert probe_summary([{"step": 1, "train/loss": 3.0}]) == {}
    assert probe_summary([]) == {}
    s = run_spike_summary([{"step": i, "train/loss": 3.0} for i in range(1, 101)])
    assert s == {"summary/spike_score": 0.0, "summary/spike_events": 0.0, "summary/spike_events_near_update": 0.0,
                 "summary/spike_score_olmo": 0.0}


def test_window_and_k_are_configurable():
    x = curve(400)
    x[199] *= 1.02  # a small bump: about 4 sds of a 10-row window, under 3 sds of a 50-row one
    assert flagged(x, window=10, k=3.0) == reference_flags(x, window=10, k=3.0) != []
    assert flagged(x, window=10, k=1e6) == []
    with pytest.raises(ValueError, match="window"):
        spike_score(x, window=1)


# ---------------------------------------------------------------------------------- trainer hook
SPIKE_KEYS = ["summary/spike_score", "summary/spike_events", "summary/spike_events_near_update"]


def test_summarize_of_a_real_run_includes_the_spike_metrics():
    from smet_lab.config import DataConfig, ModelConfig, RunConfig
    from smet_lab.data import load_corpus
    from smet_lab.methods import apply_method
    from smet_lab.train import QUIET, train

    cfg = RunConfig()
    cfg.model = ModelConfig(name="test", dim=32, n_layers=1, n_heads=2, ffn_dim=64, seq_len=16)
    cfg.train.max_steps, cfg.train.batch_size, cfg.train.eval_every, cfg.train.eval_batches = 80, 4, 40, 2
    cfg.train.probe_window, cfg.train.probe_batch_size, cfg.train.log_every = 5, 8, 5
    cfg.sparsity.update_every, cfg.optim.warmup_steps = 10, 10
    cfg = apply_method(cfg, "smet")
    cfg.optim.regrow.warmup_steps = 10
    res = train(cfg, corpus=load_corpus(DataConfig(name="synthetic", max_tokens=30_000)), callbacks=QUIET)
    s = res.summary
    for key in SPIKE_KEYS + ["summary/mean_probe_jump", "summary/max_probe_jump", "summary/mean_regrow_update_ratio"]:
        assert key in s and math.isfinite(s[key]), key
    again = run_spike_summary(pd.DataFrame(res.history))
    assert {k: v for k, v in s.items() if k in again} == pytest.approx(again)
    assert s["summary/spike_score"] == pytest.approx(len(reference_flags([r["train/loss"] for r in res.history])) / 30)
    for key in ("summary/mean_spike_peak_ratio", "summary/mean_recovery_steps"):
        assert (key in s) == (key in again) and math.isfinite(s.get(key, 0.0))


def test_summarize_on_a_long_history():
    from smet_lab.train.trainer import summarize

    x = curve(3000)
    for p in range(200, 3000, 250):
        inject(x, p, 0.5, 8)
    rows = history(x, update_steps=range(100, 3000, 100))
    for r in rows[99::100]:
        r.update({"stability/probe_jump": 0.1, "stability/regrow_update_ratio": 0.2, "val/loss": 3.0})
    run = SimpleNamespace(history=rows, step=3000, tokens=1, train_time=1.0,
                          topology=SimpleNamespace(density=lambda: 0.25), optimizer=SimpleNamespace(kernel="eager"))
    s = summarize(run)
    assert s["summary/spike_events"] == 12.0 and s["summary/mean_recovery_steps"] == 8.0
    assert s["summary/spike_events_near_update"] == 0.0  # spikes 50 or 100 steps after the last update
    assert s["summary/final_val_loss"] == 3.0 and s["summary/mean_probe_jump"] == pytest.approx(0.1)


def test_report_import_pulls_in_no_ray_mlflow_or_hydra():
    import subprocess
    import sys

    code = ("import sys, smet_lab.report; "
            "print(sorted(m for m in ('ray', 'mlflow', 'hydra', 'omegaconf', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------ second detectors and churn
def test_grad_spike_events_by_hand():
    """alpha 0.5, z 1, judged from step 1: mu/var by hand.
    t1 g=3: sigma 0, not judged; mu = 2, var = 0.5 (3-2)^2 = 0.5.      t2 g=2: z = 0; mu = 2, var = 0.25.
    t3 g=10: z = 8/0.5 = 16 -> flagged, enters as 2 + 0.5 = 2.5; mu = 2.25, var = 0.125 + 0.5 (0.25)^2 = 0.15625.
    t4 g=3: z = 0.75 / 0.3953 = 1.90 -> flagged. Two spikes; with judging from step 4 on, t3 enters unclipped
    (mu 6, var 8.125) and t4 (z < 0) is no spike."""
    from smet_lab.spikes import grad_spike_events

    norms = [1.0, 3.0, 2.0, 10.0, 3.0]
    assert grad_spike_events(norms, alpha=0.5, z=1.0, warmup=1) == 2
    assert grad_spike_events(norms, alpha=0.5, z=1.0, warmup=4) == 0
    assert grad_spike_events([2.0] * 100) == 0  # no spread, nothing to judge
    assert grad_spike_events([]) == 0


def test_spike_score_olmo_uses_a_128_step_window_and_6_sigma():
    x = curve(300, seed=3)
    x[199] *= math.exp(0.5)  # one strong spike (log loss +0.5, far above 6 sigma of this noise)
    x[249] *= math.exp(0.02)  # a weak one: below 6 sigma of this noise
    summary = run_spike_summary(history(x))
    olmo = reference_flags(x, window=128, k=6.0)
    assert olmo == [200]  # computed by the plain loop: only the strong spike
    assert summary["summary/spike_score_olmo"] == pytest.approx(len(olmo) / (300 - 128))
    assert "summary/grad_spike_events" not in summary  # this history has no train/grad_norm column


def test_mask_flip_rate_in_a_real_run():
    from smet_lab.config import DataConfig, ModelConfig, RunConfig
    from smet_lab.data import load_corpus
    from smet_lab.train import QUIET, train

    cfg = RunConfig()
    cfg.model = ModelConfig(name="t", dim=32, n_layers=1, n_heads=2, ffn_dim=64, seq_len=16)
    cfg.train.max_steps, cfg.train.batch_size, cfg.train.eval_every = 40, 4, 0
    cfg.train.eval_batches, cfg.train.probe_window, cfg.train.probe_batch_size = 2, 3, 4
    cfg.sparsity.update_every, cfg.optim.warmup_steps = 10, 5
    res = train(cfg, corpus=load_corpus(DataConfig(name="synthetic", max_tokens=30_000)), callbacks=QUIET)
    rows = [r for r in res.history if "topo/density" in r]
    assert [r["step"] for r in rows] == [10, 20, 30]
    total = 0.0
    for r in rows:  # pruned + regrown = 2 x regrown blocks; regrown_fraction is per active block
        expected = 2 * r["topo/regrown_fraction"] * r["topo/density"]
        total += expected
        assert r["stability/mask_flip_rate"] == pytest.approx(expected, rel=1e-9)
        assert r["stability/mask_flip_rate_cumulative"] == pytest.approx(total, rel=1e-9)
    assert res.summary["summary/cumulative_mask_flip_rate"] == pytest.approx(total, rel=1e-9)
    assert res.summary["summary/spike_score_olmo"] == 0.0  # 40 logged steps: none past the 128-step window


def test_detector_steps_and_their_lag_after_updates_by_hand():
    """A flat loss 2.0 with one jump to 8.0 at step 160, topology updates at 100 and 200, and a gradient
    norm flat at 1.0 (+ tiny alternation so sigma > 0) with a jump to 50 at step 205: the loss detectors
    fire at 160 (60 steps after update 100), ZClip at 205 (5 after update 200)."""
    from smet_lab.report.detectors import lag_table
    from smet_lab.spikes import DETECTORS, detector_steps

    steps = np.arange(1, 301)
    loss = np.full(300, 2.0) + 1e-4 * (steps % 2)
    loss[159] = 8.0
    grad = np.full(300, 1.0) + 1e-3 * (steps % 2)
    grad[204] = 50.0
    hist = pd.DataFrame({"step": steps, "train/loss": loss, "train/grad_norm": grad,
                         "topo/density": [0.25 if s in (100, 200) else np.nan for s in steps]})
    d = detector_steps(hist)
    assert list(d.loc[d["detector"] == DETECTORS[0], "step"]) == [160]
    assert list(d.loc[d["detector"] == DETECTORS[2], "step"]) == [205]
    assert list(d.loc[d["detector"] == DETECTORS[2], "since_update"]) == [5.0]
    assert list(d.loc[d["detector"] == DETECTORS[0], "since_update"]) == [60.0]
    assert 160 in list(d.loc[d["detector"] == DETECTORS[1], "step"])
    runs = pd.DataFrame({"method": ["smet"], "status": ["FINISHED"], "history": [hist], "train.probe_window": [20]})
    table = lag_table(runs).set_index("detector")
    assert table.loc[DETECTORS[0], "within the probe window after an update"] == "0/1"
    assert table.loc[DETECTORS[2], "within the probe window after an update"] == "1/1"
    assert table.loc[DETECTORS[2], "median steps since the last update"] == "5"
