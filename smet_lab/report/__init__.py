"""Reports built from run histories and MLflow runs (design §8). Importing this pulls in pandas and
numpy only: no Ray or Hydra at all, MLflow and matplotlib only inside the functions that need them.
The spike metrics live in smet_lab.spikes and the run-level metric registry in smet_lab.metrics, both
shared with the trainer.

    info, runs = load_sweep_runs("sqlite:///mlflow.db", "density")   # sweep name, experiment or run id
    build_report(info, runs, "reports/density")                      # pure: DataFrame -> files
    python -m smet_lab.report density                                # the same from the shell
    python -m smet_lab.report --tables                               # shipped table specs -> analysis/tables/
"""

from smet_lab.report.build import build_report, default_out_dir, report_for_sweep_dir, report_for_target
from smet_lab.report.data import SweepInfo, sweep_info_from_params, with_missing
from smet_lab.report.io import ReportError, load_sweep_runs
from smet_lab.report.plots import report_figures, update_deltas, update_zoom
from smet_lab.report.specs import TableSpec, load_spec, render_tables, spec_table
from smet_lab.report.tables import cell_stats, headline, partial_note, pivot_table, trial_table

__all__ = ["ReportError", "SweepInfo", "TableSpec", "build_report", "cell_stats", "default_out_dir", "headline",
           "load_spec", "load_sweep_runs", "partial_note", "pivot_table", "render_tables", "report_figures",
           "report_for_sweep_dir", "report_for_target", "spec_table", "sweep_info_from_params", "trial_table",
           "update_deltas", "update_zoom", "with_missing"]
