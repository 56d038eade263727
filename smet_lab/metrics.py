"""Every run-level metric, declared once: its MLflow key, label, number format, which way is better,
its definition, and where its value comes from.

The trainer's summary and smet_lab.spikes write these keys; the report's trial and cell tables show
the metrics with `table=True` in the order declared here, and its glossary prints their definitions.
`smet_lab.extend.register_metric` adds one: a metric with a `compute(history_rows) -> float` is computed
at the end of every run and recomputed by the report for runs that logged no summary. No torch, no
pandas: the report and the trainer both import this.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Optional

from smet_lab.config import RuleError

BETTER = ("lower", "higher", "none")
DEFAULT_FMT = "{:.4g}"
UPDATE_SPIKE_THRESHOLD = 0.01  # a probe jump of >= 1 % of the probe loss before the update


@dataclass(frozen=True)
class Metric:
    name: str  # the MLflow key
    label: str  # the report's column header and glossary term
    fmt: str = DEFAULT_FMT  # Python format of one value
    better: str = "lower"  # lower | higher | none
    definition: str = ""  # what the glossary says (one or two sentences)
    from_history: bool = False  # the report recomputes it from a run's per-step history when it was not logged
    table: bool = True  # a column of the report's trial and cell tables
    compute: Optional[Callable[[list], float]] = None  # history rows (one dict per step) -> value

    def __post_init__(self):
        if self.better not in BETTER:
            raise ValueError(f"metric {self.name!r}: better={self.better!r}, expected one of {', '.join(BETTER)}")
        if not self.label or not self.definition:
            raise ValueError(f"metric {self.name!r} needs a label and a definition (the report's glossary shows them)")
        try:
            self.fmt.format(1.0)
        except (ValueError, IndexError, KeyError) as exc:
            raise ValueError(f"metric {self.name!r}: fmt={self.fmt!r} does not format a number: {exc}") from None


METRICS: dict[str, Metric] = {}  # the registry, in table order; smet_lab.extend.register_metric adds to it


def _declare(name: str, label: str, fmt: str, definition: str, better: str = "lower", **kw) -> str:
    METRICS[name] = Metric(name, label, fmt, better, definition, **kw)
    return name


def table_metrics() -> list[str]:
    """The keys of the report tables' metric columns, in order (registered metrics last)."""
    return [m.name for m in METRICS.values() if m.table]


def label_and_format(name: str) -> tuple[str, str]:
    """(label, fmt) of a metric; an unregistered key (a spec may name any logged metric) shows as itself."""
    m = METRICS.get(name)
    return (m.label, m.fmt) if m else (name, DEFAULT_FMT)


def computed(history_rows: list) -> dict[str, float]:
    """The values of the metrics that have a compute function, from a run's history rows. A metric
    whose compute raises, or returns no number, is left out with one warning line: a bug in a user's
    metric must not cost a finished run its summary and final checkpoint."""
    out = {}
    for m in METRICS.values():
        if m.compute is None:
            continue
        try:
            out[m.name] = float(m.compute(history_rows))
        except Exception as exc:  # noqa: BLE001 - the user's code
            print(f"smet_lab: warning: {RuleError.raised(f'metric {m.name}', exc, m.compute)}; left out",
                  file=sys.stderr)
    return out


# ------------------------------------------------------------------------- the report's table columns
# The stability ranking's two keys come first (smet_lab.report.tables.STABILITY_KEYS).
UPDATE_SPIKE_RATE = _declare(
    "summary/update_spike_rate", "update spike rate", "{:.2f}",
    f"Fraction of the run's topology updates whose probe jump is at least {UPDATE_SPIKE_THRESHOLD:.0%} of the probe "
    "loss just before the update. Lower is more stable; the report ranks stability by it first.", from_history=True)
POSITIVE_PROBE_JUMP = _declare(  # never logged: the report computes it (report.data.positive_probe_jump)
    "summary/mean_positive_probe_jump", "mean positive probe jump", "{:.4f}",
    "Mean of max(probe jump, 0) over the run's topology updates, computed by the report from the run's history (a "
    "run without one gets max(mean probe jump, 0), a lower bound). Lower is more stable; the report's second "
    "stability key.")
MEAN_PROBE_JUMP = _declare(
    "summary/mean_probe_jump", "mean probe jump", "{:+.4f}",
    "Mean probe jump over the run's topology updates, signed: negative jumps offset positive ones, so it is shown "
    "but never used to rank stability.", from_history=True)
MAX_PROBE_JUMP = _declare("summary/max_probe_jump", "max probe jump", "{:+.4f}", "Largest probe jump of the run.",
                          from_history=True)
SPIKE_SCORE = _declare(
    "summary/spike_score", "spike score", "{:.3f}",
    "Fraction of the logged train-loss steps after the first 50 that are flagged: a non-finite loss, or a log loss "
    "at least 3 standard deviations above the mean of the previous 50 steps (current step excluded, upward only).",
    from_history=True)
