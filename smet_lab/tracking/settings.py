"""Tracking settings, the fast pre-flight check and config flattening (no MLflow import here)."""

import os
import re
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from smet_lab.config import ConfigError

MAX_PARAM_LEN = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH (not imported: keeps this module cheap)
HEALTH_TIMEOUT_S = 3.0
ALLOWED_URIS = "sqlite:///PATH (relative to the working directory) or http(s)://HOST:PORT of an MLflow server"


@dataclass
class TrackingConfig:
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "smet_lab"
    enabled: bool = True
    tags: dict[str, str] = field(default_factory=dict)  # on every run: +tracking.tags.owner=alice


# MLflow's rule for tag names (mlflow.utils.validation), checked here so that a bad one fails before a run.
TAG_NAME = re.compile(r"^[/\w.\- ]{1,250}$")
RESERVED_TAG_PREFIXES = ("smet.", "mlflow.")


def sqlite_path(uri: str) -> Path | None:
    """The absolute database path of a `sqlite:///...` URI (None for other schemes)."""
    if not uri.startswith("sqlite:///") or len(uri) == len("sqlite:///"):
        return None
    # sqlite:///rel.db -> cwd/rel.db; sqlite:////abs.db -> /abs.db (SQLAlchemy's convention).
    return Path(os.path.expanduser(uri[len("sqlite:///"):])).absolute()


def resolve_uri(uri: str) -> str:
    """The URI as MLflow should get it: sqlite paths made absolute (trials chdir elsewhere)."""
    path = sqlite_path(uri)
    return f"sqlite:///{path}" if path is not None else uri.rstrip("/")


def check_tracking(cfg: TrackingConfig) -> None:
    """Fail in a second, with one line naming `tracking.uri`, instead of after a training run."""
    if not cfg.enabled:
        return
    for name in cfg.tags:
        if not TAG_NAME.match(name) or ".." in name:
            raise ConfigError(f"tracking.tags.{name}", cfg.tags[name], "a tag name of letters, digits, _ - . / and "
                              "spaces (MLflow's rule), e.g. +tracking.tags.owner=alice")
        if name.startswith(RESERVED_TAG_PREFIXES):
            raise ConfigError(f"tracking.tags.{name}", cfg.tags[name], "a name outside smet_lab's and MLflow's "
                              f"own tags (those starting with {' or '.join(RESERVED_TAG_PREFIXES)})")
    uri = cfg.uri
    path = sqlite_path(uri)
    if path is not None:
        if not path.parent.is_dir():
            raise ConfigError("tracking.uri", uri, f"{path.parent} is not an existing directory; {ALLOWED_URIS}")
        if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise ConfigError("tracking.uri", uri, f"{path} is not writable; {ALLOWED_URIS}")
        return
    parts = urlsplit(uri)
    try:
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a non-numeric or out-of-range port
        valid = False
    if not valid:
        raise ConfigError("tracking.uri", uri, ALLOWED_URIS)
    try:
        with urllib.request.urlopen(resolve_uri(uri) + "/health", timeout=HEALTH_TIMEOUT_S) as resp:
            ok = resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        ok = False
    if not ok:
        raise ConfigError("tracking.uri", uri, f"no MLflow server answers at {uri} (start one with "
                          "`mlflow server --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000` "
                          "or use sqlite:///mlflow.db)")


def quiet_mlflow() -> None:
    """For command-line entry points: no INFO chatter from MLflow's store set-up on a first run.
    (MLflow sets its logger's level from MLFLOW_LOGGING_LEVEL when it is imported.)"""
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


def _render(value) -> str:
    # Lists read like Hydra overrides ("[0.9, 0.999]"), whatever their container (tuple, ListConfig).
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return "[" + ", ".join(_render(v) for v in value) + "]"
    return str(value)


def flatten(nested: Mapping, prefix: str = "") -> dict[str, str]:
    """{"optim": {"betas": [0.9, 0.999]}} -> {"optim.betas": "[0.9, 0.999]"}, values cut to MLflow's limit."""
    flat: dict[str, str] = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
            continue
        text = "{}" if isinstance(value, Mapping) else _render(value)
        if len(text) > MAX_PARAM_LEN:  # MLflow rejects longer values; keep a visible marker of the cut
            text = text[: MAX_PARAM_LEN - 3] + "..."
        flat[name] = text
    return flat
