"""The report's glossary: what each number and curve it shows means, worded after the code that
computes it (smet_lab.spikes, smet_lab.train.trainer, smet_lab.train.memory, smet_lab.optim.smet_adam).

The report lists every table metric (their definitions live with them in smet_lab.metrics, which
refuses a metric without one), the curves of the plots it includes, and how to read mean ± std and
"indistinguishable".
"""

from __future__ import annotations

from smet_lab.metrics import METRICS, table_metrics
from smet_lab.report.tables import INDISTINCT

PROBE_JUMP_TEXT = ("After each topology update the trainer takes the loss on one fixed held-out probe batch "
                   "(train.probe_batch_size sequences) at each of the next train.probe_window steps; the probe jump "
                   "is the highest of those losses minus the probe loss just before the update. A jump <= 0 means "
                   "the loss kept falling: no spike.")

# The terms that are not run-level metrics: key -> (term, definition).
TERMS: dict[str, tuple[str, str]] = {
    "probe_jump": ("probe jump", PROBE_JUMP_TEXT),
    "train/loss": ("train loss", "Cross-entropy (nats per token) of the step's training batch, averaged over its "
                                 "train.grad_accum micro-batches."),
    "val/loss": ("val loss", "The same cross-entropy on the fixed held-out validation batches (dots), every "
                             "train.eval_every steps."),
    "stability/probe_loss": ("probe loss", "Loss on the fixed probe batch just before a topology update and at each "
                                           "of the train.probe_window steps after it; the update-zoom plot shows it "
                                           "minus the value just before the update."),
    "stability/regrown_update_share": ("regrown update share", (
        "Per topology update and sparse layer: the layer's share of sum (delta theta / lr)^2 over the regrown "
        "entries and the train.probe_window steps after the update, estimated from up to 1024 sampled regrown "
        "blocks per layer (scaled by regrown / sampled) and normalised to 1 over the changed layers. It says "
        "which layers' regrown weights move the most, i.e. carry the cold start.")),
    "mean_std": ("mean ± std", "Mean ± sample std (ddof=1) over a cell's FINISHED seeds; a single seed is shown alone "
                               "(no spread). The seeds column reads finished/asked."),
    "indistinguishable": (INDISTINCT, (
        "Two cells are told apart only when each has at least 2 seeds and their means differ by more than the "
        "sum of their stds (the mean ± std intervals do not overlap), in the first ranking metric where the "
        "means differ; a cell with one seed has no spread, so no difference is claimed.")),
}
# Which plot shows which curve: its terms are listed only when the plot is in the report.
FIGURE_TERMS = {"loss_curves.png": ("train/loss", "val/loss"), "loss_overlay.png": ("train/loss",),
                "update_zoom.png": ("stability/probe_loss",),
                "regrown_update_share.png": ("stability/regrown_update_share",)}


def glossary(figure_names=(), metrics=None) -> list[tuple[str, str]]:
    """[(term, definition)] for the table metrics (default: all of them, as in the report's tables),
    the curves of the figures named, and the reading notes."""
    curves = []
    for name in figure_names:
        curves += [k for k in FIGURE_TERMS.get(name, ()) if k not in curves]
    shown = [METRICS[k] for k in (table_metrics() if metrics is None else metrics)]
    return [TERMS["probe_jump"], *((m.label, m.definition) for m in shown),
            *(TERMS[k] for k in [*curves, "mean_std", "indistinguishable"])]