SPIKE_EVENTS = _declare("summary/spike_events", "spike events", "{:g}",
                        "Number of spike events: flagged steps at most 5 steps apart count as one event.",
                        from_history=True)
MEAN_REGROW_UPDATE_RATIO = _declare(
    "summary/mean_regrow_update_ratio", "regrow update ratio", "{:.3g}",
    "Mean over the run's topology updates of |Δθ| / lr of the weights regrown at the update, averaged over those "
    "weights, on their first optimizer step after it (lr: the sparse layers' learning rate; the Adam update with "
    "its warm-up factor and weight decay).", from_history=True)
FINAL_VAL_LOSS = _declare(
    "summary/final_val_loss", "final val loss", "{:.4f}",
    "Mean cross-entropy (nats per token) over the train.eval_batches fixed held-out validation batches, at the "
    "run's last evaluation (every train.eval_every steps and at the last step).")
FINAL_VAL_PPL = _declare("summary/final_val_ppl", "final val ppl", "{:.2f}",
                         "exp(final val loss), the exponent capped at 50.")
STATE_RATIO = _declare(
    "summary/memory/state_ratio_vs_dense_adam", "state memory / dense Adam", "{:.3f}",
    "Bytes of all gradients and optimizer state (dense layers' gradient, m and v; sparse layers' compact gradient, "
    "m and v buffers with their cohort ids, birth steps and position index) divided by dense Adam's 12 B "
    "(float32 gradient, m and v) per model parameter.")
TOKENS_PER_S = _declare(
    "summary/tokens_per_s", "tokens/s", "{:,.0f}",
    "Training tokens (batch_size × grad_accum × seq_len per step) divided by the time spent in the training steps "
    "themselves (forward, backward, optimizer step); probes, topology updates and evaluations are not timed.",
    better="higher")

# ------------------------------------------------------------------ logged, not columns of the tables
STEPS = _declare("summary/steps", "steps", "{:g}", "Optimizer steps the run has done.", better="none", table=False)
# Per topology update, one per sparse layer: its share of the regrown entries' squared update norm over
# the probe window (smet_lab.train.probe.UpdateRMS; the report's heat map).
REGROWN_UPDATE_SHARE_PREFIX = "stability/regrown_update_share/"
KERNEL_COMPILED = _declare("summary/optimizer_kernel_compiled", "compiled optimizer kernel", "{:g}",
                           "1 when the sparse layers' Adam step ran as the fused kernel (optim.kernel), "
                           "0 for the eager step.", better="none", table=False)
WORLD_SIZE = _declare("summary/world_size", "processes", "{:g}",
                      "How many processes trained the run together (data parallel; 1 = one process).",
                      better="none", table=False)
PARAMETERS = _declare("summary/parameters", "parameters", "{:,.0f}",
                      "The model's size: every weight of the dense model (a sparse layer counts in full).",
                      better="none", table=False)
COMM_BYTES = _declare("summary/comm_bytes_per_step", "all-reduced bytes per step", "{:,.0f}",
                      "Bytes each process all-reduces per optimizer step (the sparse layers' gradient buffer, "
                      "active entries only with the compact layout, plus the dense parameters' gradients); "
                      "0 for one process.", better="none", table=False)
FINAL_DENSITY = _declare("summary/density", "density", "{:.3f}",
                         "Fraction of the sparse layers' weights that are active at the end of the run.",
                         better="none", table=False)
SPIKE_EVENTS_NEAR_UPDATE = _declare(
    "summary/spike_events_near_update", "spike events near an update", "{:g}",
    "Spike events that start at most 20 steps after a topology update.", from_history=True, table=False)
MEAN_SPIKE_PEAK_RATIO = _declare(
    "summary/mean_spike_peak_ratio", "mean spike peak ratio", "{:.3f}",
    "Mean over the spike events with a finite peak of the peak loss divided by the mean loss of the 50 steps "
    "before the event.", from_history=True, table=False)
MEAN_RECOVERY_STEPS = _declare(
    "summary/mean_recovery_steps", "mean recovery steps", "{:.1f}",
    "Mean over the spike events that recover of the steps from the peak until the loss is back within one "
    "standard deviation of the mean before the event.", from_history=True, table=False)
SPIKE_SCORE_OLMO = _declare(
    "summary/spike_score_olmo", "spike score (OLMo detector)", "{:.3f}",
    "The spike score with OLMo-core's detector settings: a log train loss at least 6 standard deviations above the "
    "mean of the previous 128 logged steps (first 128 steps not judged).", from_history=True, table=False)
GRAD_SPIKE_EVENTS = _declare(
    "summary/grad_spike_events", "gradient-norm spikes", "{:g}",
    "Steps whose gradient norm (train/grad_norm, before clipping) has a z-score >= 2.5 against exponential moving "
    "averages (alpha 0.97) of the norm and of its squared deviation, ZClip's detector; not judged in the first 25 "
    "steps; a flagged norm enters the averages clipped to mean + 2.5 std.", from_history=True, table=False)
