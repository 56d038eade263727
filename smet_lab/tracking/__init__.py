"""MLflow tracking for smet_lab: the only package that imports MLflow (lazily, inside functions).

    check_tracking(cfg)                       fast pre-flight (ConfigError naming tracking.uri)
    with start_run(cfg, name, params, tags) as t:
        t.log_metrics({...}, step); t.log_artifacts(write_run_artifacts(history, config, out_dir))
"""

from smet_lab.tracking.artifacts import write_run_artifacts
from smet_lab.tracking.settings import TrackingConfig, check_tracking, flatten, resolve_uri
from smet_lab.tracking.tracker import NullTracker, Tracker, continue_run, find_or_start_run, start_run

__all__ = ["TrackingConfig", "check_tracking", "start_run", "write_run_artifacts", "flatten",
           "resolve_uri", "Tracker", "NullTracker", "continue_run", "find_or_start_run"]
