"""Where an update's disturbance comes from: each sparse layer's share of the regrown entries' squared
update norm over the probe window (stability/regrown_update_share/<layer>, smet_lab.train.probe), as a
heat map of layers x topology updates, one panel per method (mean over its ended runs)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from smet_lab.metrics import REGROWN_UPDATE_SHARE_PREFIX
from smet_lab.report.data import DIVERGED, FINISHED, histories, method_rank


def shares(runs: pd.DataFrame) -> dict:
    """{method: DataFrame (rows: layers in model order, columns: update steps) of the mean share}."""
    hist = histories(runs)
    out = {}
    ended = runs[hist.map(lambda h: h is not None) & runs["status"].isin([FINISHED, DIVERGED])]
    for method in sorted(ended["method"].dropna().unique(), key=method_rank) if "method" in ended else []:
        frames = []
        for idx in ended.index[ended["method"] == method]:
            h = hist[idx]
            cols = [c for c in h.columns if c.startswith(REGROWN_UPDATE_SHARE_PREFIX)]
            rows = h.loc[h[cols].notna().any(axis=1), ["step", *cols]] if cols else None
            if rows is not None and len(rows):
                frames.append(rows.set_index("step"))
        if frames:
            table = pd.concat(frames).groupby(level=0).mean().T
            table.index = [c.removeprefix(REGROWN_UPDATE_SHARE_PREFIX) for c in table.index]
            out[method] = table
    return out


def figure(runs: pd.DataFrame):
    tables = shares(runs)
    if not tables:
        return None
    from matplotlib.figure import Figure

    n_layers = max(len(t) for t in tables.values())
    fig = Figure(figsize=(7.5 * len(tables) ** 0.5 + 2, 1.2 + 0.22 * n_layers * len(tables)), dpi=100)
    axes = fig.subplots(len(tables), 1, squeeze=False).ravel()
    vmax = max(float(np.nanmax(t.to_numpy())) for t in tables.values())
    for ax, (method, table) in zip(axes, tables.items()):
        image = ax.imshow(table.to_numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_yticks(range(len(table)), table.index, fontsize=6)
        steps = list(table.columns)
        ticks = np.linspace(0, len(steps) - 1, min(len(steps), 10)).round().astype(int)
        ax.set_xticks(ticks, [int(steps[i]) for i in ticks], fontsize=7)
        ax.set_xlabel("topology update (step)", fontsize=8)
        ax.set_title(f"{method}: share of the regrown weights' update norm per layer", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    return fig
