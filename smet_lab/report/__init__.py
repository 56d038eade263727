"""Reports built from run histories and MLflow runs (design §8). Importing this pulls in pandas and
numpy only: no Ray, MLflow or Hydra at module import. The spike metrics themselves live in
smet_lab.spikes, shared with the trainer (it logs them at the end of every run); they are re-exported here."""

from smet_lab.spikes import (probe_summary, run_spike_summary, spike_events, spike_flags,
                                  spike_score)

__all__ = ["probe_summary", "run_spike_summary", "spike_events", "spike_flags", "spike_score"]
