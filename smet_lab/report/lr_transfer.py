"""The density-aware learning-rate claim, tested (`+sweep=lr_transfer`): fit lr*(d) = c * d^-p.

A sweep over density x base learning rate with the LR scaling off gives, for every (density, seed), the
final validation loss at each learning rate of the grid. The best learning rate of a (density, seed) is
the vertex of the parabola through the grid's best point and its two neighbours in log lr (the best
grid point itself when it lies at the grid's edge: such optima are flagged and only bound lr*). Then
log lr* = log c - p log d by least squares over every (density, seed) optimum; its spread is the
sample std of p fitted seed by seed. SMET's rule alpha_0 / d is p = 1, inverse_sqrt p = 0.5, and no
transfer at all (the dense optimum everywhere) p = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from smet_lab.metrics import FINAL_VAL_LOSS
from smet_lab.report.data import FINISHED, SEED

DENSITY, LR = "sparsity.density", "optim.lr"
RULES = {"alpha_0 / d (SMET)": 1.0, "alpha_0 / sqrt(d)": 0.5, "alpha_0 (no scaling)": 0.0}


@dataclass(frozen=True)
class Transfer:
    optima: pd.DataFrame  # density, seed, lr_star, at_edge
    p: float  # the exponent fitted over all optima
    p_std: float  # sample std of the per-seed exponents (nan with one seed)
    log_c: float

    def line(self) -> str:
        spread = f" ± {self.p_std:.2f} (std over {self.optima['seed'].nunique()} seeds)" if math.isfinite(self.p_std) else ""
        edge = int(self.optima["at_edge"].sum())
        flagged = f"; {edge} optimum(s) at the grid's edge (a bound only)" if edge else ""
        return f"best lr ∝ d^-p with p = {self.p:.2f}{spread}; SMET's rule alpha_0 / d is p = 1{flagged}"


def best_lr(lrs, losses) -> tuple[float, bool]:
    """(lr*, at_edge): the vertex in log lr of the parabola through the best point and its neighbours."""
    order = np.argsort(lrs)
    x, y = np.log(np.asarray(lrs, float)[order]), np.asarray(losses, float)[order]
    i = int(np.argmin(y))
    if i == 0 or i == len(x) - 1:
        return float(math.exp(x[i])), True
    a, b, _ = np.polyfit(x[i - 1:i + 2], y[i - 1:i + 2], 2)
    vertex = -b / (2 * a) if a > 0 else x[i]
    return float(math.exp(min(max(vertex, x[i - 1]), x[i + 1]))), False


def _slope(optima: pd.DataFrame) -> tuple[float, float]:
    """(p, log c) of log lr* = log c - p log d."""
    slope, intercept = np.polyfit(np.log(optima["density"]), np.log(optima["lr_star"]), 1)
    return float(-slope), float(intercept)


def _of_method(runs: pd.DataFrame, method) -> pd.DataFrame:
    """A sparse method's runs and the dense runs (its density-1 points); all runs for method None."""
    if method is None or "method" not in runs:
        return runs
    return runs[runs["method"].isin([method, "dense"])]


def fits(runs: pd.DataFrame, metric: str = FINAL_VAL_LOSS) -> dict:
    """{sparse method: Transfer} for every method of the sweep that has a fit (the dense runs count as
    density 1 for each); {None: Transfer} for runs without a method column."""
    methods = [m for m in runs["method"].dropna().unique() if m != "dense"] if "method" in runs else [None]
    out = {m: fit(runs, metric, m) for m in methods}
    return {m: t for m, t in out.items() if t is not None}


def fit(runs: pd.DataFrame, metric: str = FINAL_VAL_LOSS, method=None) -> Transfer | None:
    """The fit over a sweep's finished runs (of `method` and dense, if given); None unless they vary
    both density (>= 2 values) and the learning rate (>= 3 values per density and seed)."""
    if not {DENSITY, LR, metric} <= set(runs.columns):
        return None
    runs = _of_method(runs, method)
    ok = runs[runs["status"] == FINISHED].copy()
    for col in (DENSITY, LR, metric):
        ok[col] = pd.to_numeric(ok[col], errors="coerce")
    ok = ok.dropna(subset=[DENSITY, LR, metric])
    seed = ok[SEED] if SEED in ok else pd.Series(0, index=ok.index)
    rows = []
    for (d, s), g in ok.groupby([ok[DENSITY], seed]):
        g = g.groupby(LR)[metric].mean()
        if len(g) >= 3:
            lr_star, edge = best_lr(g.index.to_numpy(), g.to_numpy())
            rows.append({"density": float(d), "seed": s, "lr_star": lr_star, "at_edge": edge})
    optima = pd.DataFrame(rows, columns=["density", "seed", "lr_star", "at_edge"])
    if optima["density"].nunique() < 2:
        return None
    p, log_c = _slope(optima)
    per_seed = [_slope(o)[0] for _, o in optima.groupby("seed") if o["density"].nunique() >= 2]
    p_std = float(np.std(per_seed, ddof=1)) if len(per_seed) >= 2 else float("nan")
    return Transfer(optima, p, p_std, log_c)


def figure(runs: pd.DataFrame, transfers, metric: str = FINAL_VAL_LOSS):
    """Per sparse method (`transfers`: a Transfer or {method: Transfer}), left: the metric vs lr per
    density (mean over seeds); right: lr* vs density on log-log axes with the fit and the rules' slopes.
    None without a fit."""
    from matplotlib.figure import Figure

    if isinstance(transfers, Transfer):
        transfers = {None: transfers}
    if not transfers:
        return None
    fig = Figure(figsize=(11.0, 4.2 * len(transfers)), dpi=100)
    for row, (method, transfer) in zip(fig.subplots(len(transfers), 2, squeeze=False), transfers.items()):
        _panels(row, _of_method(runs, method), transfer, metric, method)
    fig.tight_layout()
    return fig


def _panels(axes, runs: pd.DataFrame, transfer: Transfer, metric: str, method) -> None:
    left, right = axes
    ok = runs[runs["status"] == FINISHED].copy()
    for col in (DENSITY, LR, metric):
        ok[col] = pd.to_numeric(ok[col], errors="coerce")
    if method is not None:
        left.set_title(f"{method} (d = 1: dense)", fontsize=9)
    for d, g in ok.groupby(DENSITY):
        mean = g.groupby(LR)[metric].mean()
        left.plot(mean.index, mean.to_numpy(), "o-", ms=4, label=f"d = {d:g}")
    left.set_xscale("log")
    left.set_xlabel("base learning rate (optim.lr, no density scaling)")
    left.set_ylabel(metric)
    left.legend(fontsize=8)
    o = transfer.optima
    right.scatter(o["density"], o["lr_star"], c=np.where(o["at_edge"], "tab:red", "tab:blue"), zorder=3,
                  label="best lr per seed (red: at the grid's edge)")
    ds = np.geomspace(o["density"].min(), o["density"].max(), 50)
    right.plot(ds, np.exp(transfer.log_c) * ds ** -transfer.p, "k-", label=f"fit: p = {transfer.p:.2f}")
    anchor = float(np.exp(transfer.log_c))  # the fit's lr* at d = 1
    for (name, q), ls in zip(RULES.items(), (":", "--", "-.")):
        right.plot(ds, anchor * ds ** -q, color="gray", ls=ls, lw=1, label=name)
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("density d")
    right.set_ylabel("best learning rate lr*")
    right.set_title(transfer.line(), fontsize=8, wrap=True)
    right.legend(fontsize=7)
