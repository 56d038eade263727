"""Report figures from the runs DataFrame: matplotlib `Figure` objects on the Agg canvas (no pyplot, so
no global backend state). Each builder returns None when it has nothing to draw (its axis is not swept
in this sweep, or no run has the data), and the report skips it.
"""

from __future__ import annotations

import io
import math
import textwrap

import numpy as np
import pandas as pd

from smet_lab.metrics import FINAL_VAL_PPL, MEAN_PROBE_JUMP, PARAMETERS, STATE_RATIO, label_and_format
from smet_lab.report.data import (DIVERGED, FINISHED, SEED, SweepInfo, cell_label, fmt_value, histories, method_rank,
                                  sort_runs)
from smet_lab.report import attribution, lr_transfer
from smet_lab.spikes import spike_events

PROBE = "stability/probe_loss"
DENSITY_KEY, WARMUP_KEY, UPDATE_KEY = "sparsity.density", "optim.regrow.warmup_steps", "sparsity.update_every"
MODEL_KEY = "model"  # a config-group axis: the model's option name


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _methods(runs: pd.DataFrame) -> list:
    return sorted(runs["method"].dropna().unique(), key=method_rank) if "method" in runs else []


def _update_steps(h: pd.DataFrame) -> np.ndarray:
    return h.loc[h["topo/density"].notna(), "step"].to_numpy() if "topo/density" in h else np.array([])


SMOOTH_POINTS = 60  # a smoothed curve averages ~1/60 of its points: per-step train loss is too noisy to compare by eye


