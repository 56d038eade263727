"""The lr_transfer fit over trials that ran as several sweeps (e.g. seed 0 first, seeds 1-2 later, or
a grid extended afterwards), possibly in several MLflow stores.

    python analysis/lr_transfer_combined.py URI:SWEEP [URI:SWEEP ...] [--methods smet_no_scaling]
        [--png analysis/plots/lr_transfer.png] [--md analysis/tables/lr_transfer.md]

URI is an MLflow tracking URI (sqlite:////tmp/lr/mlflow.db), SWEEP a sweep name or parent run id. The
runs are pooled (a (method, density, lr, seed) cell that ran twice keeps its latest run), then fitted
and drawn exactly as a single sweep's report does (smet_lab.report.lr_transfer). Prints the optima per
method, density and seed, mean ± std over seeds, and the exponent p.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from smet_lab.report.data import FINISHED, SEED
from smet_lab.report.io import load_sweep_runs
from smet_lab.report.lr_transfer import DENSITY, LR, figure, fits


def pooled(sources: list[str], methods: list[str] | None) -> pd.DataFrame:
    frames = []
    for source in sources:
        uri, _, sweep = source.rpartition(":")
        frames.append(load_sweep_runs(uri, sweep)[1])
    runs = pd.concat(frames, ignore_index=True)
    runs = runs[runs["status"] == FINISHED]
    if methods:
        runs = runs[runs["method"].isin([*methods, "dense"])]
    return runs.sort_values("start_time").drop_duplicates(["method", DENSITY, LR, SEED], keep="last")


def exponent(optima: pd.DataFrame) -> float:
    """p of log lr* = log c - p log d over these optima."""
    return float(-np.polyfit(np.log(optima["density"]), np.log(optima["lr_star"]), 1)[0])


def spread(optima: pd.DataFrame) -> str:
    """p over the sparse densities only: all seeds pooled, ± the std of the per-seed values."""
    sparse = optima[optima["density"] < 1]
    per_seed = [exponent(g) for _, g in sparse.groupby("seed")]
    return f"{exponent(sparse):.2f}" + (f" ± {np.std(per_seed, ddof=1):.2f}" if len(per_seed) > 1 else "")


def table(transfers: dict) -> str:
    lines = ["| method | density | lr* per seed | mean ± std | p (d = 0.1 .. 1) | p (sparse d only) |",
             "|---|---|---|---|---|---|"]
    for method, t in transfers.items():
        p_all = f"{t.p:.2f}" + (f" ± {t.p_std:.2f}" if np.isfinite(t.p_std) else "")
        for d, g in t.optima.groupby("density"):
            per_seed = ", ".join(f"{lr:.2e}{'*' if edge else ''}" for lr, edge in zip(g["lr_star"], g["at_edge"]))
            std = f" ± {g['lr_star'].std():.1e}" if len(g) > 1 else ""
            lines.append(f"| {method} | {d:g} | {per_seed} | {g['lr_star'].mean():.2e}{std} | {p_all} | "
                         f"{spread(t.optima)} |")
    return "\n".join(lines) + "\n\n(* = at the grid's edge: a bound only. ±: std over seeds.)\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sources", nargs="+", metavar="URI:SWEEP")
    ap.add_argument("--methods", nargs="+")
    ap.add_argument("--png", type=Path)
    ap.add_argument("--md", type=Path)
    a = ap.parse_args()
    runs = pooled(a.sources, a.methods)
    transfers = {m: t for m, t in fits(runs).items() if t is not None}
    text = table(transfers)
    print(f"{len(runs)} finished runs\n{text}")
    for method, t in transfers.items():
        print(f"{method}: {t.line()}")
    if a.md:
        a.md.write_text(text)
    if a.png:
        figure(runs, transfers).savefig(a.png)


if __name__ == "__main__":
    main()
