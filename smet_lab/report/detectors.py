"""The three spike detectors side by side, and when they fire relative to the topology updates: per
method, the detections per run, the share that falls inside the probe window after an update, and the
median steps since the last update (smet_lab.spikes.detector_steps)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from smet_lab.report.data import DIVERGED, FINISHED, histories, method_rank
from smet_lab.spikes import DETECTORS, detector_steps

COLUMNS = ["method", "detector", "runs", "detections per run", "within the probe window after an update",
           "median steps since the last update"]


def lag_table(runs: pd.DataFrame) -> pd.DataFrame:
    hist = histories(runs)
    ended = runs[hist.map(lambda h: h is not None and "train/loss" in h) & runs["status"].isin([FINISHED, DIVERGED])]
    if ended.empty or "method" not in ended:
        return pd.DataFrame(columns=COLUMNS)
    rows = []
    for method in sorted(ended["method"].dropna().unique(), key=method_rank):
        group = ended[ended["method"] == method]
        found = []
        for idx, r in group.iterrows():
            window = r.get("train.probe_window")
            d = detector_steps(hist[idx])
            d["window"] = int(window) if isinstance(window, (int, float, np.number)) and not pd.isna(window) else 20
            found.append(d)
        d = pd.concat(found, ignore_index=True)
        for name in DETECTORS:
            hits = d[d["detector"] == name]
            near = (hits["since_update"] <= hits["window"]).sum()  # NaN (before any update) compares False
            rows.append({"method": method, "detector": name, "runs": len(group),
                         "detections per run": f"{len(hits) / len(group):.1f}",
                         "within the probe window after an update": f"{near}/{len(hits)}" if len(hits) else "—",
                         "median steps since the last update": (f"{hits['since_update'].median():.0f}"
                                                                if hits["since_update"].notna().any() else "—")})
    return pd.DataFrame(rows, columns=COLUMNS)