def smoothed(curve: pd.Series) -> tuple[pd.Series, int]:
    """(the centred rolling mean of `curve` over an odd window of ~len/SMOOTH_POINTS points, shorter at the
    ends; the window)."""
    window = max(1, len(curve) // SMOOTH_POINTS) | 1
    return curve.rolling(window, center=True, min_periods=1).mean(), window


def _zoom_past_the_drop(ax, curves: list[tuple[pd.Series, pd.Series]]) -> None:
    """y range over the (smoothed, drawn) curves without their first 10 % of steps, the drop every run
    shares, so their differences show: from the lowest drawn point to the highest after that, a rise
    capped at 1.3x the smoothed value there (a blow-up before a divergence would flatten the rest)."""
    lows, highs = [], []
    for smooth, drawn in curves:
        if len(smooth) < 10:  # too short to have a drop worth cutting: its whole range
            lows.append(float(drawn.min()))
            highs.append(float(drawn.max()))
            continue
        start = smooth.index[0] + 0.1 * (smooth.index[-1] - smooth.index[0])
        cap = 1.3 * float(smooth[smooth.index >= start].iloc[0])
        lows.append(float(drawn.min()))
        highs.append(min(float(drawn[drawn.index >= start].max()), cap))
    if lows:
        low, high = min(lows), max(highs)
        pad = 0.05 * (high - low) or 0.05 * abs(high) or 0.05
        ax.set_ylim(low - pad, high + pad)


# ----------------------------------------------------------------------------------- loss curves
def loss_curves_figure(runs: pd.DataFrame, info: SweepInfo):
    """One panel per method: each trial's train loss, val loss (dots), its topology updates (ticks along
    the bottom), spike events (red x at the peak) and divergence (dashed red line)."""
    hist = histories(runs)
    have = runs[hist.map(lambda h: h is not None and "train/loss" in h)]
    if have.empty:
        return None
    methods = _methods(have) or [None]
    ncols = 1 if len(methods) == 1 else 2
    nrows = math.ceil(len(methods) / ncols)
    fig = _figure(6.2 * ncols, 3.8 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    others = [k for k in info.swept if k != "method"]
    window = 1
    for ax, method in zip(axes, methods):
        group = have if method is None else have[have["method"] == method]
        curves = []
        for _, r in group.iterrows():
            h = r["history"]
            train = h[["step", "train/loss"]].dropna()
            train = train[np.isfinite(train["train/loss"])].set_index("step")["train/loss"]
            label = cell_label(r.to_dict(), others) if others else method or "run"
            if r.get(SEED) is not None and info.seeds_asked and info.seeds_asked > 1:
                label += f", seed {fmt_value(r.get(SEED))}"
            if r["status"] != FINISHED:
                label += f" ({r['status']})"
            smooth, w = smoothed(train)
            window = max(window, w)
            few = len(train) <= 3  # a trial that failed early: a line alone would not show
            (line,) = ax.plot(smooth.index, smooth.to_numpy(), lw=1.2, label=label, marker="o" if few else None, ms=4)
            color = line.get_color()
            if w > 1:  # the raw curve faintly beneath: its spikes stay visible
                ax.plot(train.index, train.to_numpy(), lw=0.5, alpha=0.25, color=color)
            curves.append((smooth, train))
            if "val/loss" in h:
                val = h[["step", "val/loss"]].dropna()
                ax.plot(val["step"], val["val/loss"], "o", ms=3.5, color=color)
            updates = _update_steps(h)
            if len(updates):  # along the bottom edge: on the curve they would hide in it
                ax.plot(updates, np.full(len(updates), 0.015), "|", ms=7, mew=1.2, color=color,
                        transform=ax.get_xaxis_transform())
            events = spike_events(h)
            peaks = events[np.isfinite(events["peak_loss"])]
            if len(peaks):
                ax.plot(peaks["peak_step"], peaks["peak_loss"], "x", ms=8, mew=2, color="red")
            if r["status"] == DIVERGED and len(h):
                ax.axvline(h["step"].max(), color="red", ls="--", lw=1)
        _zoom_past_the_drop(ax, curves)
        ax.set_title(str(method) if method is not None else "runs", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        _legend_with_markers(ax)
    for ax in axes[len(methods):]:
        ax.set_visible(False)
    smoothing = f", centred mean over {window} logged steps, raw beneath" if window > 1 else ""
    title = (f"Loss per method (line: train{smoothing}; dots: val; | along the bottom: topology update; "
             "x: spike event)")
    fig.suptitle(textwrap.fill(title, width=int(14 * 6.2 * ncols)), fontsize=10)  # one panel: two lines
    fig.tight_layout()
    return fig


def overlay_figure(runs: pd.DataFrame, info: SweepInfo):
    """Every cell's train loss on one axis: one line per cell of the swept keys, the mean over its
    FINISHED seeds at each step; a cell with no finished run is drawn dashed from the runs it has
    (diverged, failed, ...), so no method goes missing from the comparison."""
    hist = histories(runs)
    have = runs[hist.map(lambda h: h is not None and "train/loss" in h)]
    if have.empty:
        return None
    keys = [k for k in info.swept if k in have and k != SEED] or (["method"] if "method" in have else [])
    have = sort_runs(have, keys)
    fig = _figure(7.5, 4.6)
    ax = fig.add_subplot()
    drawn, window = [], 1
    for _, g in have.groupby(keys, dropna=False, sort=False) if keys else [((), have)]:
        finished = g[g["status"] == FINISHED]
        used = finished if len(finished) else g
        curves = [h.set_index("step")["train/loss"] for h in used["history"]]
        curves = [c[~c.index.duplicated(keep="last")].dropna() for c in curves]
        mean = pd.concat(curves, axis=1).mean(axis=1).sort_index()  # a step only some seeds reached: their mean
        mean = mean[np.isfinite(mean)]
        if mean.empty:
            continue
        n = len(curves)
        label = f"{cell_label(g.iloc[0].to_dict(), keys)} ({n} seed{'s' if n != 1 else ''}"
        label += ")" if len(finished) else ", none finished: " + ", ".join(used["status"].str.lower()) + ")"
        smooth, w = smoothed(mean)
        window = max(window, w)
        ax.plot(smooth.index, smooth.to_numpy(), lw=1.2, ls="-" if len(finished) else "--", label=label)
        drawn.append((smooth, smooth))
    if not drawn:
        return None
    _zoom_past_the_drop(ax, drawn)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (mean over seeds)")
    ax.set_title("Train loss of every cell on one axis (mean over its finished seeds)"
                 + (f"\nsmoothed: centred mean over {window} logged steps" if window > 1 else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7 if len(drawn) <= 12 else 6, ncol=1 if len(drawn) <= 12 else 2)
    fig.tight_layout()
    return fig


def _legend_with_markers(ax) -> None:
    from matplotlib.lines import Line2D

    handles, labels = ax.get_legend_handles_labels()
    handles += [Line2D([], [], ls="none", marker="|", ms=9, color="gray"),
                Line2D([], [], ls="none", marker="x", ms=7, mew=2, color="red")]
    labels += ["topology update", "spike event"]
    ax.legend(handles, labels, fontsize=7 if len(labels) <= 12 else 6, loc="upper right",
              ncol=1 if len(labels) <= 12 else 2)


# ---------------------------------------------------------------------------------- update zoom
def update_deltas(history: pd.DataFrame, window: int | None = None) -> pd.DataFrame:
    """Probe loss around each topology update u, relative to the value just before it: rows
    (update_step, offset, delta) with delta = probe(u + offset) - probe(u) for offset 0..window, where
    probe(u) is the probe loss taken at step u before the update and probe(u + j) after step u + j.
    `window` defaults to the longest run of probe rows after an update (train.probe_window)."""
    cols = ["update_step", "offset", "delta"]
    if history is None or PROBE not in history or "topo/density" not in history:
        return pd.DataFrame(columns=cols)
    probe = history[["step", PROBE]].dropna().set_index("step")[PROBE]
    probe = probe[~probe.index.duplicated(keep="last")]
    updates = [u for u in _update_steps(history) if u in probe.index]
    if window is None:
        window = 0
        for u in updates:
            j = 1
            while u + j in probe.index:
                j += 1
            window = max(window, j - 1)
    rows = []
    for u in updates:
        base = probe[u]
        for j in range(window + 1):
            if u + j in probe.index:
                rows.append((int(u), j, float(probe[u + j] - base)))
    return pd.DataFrame(rows, columns=cols)


def zoom_groups(runs: pd.DataFrame, info: SweepInfo) -> tuple[list, str]:
    """Group the zoom by method when the sweep has several, else by the swept cell."""
    if len(_methods(runs)) > 1:
        return ["method"], "method"
    keys = [k for k in info.swept if k in runs and k != "method"]
    return keys or ["method"], "cell"


def update_zoom(runs: pd.DataFrame, info: SweepInfo) -> pd.DataFrame:
    """Mean probe-loss delta per group and offset over every update of the group's ended runs (finished
    and diverged: a diverging trial's updates are part of the story): group, offset, mean, sem, n."""
    keys, _ = zoom_groups(runs, info)
    hist = histories(runs)
    frames = []
    for idx, r in runs[hist.map(lambda h: h is not None) & runs["status"].isin([FINISHED, DIVERGED])].iterrows():
        window = r.get("train.probe_window")
        window = int(window) if isinstance(window, (int, float, np.number)) and not pd.isna(window) else None
        d = update_deltas(hist[idx], window)
        if len(d):
            d["group"] = cell_label(r.to_dict(), keys)
            d["rank"] = method_rank(r.get("method"))
            frames.append(d)
    if not frames:
        return pd.DataFrame(columns=["group", "offset", "mean", "sem", "n"])
    d = pd.concat(frames, ignore_index=True)
    out = d.groupby(["rank", "group", "offset"], sort=True)["delta"].agg(["mean", "std", "count"]).reset_index()
    out["sem"] = out["std"] / np.sqrt(out["count"])
    return out.rename(columns={"count": "n"})[["group", "offset", "mean", "sem", "n"]]


def zoom_figure(runs: pd.DataFrame, info: SweepInfo):
    zoom = update_zoom(runs, info)
    if zoom.empty:
        return None
    fig = _figure(7.5, 4.2)
    ax = fig.add_subplot()
    for group, g in zoom.groupby("group", sort=False):
        (line,) = ax.plot(g["offset"], g["mean"], "o-", ms=3.5, label=f"{group} ({int(g['n'].max())} updates)")
        sem = g["sem"].fillna(0.0)
        ax.fill_between(g["offset"], g["mean"] - sem, g["mean"] + sem, color=line.get_color(), alpha=0.15)
    ax.axhline(0.0, color="gray", lw=0.8)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("steps after the topology update (0 = probe just before it)")
    ax.set_ylabel("probe loss − probe loss before update")
    ax.set_title("Probe loss around topology updates (mean ± s.e.m. over updates)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------- metric vs a swept key
def metric_vs_axis_figure(runs: pd.DataFrame, info: SweepInfo, axis: str, metric: str, title: str,
                          order_by: str | None = None):
    """Mean ± std over seeds (FINISHED runs) of `metric` against the swept key `axis`, one line per
    combination of the other swept keys (an axis of names placed at their runs' `order_by` value on a
    log scale, where each name has one: a model at its size). None when `axis` is not swept or nothing
    finished has `metric`."""
    if axis not in info.swept or axis not in runs or metric not in runs:
        return None
    ok = runs[(runs["status"] == FINISHED) & pd.to_numeric(runs[metric], errors="coerce").notna()].copy()
    if ok.empty:
        return None
    ok[metric] = pd.to_numeric(ok[metric], errors="coerce")
    x_num = pd.to_numeric(ok[axis], errors="coerce")
    categorical = x_num.isna().any()
    placed = None  # (positions, names) of a named axis placed by `order_by`
    if categorical:
        names = ok[axis].map(fmt_value)
        by = pd.to_numeric(ok[order_by], errors="coerce") if order_by in ok else pd.Series(math.nan, index=ok.index)
        sized = bool((by > 0).all() and by.groupby(names).nunique().max() == 1)
        at = by.groupby(names).first().sort_values(kind="stable") if sized else None
        if sized and at.is_unique:
            ok["_x"] = by
            placed = (list(at), list(at.index))
        else:  # evenly spaced: by size where every name has one (two of a size), else as the runs come
            order = list(at.index) if sized else list(dict.fromkeys(names))
            ok["_x"] = names.map(order.index)
    else:
        ok["_x"] = x_num
    others = [k for k in info.swept if k != axis and k in ok]
    fig = _figure(7.0, 4.2)
    ax = fig.add_subplot()
    groups = ok.groupby(others, dropna=False, sort=False) if others else [((), ok)]
    for cell, g in sorted(groups, key=lambda cg: method_rank(cg[1]["method"].iloc[0]) if "method" in cg[1] else 0):
        s = g.groupby("_x")[metric].agg(["mean", "std", "count"]).reset_index().sort_values("_x")
        label = cell_label(g.iloc[0].to_dict(), others) if others else metric
        ax.errorbar(s["_x"], s["mean"], yerr=s["std"].fillna(0.0), marker="o", ms=4, capsize=3, label=label)
    if placed:
        ax.set_xscale("log")
        ax.set_xticks(*placed)
        ax.minorticks_off()
        ax.set_xlabel(f"{axis} (at its {label_and_format(order_by)[0]}, log scale)")
    elif categorical:
        ax.set_xticks(range(len(order)), order)
    else:
        xs = np.sort(ok["_x"].unique())
        positive = xs[xs > 0]
        if len(positive) and xs.max() / positive.min() >= 20:
            ax.set_xscale("symlog", linthresh=float(positive.min()))
        ax.set_xticks(xs, [fmt_value(float(x)) for x in xs])
    if not placed:
        ax.set_xlabel(axis)
    ax.set_ylabel(label_and_format(metric)[0])
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# Every plot of the report: (file name, caption, builder(runs, info) -> Figure or None).
FIGURES = [
    ("loss_curves.png", "Loss curves per method (smoothed, the raw train loss faintly beneath), topology updates and "
     "spike events marked; the y range leaves out the first 10 % of steps.", loss_curves_figure),
    ("loss_overlay.png", "Train loss of every cell overlaid on one axis: mean over its finished seeds, smoothed "
     "(dashed: a cell with no finished run, from its other runs); the y range leaves out the first 10 % of steps, "
     "the drop every run shares.", overlay_figure),
    ("update_zoom.png", "Probe loss in the steps around topology updates, relative to just before the update.",
     zoom_figure),
    ("probe_jump_vs_warmup.png", "Mean probe jump vs the regrown weights' warm-up length W.",
     lambda runs, info: metric_vs_axis_figure(runs, info, WARMUP_KEY, MEAN_PROBE_JUMP, "Probe jump vs warm-up length W")),
    ("probe_jump_vs_update_every.png", "Mean probe jump vs the topology update interval ΔT.",
     lambda runs, info: metric_vs_axis_figure(runs, info, UPDATE_KEY, MEAN_PROBE_JUMP,
                                              "Probe jump vs update interval ΔT")),
    ("val_ppl_vs_density.png", "Final validation perplexity vs density, per method.",
     lambda runs, info: metric_vs_axis_figure(runs, info, DENSITY_KEY, FINAL_VAL_PPL, "Validation perplexity vs density")),
    ("memory_vs_density.png", "Optimizer-state + gradient memory relative to dense Adam vs density.",
     lambda runs, info: metric_vs_axis_figure(runs, info, DENSITY_KEY, STATE_RATIO, "Training-state memory vs density")),
    ("val_ppl_vs_model.png", "Final validation perplexity vs model (at its parameter count), per method: a "
     "scaling study.",
     lambda runs, info: metric_vs_axis_figure(runs, info, MODEL_KEY, FINAL_VAL_PPL, "Validation perplexity vs model",
                                              order_by=PARAMETERS)),
    ("regrown_update_share.png", "Per-layer attribution of the topology updates: each sparse layer's share of the "
     "regrown weights' squared update norm over the probe window (mean over a method's runs).",
     lambda runs, info: attribution.figure(runs)),
    ("lr_transfer.png", "The density-aware LR claim, per sparse method: final val loss vs base lr per density, "
     "and the best lr vs density with the fitted exponent p (lr* ∝ d^-p; SMET's rule is p = 1).",
     lambda runs, info: lr_transfer.figure(runs, lr_transfer.fits(runs))),
]


def report_figures(runs: pd.DataFrame, info: SweepInfo) -> list[tuple[str, str, object]]:
    """[(file name, caption, Figure)] of every plot this sweep has data and axes for."""
    out = []
    for name, caption, build in FIGURES:
        fig = build(runs, info)
        if fig is not None:
            out.append((name, caption, fig))
    return out
