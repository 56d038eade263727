"""The per-run artifact files: config.yaml, metrics.parquet (full history), loss_curve.png, and
summary.json (how the run ended and its summary metrics: what a report reads from a folder)."""

from __future__ import annotations

import json
import math
from pathlib import Path

SUMMARY_FILE = "summary.json"


def write_summary(out_dir: Path, status: str, error: str | None, summary: dict) -> Path:
    path = Path(out_dir) / SUMMARY_FILE
    path.write_text(json.dumps({"status": status, "error": error, "summary": summary}, default=float))
    return path


def history_frame(history: list[dict]):
    """One row per step, a column per metric key (NaN where a step lacks it), `step` first."""
    import pandas as pd

    keys = sorted({k for row in history for k in row} - {"step"})
    df = pd.DataFrame.from_records(history, columns=["step", *keys])
    df[keys] = df[keys].astype("float64")  # a metric present at few steps is still a float column
    return df.astype({"step": "int64"})


def plot_loss_curve(df, path: Path, title: str = "") -> None:
    # Figure without pyplot: no global backend state, safe in Ray workers and threads (Agg canvas).
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.add_subplot()
    if "train/loss" in df:
        train = df[["step", "train/loss"]].dropna()
        train = train[train["train/loss"].map(math.isfinite)]  # a diverged step would flatten the plot
        ax.plot(train["step"], train["train/loss"], color="tab:blue", alpha=0.3, lw=0.8, label="train loss")
        window = max(1, min(50, len(train) // 20))
        ax.plot(train["step"], train["train/loss"].rolling(window, center=True, min_periods=1).mean(),
                color="tab:blue", lw=1.5, label=f"train loss (rolling mean, {window} steps)")
    if "val/loss" in df:
        val = df[["step", "val/loss"]].dropna()
        ax.plot(val["step"], val["val/loss"], "o-", color="tab:orange", ms=4, label="val loss")
    if "topo/density" in df:
        for i, step in enumerate(df.loc[df["topo/density"].notna(), "step"]):
            ax.axvline(step, color="gray", lw=0.5, alpha=0.6, label="topology update" if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def write_run_artifacts(history: list[dict], config: dict, out_dir: Path, title: str = "") -> list[Path]:
    """Write the three run artifacts into out_dir; returns their paths."""
    from omegaconf import OmegaConf

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "config.yaml", out_dir / "metrics.parquet", out_dir / "loss_curve.png"]
    paths[0].write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    df = history_frame(history)
    df.to_parquet(paths[1], index=False)
    plot_loss_curve(df, paths[2], title)
    return paths
