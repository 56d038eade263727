"""The run-level metric registry (smet_lab.metrics) and smet_lab.extend.register_metric: a registered
metric is logged by a real run, recomputed by the report for unfinished runs, and shown in the report's
tables, glossary and table specs."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from smet_lab.extend import register_metric
from smet_lab.metrics import FINAL_VAL_PPL, METRICS, table_metrics

NAME = "summary/late_train_loss"
DEFINITION = "Mean train loss over the run's last 10 steps."


@pytest.fixture
def registry():
    """The registry as it was before the test: a metric registered here must not leak into other tests."""
    saved = dict(METRICS)
    yield METRICS
    METRICS.clear()
    METRICS.update(saved)


def late_loss(rows: list) -> float:
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    return sum(losses[-10:]) / 10


def register_late_loss():
    return register_metric(NAME, "late train loss", "{:.3f}", "lower", DEFINITION, compute=late_loss)


def test_registered_metric_is_logged_by_a_real_run(registry):
    import torch

    from smet_lab.config import DataConfig, ModelConfig, RunConfig
    from smet_lab.data import load_corpus
    from smet_lab.train import QUIET, train

    register_late_loss()
    cfg = RunConfig()
    cfg.model = ModelConfig(name="test", dim=32, n_layers=1, n_heads=2, ffn_dim=64, seq_len=16)
    cfg.train.max_steps, cfg.train.batch_size, cfg.train.eval_every, cfg.train.eval_batches = 30, 4, 30, 2
    cfg.train.probe_batch_size, cfg.sparsity.update_every = 8, 10
    cfg.train.threads = 1  # a model this small runs ten times faster on one thread than on contended cores
    threads = torch.get_num_threads()
    try:
        res = train(cfg, corpus=load_corpus(DataConfig(name="synthetic", max_tokens=20_000)), callbacks=QUIET)
    finally:
        torch.set_num_threads(threads)  # train() set it for the whole process
    expected = pd.DataFrame(res.history).set_index("step")["train/loss"].loc[21:30].mean()
    assert len(res.history) == 30 and res.summary[NAME] == pytest.approx(expected, rel=1e-12)


def test_a_metric_that_raises_or_returns_no_number_is_left_out_with_a_warning(registry, capsys):
    from smet_lab.metrics import computed

    register_late_loss()

    def broken(rows):
        return rows[10**6]["train/loss"]

    register_metric("summary/broken", "broken", definition="Raises.", compute=broken)
    register_metric("summary/text", "text", definition="Not a number.", compute=lambda rows: "high")
    rows = [{"step": s, "train/loss": float(s)} for s in range(1, 21)]
    values = computed(rows)
    assert values[NAME] == pytest.approx(sum(range(11, 21)) / 10)  # the others are still computed
    assert "summary/broken" not in values and "summary/text" not in values
    warned = capsys.readouterr().err.strip().splitlines()
    assert warned[0] == ("smet_lab: warning: metric summary/broken raised IndexError: list index out of range at "
                         f"{__file__}:{broken.__code__.co_firstlineno + 1}; left out")
    assert warned[1].startswith("smet_lab: warning: metric summary/text raised ValueError: could not convert string "
                                "to float: 'high'") and len(warned) == 2


def test_registered_metric_shows_in_the_report_tables_and_glossary(registry):
    from smet_lab.report.glossary import glossary
    from smet_lab.report.tables import cell_stats, pivot_table, trial_table

    register_late_loss()
    assert table_metrics()[-1] == NAME  # after the built-in columns, whose order is unchanged
    runs = pd.DataFrame([{"run_id": f"r{s}", "trial": f"method=smet,seed={s}", "status": "FINISHED", "error": None,
                          "history": None, "method": "smet", "train.seed": s, NAME: v}
                         for s, v in enumerate([2.0, 2.5, 3.0])])
    trials = trial_table(runs, ["method"])
    assert list(trials.columns)[-1] == "late train loss"
    assert trials["late train loss"].tolist() == ["2.000", "2.500", "3.000"]
    pivot = pivot_table(cell_stats(runs, ["method"]), ["method"])
    assert pivot["late train loss"].tolist() == ["2.500 ± 0.500"]  # mean and sample std of 2, 2.5, 3
    assert ("late train loss", DEFINITION) in glossary()


def test_report_recomputes_a_registered_metric_for_a_run_without_summary(registry):
    from smet_lab.report.data import from_history

    register_late_loss()
    steps = np.arange(1, 41)
    history = pd.DataFrame({"step": steps, "train/loss": 5.0 - 0.05 * steps,
                            "val/loss": np.where(steps % 20 == 0, 4.0, np.nan)})  # NaN: the step logged no val
    filled = from_history(history, {"summary/spike_score": 0.0})
    assert filled[NAME] == pytest.approx(np.mean(5.0 - 0.05 * np.arange(31, 41)))
    assert "summary/spike_score" not in filled  # logged values are kept
    assert NAME not in from_history(history, {NAME: 1.0, **{k: 0.0 for k, m in METRICS.items() if m.from_history}})


def test_table_spec_takes_format_and_direction_from_the_registry(registry, tmp_path):
    from smet_lab.report.specs import load_spec

    register_metric("summary/accuracy", "accuracy", "{:.1%}", "higher", "Fraction of correct next tokens.")
    (tmp_path / "acc.yaml").write_text("sweep: density\nrows: method\nmetric: summary/accuracy\n")
    spec = load_spec(tmp_path / "acc.yaml")
    assert (spec.format, spec.better) == ("{:.1%}", "max")
    (tmp_path / "ppl.yaml").write_text(f"sweep: density\nrows: method\nmetric: {FINAL_VAL_PPL}\nbetter: max\n")
    assert (load_spec(tmp_path / "ppl.yaml").format, load_spec(tmp_path / "ppl.yaml").better) == ("{:.2f}", "max")


def test_register_metric_refuses_duplicates_and_incomplete_declarations(registry):
    register_late_loss()
    with pytest.raises(ValueError, match="already registered"):
        register_late_loss()
    with pytest.raises(ValueError, match="already registered"):
        register_metric(FINAL_VAL_PPL, "ppl", definition="Perplexity.")
    replaced = register_metric(NAME, "late loss", definition=DEFINITION, replace=True)
    assert METRICS[NAME] is replaced and replaced.compute is None and not replaced.from_history
    for bad, match in (({"better": "up"}, "better"), ({"definition": ""}, "definition"), ({"fmt": "{:d"}, "fmt")):
        with pytest.raises(ValueError, match=match):
            register_metric("summary/other", "other", **{"definition": "Something.", **bad})
    assert "summary/other" not in METRICS


def test_docs_name_every_metric_of_the_registry():
    """docs/design.md section 4 lists the MLflow keys; a metric declared in smet_lab.metrics but missing
    there (summary/ prefix and memory/bytes/<role> pattern as the section writes them) fails here."""
    section = (Path(__file__).parents[1] / "docs" / "design.md").read_text().split("## 4. Metrics")[1].split("\n## ")[0]
    named = set(re.findall(r"`([^`]+)`", section))
    role = "summary/memory/bytes/"
    missing = [m for m in METRICS if not ({m, m.removeprefix("summary/")} & named
                                          or (m.startswith(role) and m.removeprefix(role) in section))]
    assert len(METRICS) > 40 and not missing
