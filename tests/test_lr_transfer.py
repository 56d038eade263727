"""The lr_transfer analysis: best lr per density and seed, and the exponent p of lr* = c d^-p."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from smet_lab.report.lr_transfer import DENSITY, LR, best_lr, figure, fit

LRS = np.geomspace(1e-4, 1e-1, 7)  # half-decade grid


def runs_with(p_by_seed: dict, densities=(0.1, 0.25, 0.5, 1.0), c=1e-3) -> pd.DataFrame:
    """Synthetic sweep results: final val loss = 2 + (log lr - log lr*)^2 with lr* = c d^-p (exact parabolas)."""
    rows = []
    for seed, p in p_by_seed.items():
        for d in densities:
            star = c * d ** -p
            for lr in LRS:
                rows.append({DENSITY: d, LR: lr, "train.seed": seed, "status": "FINISHED",
                             "summary/final_val_loss": 2.0 + (math.log(lr) - math.log(star)) ** 2})
    rows.append({DENSITY: 0.1, LR: 1e-3, "train.seed": 0, "status": "DIVERGED", "summary/final_val_loss": 0.0})
    return pd.DataFrame(rows)


def test_best_lr_is_the_parabola_vertex_and_flags_the_grid_edge():
    lr, edge = best_lr([1e-3, 1e-2, 1e-1], [1.0, 0.5, 1.0])  # symmetric in log lr: the middle point
    assert lr == pytest.approx(1e-2) and not edge
    lr, edge = best_lr([1e-3, 1e-2, 1e-1], [3.0, 2.0, 1.5])  # still falling at the largest lr
    assert lr == pytest.approx(1e-1) and edge
    # vertex of y = (x - log 2e-2)^2 through three grid points, off the grid point itself
    xs = [1e-3, 1e-2, 1e-1]
    lr, _ = best_lr(xs, [(math.log(x) - math.log(2e-2)) ** 2 for x in xs])
    assert lr == pytest.approx(2e-2, rel=1e-9)


def test_fit_recovers_the_exponent_and_its_spread_over_seeds():
    transfer = fit(runs_with({0: 0.65, 1: 0.70, 2: 0.75}))  # the DIVERGED row is ignored
    assert transfer.p == pytest.approx(0.70, abs=1e-9)
    assert transfer.p_std == pytest.approx(0.05, abs=1e-9)  # sample std of 0.65, 0.70, 0.75
    assert math.exp(transfer.log_c) == pytest.approx(1e-3, rel=1e-9)
    assert len(transfer.optima) == 12 and not transfer.optima["at_edge"].any()
    assert "p = 0.70 ± 0.05 (std over 3 seeds)" in transfer.line()
    fig = figure(runs_with({0: 0.65, 1: 0.70, 2: 0.75}), transfer)
    assert fig.axes[1].get_title() == transfer.line()


def test_optima_at_the_grid_edge_are_flagged_and_sweeps_without_both_axes_are_not_fitted():
    transfer = fit(runs_with({0: 2.0}))  # lr*(0.1) = 0.1: the grid's largest lr
    assert transfer.optima.set_index("density").loc[0.1, "at_edge"]
    assert "at the grid's edge" in transfer.line() and math.isnan(transfer.p_std)
    one_density = runs_with({0: 1.0}, densities=(0.25,))
    assert fit(one_density) is None and figure(one_density, None) is None
    assert fit(runs_with({0: 1.0}).drop(columns=[LR])) is None


def test_each_sparse_method_gets_its_own_fit_with_the_dense_runs_as_density_1():
    """smet_no_scaling with p = 1 and naive_dst with p = 0.5 at d < 1, one set of dense runs (d = 1, lr* = c):
    fits() recovers each exponent from its own runs plus the shared dense points."""
    from smet_lab.report.lr_transfer import fits

    a = runs_with({0: 1.0, 1: 1.0}, densities=(0.1, 0.25, 0.5))
    b = runs_with({0: 0.5, 1: 0.5}, densities=(0.1, 0.25, 0.5))
    dense = runs_with({0: 0.0, 1: 0.0}, densities=(1.0,))
    runs = pd.concat([a.assign(method="smet_no_scaling"), b.assign(method="naive_dst"), dense.assign(method="dense")],
                     ignore_index=True)
    out = fits(runs)
    assert set(out) == {"smet_no_scaling", "naive_dst"}
    assert out["smet_no_scaling"].p == pytest.approx(1.0, abs=1e-9)
    assert out["naive_dst"].p == pytest.approx(0.5, abs=1e-9)
    assert sorted(out["naive_dst"].optima["density"].unique()) == [0.1, 0.25, 0.5, 1.0]
    fig = figure(runs, out)
    assert len(fig.axes) == 4 and fig.axes[3].get_title() == out["naive_dst"].line()
