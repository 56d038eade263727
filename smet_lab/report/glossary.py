"""The report's glossary: what each number and curve it shows means, worded after the code that
computes it (smet_lab.spikes, smet_lab.train.trainer, smet_lab.train.memory, smet_lab.optim.smet_adam).

The report lists every table metric (all METRICS columns are always in its tables), the curves of the
plots it includes, and how to read mean ± std and "indistinguishable". A METRICS key without an entry
here fails the tests, so a new column cannot ship undefined.
"""

from __future__ import annotations

from smet_lab.report.data import METRICS, POS_JUMP
from smet_lab.report.tables import INDISTINCT
from smet_lab.spikes import UPDATE_SPIKE_THRESHOLD

PROBE_JUMP_TEXT = ("After each topology update the trainer takes the loss on one fixed held-out probe batch "
                   "(train.probe_batch_size sequences) at each of the next train.probe_window steps; the probe jump "
                   "is the highest of those losses minus the probe loss just before the update. A jump <= 0 means "
                   "the loss kept falling: no spike.")

# key -> definition; the term shown is METRICS' label for table metrics, else TERMS[key].
DEFINITIONS: dict[str, str] = {
    "summary/update_spike_rate": (
        f"Fraction of the run's topology updates whose probe jump is at least {UPDATE_SPIKE_THRESHOLD:.0%} of the "
        "probe loss just before the update. Lower is more stable; the report ranks stability by it first."),
    POS_JUMP: (
        "Mean of max(probe jump, 0) over the run's topology updates, computed by the report from the run's "
        "history (a run without one gets max(mean probe jump, 0), a lower bound). Lower is more stable; "
        "the report's second stability key."),
    "summary/mean_probe_jump": (
        "Mean probe jump over the run's topology updates, signed: negative jumps offset positive ones, so it "
        "is shown but never used to rank stability."),
    "summary/max_probe_jump": "Largest probe jump of the run.",
    "summary/spike_score": (
        "Fraction of the logged train-loss steps after the first 50 that are flagged: a non-finite loss, or a "
        "log loss at least 3 standard deviations above the mean of the previous 50 steps (current step "
        "excluded, upward only)."),
    "summary/spike_events": "Number of spike events: flagged steps at most 5 steps apart count as one event.",
    "summary/mean_regrow_update_ratio": (
        "Mean over the run's topology updates of |Δθ| / lr of the weights regrown at the update, averaged over "
        "those weights, on their first optimizer step after it (lr: the sparse layers' learning rate; the "
        "Adam update with its warm-up factor and weight decay)."),
    "summary/final_val_loss": (
        "Mean cross-entropy (nats per token) over the train.eval_batches fixed held-out validation batches, at "
        "the run's last evaluation (every train.eval_every steps and at the last step)."),
    "summary/final_val_ppl": "exp(final val loss), the exponent capped at 50.",
    "summary/memory/state_ratio_vs_dense_adam": (
        "Bytes of all gradients and optimizer state (dense layers' gradient, m and v; sparse layers' compact "
        "gradient, m and v buffers with their cohort ids, birth steps and position index) divided by dense "
        "Adam's 12 B (float32 gradient, m and v) per model parameter."),
    "summary/tokens_per_s": (
        "Training tokens (batch_size × grad_accum × seq_len per step) divided by the time spent in the "
        "training steps themselves (forward, backward, optimizer step); probes, topology updates and "
        "evaluations are not timed."),
    "probe_jump": PROBE_JUMP_TEXT,
    "train/loss": ("Cross-entropy (nats per token) of the step's training batch, averaged over its "
                   "train.grad_accum micro-batches."),
    "val/loss": "The same cross-entropy on the fixed held-out validation batches (dots), every train.eval_every steps.",
    "stability/probe_loss": ("Loss on the fixed probe batch just before a topology update and at each of the "
                             "train.probe_window steps after it; the update-zoom plot shows it minus the value "
                             "just before the update."),
    "mean_std": ("Mean ± sample std (ddof=1) over a cell's FINISHED seeds; a single seed is shown alone (no "
                 "spread). The seeds column reads finished/asked."),
    "indistinguishable": (
        "Two cells are told apart only when each has at least 2 seeds and their means differ by more than the "
        "sum of their stds (the mean ± std intervals do not overlap), in the first ranking metric where the "
        "means differ; a cell with one seed has no spread, so no difference is claimed."),
}
TERMS = {"probe_jump": "probe jump", "train/loss": "train loss", "val/loss": "val loss",
         "stability/probe_loss": "probe loss", "mean_std": "mean ± std", "indistinguishable": INDISTINCT}
# Which plot shows which curve: its terms are listed only when the plot is in the report.
FIGURE_TERMS = {"loss_curves.png": ("train/loss", "val/loss"), "loss_overlay.png": ("train/loss",),
                "update_zoom.png": ("stability/probe_loss",)}


def glossary(figure_names=(), metrics=None) -> list[tuple[str, str]]:
    """[(term, definition)] for the table metrics (default: all METRICS, as in the report's tables),
    the curves of the figures named, and the reading notes."""
    keys = ["probe_jump", *(metrics if metrics is not None else METRICS)]
    for name in figure_names:
        keys += [k for k in FIGURE_TERMS.get(name, ()) if k not in keys]
    keys += ["mean_std", "indistinguishable"]
    return [(METRICS[k][0] if k in METRICS else TERMS[k], DEFINITIONS[k]) for k in keys]
