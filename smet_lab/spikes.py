"""Loss-spike metrics from a run's per-step history (design §6, research notes §4.2).

Only pandas, numpy and the metric registry (smet_lab.metrics names the run-level keys): the trainer
and the report builders import this without Ray, MLflow or Hydra.

Inputs: a history (a DataFrame with a `step` column, as in metrics.parquet, or RunResult.history's list
of per-step dicts) or a bare loss series (a Series keeps its index as the step; a list or array is
indexed 0..n-1). `window` counts rows of the loss series (logged points), not steps.

Definitions:
- A row is *flagged* when its loss is non-finite (divergence) or when its log loss is >= k rolling
  standard deviations (ddof=1) above the rolling mean of the previous `window` rows. The current row is
  excluded so that a spike cannot inflate its own baseline and hide; upward only, since a fast fall of
  the loss is not instability. Non-finite losses are left out of the rolling statistics (one NaN must
  not blank the next `window` rows); a baseline needs max(2, window // 2) finite values. A flat window
  (std ~ 0) flags nothing. The first `burn_in` rows (default: `window`) are never flagged nor counted.
- Flagged rows at most `merge_gap` steps apart form one *event*.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from smet_lab.metrics import (CUMULATIVE_MASK_FLIPS, GRAD_SPIKE_EVENTS, MAX_PROBE_JUMP, MEAN_ADAM_OUTLIER_FRAC,
                              MEAN_PROBE_JUMP, MEAN_RECOVERY_STEPS, MEAN_REGROW_UPDATE_RATIO, MEAN_SPIKE_PEAK_RATIO,
                              SPIKE_EVENTS,
                              SPIKE_EVENTS_NEAR_UPDATE, SPIKE_SCORE, SPIKE_SCORE_OLMO, UPDATE_SPIKE_RATE,
                              UPDATE_SPIKE_THRESHOLD)

LOSS, DENSITY, DIVERGED = "train/loss", "topo/density", "train/diverged"
GRAD_NORM, MASK_FLIPS = "train/grad_norm", "stability/mask_flip_rate"
EVENT_COLUMNS = {"start_step": "int64", "peak_step": "int64", "end_step": "int64", "peak_loss": "float64",
                 "baseline": "float64", "peak_ratio": "float64", "recovery_steps": "float64",
                 "censored": "bool", "near_update": "bool", "steps_after_update": "float64"}
FLAT_STD = 1e-7  # on the log scale; below this the rolling std is float residue of a flat window


# ------------------------------------------------------------------------------------------ inputs
def _is_history(x) -> bool:
    return isinstance(x, pd.DataFrame) or (isinstance(x, (list, tuple)) and len(x) > 0 and isinstance(x[0], dict))


def _frame(history) -> pd.DataFrame:
    """A history as a DataFrame sorted by step."""
    df = history if isinstance(history, pd.DataFrame) else pd.DataFrame(list(history))
    if "step" not in df.columns:
        if df.empty:
            return pd.DataFrame({"step": pd.Series(dtype="int64")})
        raise ValueError("a history needs a 'step' column (one row per optimizer step)")
    return df.sort_values("step", kind="stable")


def _loss(loss) -> pd.Series:
    """The loss series indexed by step. From a history: rows with no loss (late-metric or sparse-cadence
    rows in a DataFrame) are dropped, except the row marked train/diverged, whose NaN is a divergence."""
    if _is_history(loss):
        df = _frame(loss)
        if LOSS not in df.columns:
            return pd.Series(dtype="float64")
        keep = df[LOSS].notna()
        if DIVERGED in df.columns:
            keep |= df[DIVERGED].eq(1)
        return pd.Series(df.loc[keep, LOSS].to_numpy(float), index=df.loc[keep, "step"].to_numpy())
    if isinstance(loss, pd.Series):
        return loss.astype("float64")
    return pd.Series(np.asarray(loss, dtype=float))


def _update_steps(history) -> list:
    """Topology update steps: the rows that carry topo/density."""
    df = _frame(history)
    return df.loc[df[DENSITY].notna(), "step"].tolist() if DENSITY in df.columns else []


# --------------------------------------------------------------------------------------- detection
def _detect(s: pd.Series, window: int, k: float, burn_in: int | None):
    """Flags per row, plus the previous-window statistics (log and raw scale) that events need."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ValueError(f"window must be an integer >= 2 (a std needs two values), got {window!r}")
    burn_in = window if burn_in is None else burn_in
    x = s.to_numpy(float)
    finite = np.isfinite(x)
    with np.errstate(divide="ignore", invalid="ignore"):
        logx = np.where(finite & (x > 0), np.log(x), np.nan)  # NaN rows are skipped by rolling()

    def prev(values: np.ndarray):  # mean and std of the previous `window` rows, current row excluded
        r = pd.Series(values).rolling(window, min_periods=max(2, window // 2))
        return r.mean().shift(1).to_numpy(), r.std().shift(1).to_numpy()

    lmean, lstd = prev(logx)
    mean, std = prev(np.where(finite, x, np.nan))
    with np.errstate(divide="ignore", invalid="ignore"):
        up = (lstd > FLAT_STD) & ((logx - lmean) / lstd >= k)  # NaN comparisons are False
    flags = ~finite | up
    flags[:burn_in] = False
    if len(x) <= max(window, burn_in):  # not one full window of history: nothing can be judged
        flags[:] = False
    return flags, mean, std


def spike_flags(loss, window: int = 50, k: float = 3.0, burn_in: int | None = None) -> pd.Series:
    """Boolean Series (indexed by step): which rows count as spikes (see the module docstring)."""
    s = _loss(loss)
    return pd.Series(_detect(s, window, k, burn_in)[0], index=s.index)


def spike_score(loss, window: int = 50, k: float = 3.0, burn_in: int | None = None) -> float:
    """Fraction of the rows after burn-in that are flagged (non-finite, or log loss >= k rolling stds
    above the mean of the previous `window` rows). A series of at most max(window, burn_in) rows (so
    shorter than window + 1 by default) has nothing to judge and scores 0.0; a constant series scores 0.0."""
    s = _loss(loss)
    burn_in = window if burn_in is None else burn_in
    flags = _detect(s, window, k, burn_in)[0]
    n = len(flags) - burn_in
    return float(flags.sum() / n) if n > 0 and len(flags) > window else 0.0


def spike_events(loss, window: int = 50, k: float = 3.0, merge_gap: int = 5, burn_in: int | None = None,
                 update_steps=None, update_window: int = 20) -> pd.DataFrame:
    """One row per spike event (flagged rows at most `merge_gap` steps apart), columns EVENT_COLUMNS:

    - start_step / end_step: first and last flagged step of the event; peak_step: the highest loss between
      them (a non-finite loss is the highest); peak_loss: the loss there.
    - baseline: mean raw loss over the `window` rows before start_step; peak_ratio = peak_loss / baseline.
    - recovery_steps: steps from the peak to the first later row with loss <= baseline + 1 std of that same
      window; NaN with censored=True when that never happens before the series ends.
    - steps_after_update: start_step minus the last topology update step strictly before it (the update at
      step u runs after step u's loss is taken, so it cannot cause a spike at u); NaN when none.
      near_update: steps_after_update <= update_window.

    `update_steps` defaults to the history's topo/density rows (none for a bare loss series)."""
    s = _loss(loss)
    if update_steps is None:
        update_steps = _update_steps(loss) if _is_history(loss) else []
    flags, mean, std = _detect(s, window, k, burn_in)
    steps, x = s.index.to_numpy(), s.to_numpy(float)
    updates = np.sort(np.asarray(update_steps, dtype=float))
    pos = np.flatnonzero(flags)
    groups = np.split(pos, np.flatnonzero(np.diff(steps[pos]) > merge_gap) + 1) if len(pos) else []
    rows = []
    for g in groups:
        a, b = g[0], g[-1]
        seg = x[a:b + 1]
        p = a + int(np.argmax(np.where(np.isfinite(seg), seg, np.inf)))
        base, thr = mean[a], mean[a] + std[a]
        hit = np.flatnonzero(x[p + 1:] <= thr)  # NaN (loss or threshold) never counts as recovered
        prior = updates[updates < steps[a]]
        after = float(steps[a] - prior[-1]) if len(prior) else math.nan
        rows.append({"start_step": steps[a], "peak_step": steps[p], "end_step": steps[b], "peak_loss": x[p],
                     "baseline": base, "peak_ratio": x[p] / base,
                     "recovery_steps": float(steps[p + 1 + hit[0]] - steps[p]) if len(hit) else math.nan,
                     "censored": not len(hit), "near_update": after <= update_window,
                     "steps_after_update": after})
    return pd.DataFrame(rows, columns=list(EVENT_COLUMNS)).astype(EVENT_COLUMNS)


# ----------------------------------------------------------------------------------------- summary
def _mean(values: list) -> float:
    # Summed in step order (not numpy's pairwise sum), as the trainer always has: logged values stay bit-identical.
    return sum(values) / len(values)


def probe_summary(history, jump_threshold: float = UPDATE_SPIKE_THRESHOLD) -> dict:
    """summary/mean_probe_jump, summary/max_probe_jump, summary/mean_regrow_update_ratio and
    summary/mean_adam_outlier_frac_regrown from the
    stability/* columns, NaN values ignored; a key whose column is absent (or all NaN) is omitted.

    summary/update_spike_rate: the fraction of topology updates whose probe jump is at least
    `jump_threshold` times the probe loss just before the update (logged on the update's row). It is
    the spike score at the level of updates: the train-loss z-score cannot see update jumps that are
    smaller than the batch-to-batch noise of the train loss (about 8 % of log loss on the tiny CPU
    model, against jumps of about 1 %), while the fixed probe batch can."""
    df = _frame(history)
    out = {}
    for key, col, fn in ((MEAN_PROBE_JUMP, "stability/probe_jump", _mean),
                         (MAX_PROBE_JUMP, "stability/probe_jump", max),
                         (MEAN_REGROW_UPDATE_RATIO, "stability/regrow_update_ratio", _mean),
                         (MEAN_ADAM_OUTLIER_FRAC, "stability/adam_outlier_frac_regrown", _mean)):
        if col in df.columns:
            values = df[col].dropna().astype(float).tolist()
            if values:
                out[key] = float(fn(values))
    if {"stability/probe_jump", "stability/probe_loss"} <= set(df.columns):
        jump, before = df["stability/probe_jump"].to_numpy(float), df["stability/probe_loss"].to_numpy(float)
        ok = np.isfinite(jump) & np.isfinite(before) & (before > 0)
        if ok.any():
            out[UPDATE_SPIKE_RATE] = float(np.mean(jump[ok] >= jump_threshold * before[ok]))
    return out


def run_spike_summary(history, window: int = 50, k: float = 3.0, update_window: int = 20,
                      merge_gap: int = 5, burn_in: int | None = None) -> dict:
    """Run-level spike metrics (public names, design §6) plus probe_summary(history).

    summary/spike_score, summary/spike_events and summary/spike_events_near_update are always present;
    summary/mean_spike_peak_ratio (finite ratios only: a divergence has none) and summary/mean_recovery_steps
    (uncensored events only) are omitted when there is nothing to average, like the probe keys."""
    df = _frame(history)  # convert a list of dicts once
    events = spike_events(df, window, k, merge_gap, burn_in, update_window=update_window)
    out = {SPIKE_SCORE: spike_score(df, window, k, burn_in), SPIKE_EVENTS: float(len(events)),
           SPIKE_EVENTS_NEAR_UPDATE: float(events["near_update"].sum())}
    ratios = events["peak_ratio"][np.isfinite(events["peak_ratio"])]
    recovery = events.loc[~events["censored"], "recovery_steps"]
    if len(ratios):
        out[MEAN_SPIKE_PEAK_RATIO] = float(ratios.mean())
    if len(recovery):
        out[MEAN_RECOVERY_STEPS] = float(recovery.mean())
    out.update(probe_summary(df))
    out[SPIKE_SCORE_OLMO] = spike_score(df, window=128, k=6.0)
    if GRAD_NORM in df:
        out[GRAD_SPIKE_EVENTS] = float(grad_spike_events(df[GRAD_NORM]))
    if MASK_FLIPS in df:
        out[CUMULATIVE_MASK_FLIPS] = float(df[MASK_FLIPS].dropna().sum())
    return out


def grad_spike_steps(grad_norm, alpha: float = 0.97, z: float = 2.5, warmup: int = 25) -> list:
    """ZClip's online detector: the steps whose norm g_t has (g_t - mu) / sigma >= z against exponential
    moving averages mu (of the norm) and sigma^2 (of its squared deviation from the updated mean), both
    with factor `alpha` and started at the first norm (sigma = 0). Steps before the `warmup`-th finite
    norm and steps with sigma = 0 are not judged; a flagged norm enters the averages clipped to
    mu + z sigma, so one spike does not hide the next. `grad_norm`: a Series indexed by step (or any
    iterable: positions are the steps); non-finite norms are skipped."""
    pairs = grad_norm.items() if isinstance(grad_norm, pd.Series) else enumerate(grad_norm)
    values = [(step, float(x)) for step, x in pairs if math.isfinite(float(x))]
    if not values:
        return []
    mu, var, flagged = values[0][1], 0.0, []
    for t, (step, g) in enumerate(values[1:], start=1):
        sigma = math.sqrt(var)
        if t >= warmup and sigma > 0 and (g - mu) / sigma >= z:
            flagged.append(step)
            g = mu + z * sigma
        mu = alpha * mu + (1 - alpha) * g
        var = alpha * var + (1 - alpha) * (g - mu) ** 2
    return flagged


def grad_spike_events(grad_norm, alpha: float = 0.97, z: float = 2.5, warmup: int = 25) -> int:
    """How many steps grad_spike_steps flags."""
    return len(grad_spike_steps(grad_norm, alpha, z, warmup))


# The detectors the report compares (summary/spike_events, summary/spike_score_olmo, summary/grad_spike_events).
DETECTORS = ("loss spike event (k=3, window 50)", "OLMo spike score row (6 sigma, window 128)",
             "gradient-norm z-score (ZClip)")


def detector_steps(history) -> pd.DataFrame:
    """Every detection of the three detectors in a history: detector, step (a loss event at its peak),
    and since_update = step - the last topology update at or before it (NaN before the first)."""
    df = _frame(history)
    found = {DETECTORS[0]: list(spike_events(df)["peak_step"]),
             DETECTORS[1]: [int(s) for s, f in spike_flags(df, window=128, k=6.0).items() if f],
             DETECTORS[2]: grad_spike_steps(df.set_index("step")[GRAD_NORM].dropna()) if GRAD_NORM in df else []}
    updates = np.array(sorted(_update_steps(df)), dtype=float)
    rows = []
    for name, steps in found.items():
        for step in steps:
            before = updates[updates <= step]
            rows.append({"detector": name, "step": int(step),
                         "since_update": float(step - before[-1]) if len(before) else float("nan")})
    return pd.DataFrame(rows, columns=["detector", "step", "since_update"])