MEAN_ADAM_OUTLIER_FRAC = _declare(
    "summary/mean_adam_outlier_frac_regrown", "Adam outlier share of regrown weights", "{:.3f}",
    "Mean over the run's topology updates of stability/adam_outlier_frac_regrown: the share of the regrown "
    "weights' first 5 Adam updates (entry x step) whose preconditioned step |m_hat| / (sqrt(v_hat) + eps) exceeds 3, "
    "m_hat and v_hat bias-corrected with the step the method uses (a steady gradient gives 1; moments restarted "
    "from zero under a large global step give up to 3.16 on the first update and more on the next ones: Adam's "
    "preconditioner not yet tracking g^2).",
    from_history=True, table=False)
CUMULATIVE_MASK_FLIPS = _declare(
    "summary/cumulative_mask_flip_rate", "cumulative mask flip rate", "{:.3f}",
    "Sum over the run's topology updates of stability/mask_flip_rate: the fraction of the sparse layers' blocks "
    "that changed state (pruned or regrown) at the update.", better="none", from_history=True, table=False)
DIVERGED = _declare("summary/diverged", "diverged", "{:g}", "1 when the run stopped on a non-finite loss.",
                    table=False)
STATE_BYTES = _declare("summary/memory/state_bytes", "state bytes", "{:,.0f}",
                       "Bytes of all gradients and optimizer state.", table=False)
WEIGHT_BYTES = _declare("summary/memory/weight_bytes", "weight bytes", "{:,.0f}", "Bytes of the model's weights.",
                        table=False)
SPARSE_STATE_BYTES = _declare("summary/memory/sparse_state_bytes", "sparse state bytes", "{:,.0f}",
                              "Bytes of the sparse layers' gradients and optimizer state.", table=False)
SPARSE_STATE_RATIO = _declare(
    "summary/memory/sparse_state_ratio_vs_dense_adam", "sparse state memory / dense Adam", "{:.3f}",
    "Sparse state bytes divided by dense Adam's 12 B per weight of the sparse layers.", table=False)
TRAINING_BYTES = _declare(
    "summary/memory/training_bytes", "training memory bytes", "{:,.0f}",
    "Persistent training memory: the bytes of every weight, gradient and optimizer-state tensor (the sum of "
    "summary/memory/bytes/*); activations and temporaries not included.", table=False)
TRAINING_RATIO = _declare(
    "summary/memory/training_ratio_vs_dense_adam", "training memory / dense Adam", "{:.3f}",
    "Training memory bytes divided by dense Adam's 16 B (float32 weight, gradient, m and v) per parameter of the "
    "dense model.", table=False)
SPARSE_TRAINING_RATIO = _declare(
    "summary/memory/sparse_training_ratio_vs_dense_adam", "sparse layers' training memory / dense Adam", "{:.3f}",
    "The sparse layers' weights (dense tensors, or the active values with sparsity.weights=compact), gradients, "
    "optimizer state and position index, divided by dense Adam's 16 B per weight of those layers.", table=False)
ANALYTIC_MIN_BYTES = _declare(
    "summary/memory/analytic_min_bytes", "analytic minimum bytes", "{:,.0f}",
    "The least a float32 run of the method keeps: 16 B per dense-layer parameter and per active sparse weight, "
    "plus the compact layout's index (1 B per active block + 2 B per 256 blocks, and with a local step 1 B cohort "
    "id per active block + 8 B per cohort).", table=False)
MEMORY_ROLES = {
    "weights/dense": "the weights of the dense layers (embeddings, head, norms)",
    "weights/sparse": "the sparse layers' weights: dense zero-filled tensors, or the active values with "
                      "sparsity.weights=compact",
    "dense/grad": "the dense layers' gradients", "dense/exp_avg": "the dense layers' Adam first moments",
    "dense/exp_avg_sq": "the dense layers' Adam second moments",
    "sparse/grad": "the sparse layers' gradient buffer (active entries only with optim.state=compact)",
    "sparse/exp_avg": "the sparse layers' first moments", "sparse/exp_avg_sq": "the sparse layers' second moments",
    "sparse/cohort": "the compact layout's cohort id per active block (local step and warm-up)",
    "sparse/cohort_births": "the compact layout's birth step per cohort",
    "sparse/mask": "the dense_masked layout's active mask per block",
    "sparse/age": "the dense_masked layout's steps since regrowth per block",
    "sparse/index": "the topology's position store (1 B per active block + 2 B per 256 blocks)",
}
for _role, _what in MEMORY_ROLES.items():
    _declare(f"summary/memory/bytes/{_role}", f"{_role} bytes", "{:,.0f}", f"Bytes of {_what}.", table=False)
PEAK_CUDA_BYTES = _declare("summary/peak_cuda_bytes", "peak CUDA bytes", "{:,.0f}",
                           "Peak CUDA memory allocated by the run (torch.cuda.max_memory_allocated).", table=False)
PEAK_RSS_BYTES = _declare("summary/peak_rss_bytes", "peak RSS bytes", "{:,.0f}",
                          "Peak resident set size of the training process (CPU runs).", table=False)
