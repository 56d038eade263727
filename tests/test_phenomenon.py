"""The paper's phenomenon on the default tiny run and embedded corpus (slow: ~6 runs of ~1 minute).

    pytest -m slow tests/test_phenomenon.py
"""

from __future__ import annotations

import statistics

import pytest

from smet_lab.config import RunConfig
from smet_lab.data import load_corpus
from smet_lab.methods import apply_method
from smet_lab.train import QUIET, train

SEEDS = (0, 1, 2)


@pytest.mark.slow
def test_default_run_naive_dst_spikes_and_smet_does_not():
    corpus = load_corpus(RunConfig().data)
    results = {}
    for method in ("naive_dst", "smet"):
        for seed in SEEDS:
            cfg = apply_method(RunConfig(), method)
            cfg.train.seed = seed
            res = train(cfg, corpus=corpus, callbacks=QUIET)
            assert res.status == "FINISHED"
            results[method, seed] = res.summary
    for seed in SEEDS:
        naive = results["naive_dst", seed]["summary/mean_probe_jump"]
        smet = results["smet", seed]["summary/mean_probe_jump"]
        assert naive >= 3 * smet, (seed, naive, smet)
        # The cold start itself: naive's regrown entries step ~2.5x lr, smet's lr / W.
        assert results["naive_dst", seed]["summary/mean_regrow_update_ratio"] > 2.0
        assert results["smet", seed]["summary/mean_regrow_update_ratio"] == pytest.approx(0.01, rel=0.01)
    val = {m: statistics.mean(results[m, s]["summary/final_val_loss"] for s in SEEDS) for m in ("naive_dst", "smet")}
    assert val["smet"] < val["naive_dst"], val
