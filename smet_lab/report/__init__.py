"""Reports built from run histories and MLflow runs (design §8). Importing this pulls in pandas and
numpy only: no Ray, MLflow or Hydra at module import."""

from smet_lab.report.spikes import (probe_summary, run_spike_summary, spike_events, spike_flags,
                                    spike_score)

__all__ = ["probe_summary", "run_spike_summary", "spike_events", "spike_flags", "spike_score"]
