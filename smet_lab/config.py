"""Typed run configuration: the single source of truth for keys and defaults.

Plain dataclasses, so the core stays usable without Hydra. The Hydra layer (conf/ and cli.py)
registers these same classes as structured-config schemas, so a typo'd key or a wrong type is
caught at compose time. Key names are public (docs/design.md section 3).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional


class ConfigError(ValueError):
    """A bad configuration value. The message is one line: key, value, what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r} is not allowed: {allowed}")

    def __reduce__(self):  # pickled from a Ray trial's process: rebuilt from its three parts, not its message
        return type(self), (self.key, self.value, self.allowed)


class RuleError(RuntimeError):
    """A user's registered rule (smet_lab.extend) raised, or returned what its contract does not
    allow, during a run (one line; the run ends FAILED)."""

    @classmethod
    def raised(cls, rule: str, exc: BaseException, fn) -> "RuleError":
        """'RULE raised TYPE: MESSAGE at FILE:LINE', the line being the deepest one in fn's own file."""
        frames = traceback.extract_tb(exc.__traceback__)
        own = getattr(getattr(fn, "__code__", None), "co_filename", None)
        frame = next((f for f in reversed(frames) if f.filename == own), frames[-1] if frames else None)
        return cls(f"{rule} raised {type(exc).__name__}: {exc}" + (f" at {frame.filename}:{frame.lineno}" if frame else ""))


def did_you_mean(word: str, candidates) -> str:
    """"; did you mean X?" for the closest of `candidates`, or ""."""
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {match[0]}?" if match else ""


def no_such_path(path) -> str | None:
    """"no such file or folder" with a did-you-mean among its folder's entries, when `path` does not exist."""
    path = Path(path)
    if path.exists():
        return None
    try:
        entries = [str(path.parent / p.name) for p in path.parent.iterdir()]
    except OSError:  # no such folder either, or one we may not list
        entries = []
    return "no such file or folder" + did_you_mean(str(path), entries)


def cache_root() -> Path:
    """Where smet_lab keeps what it builds once (the C kernel, tokenized corpora):
    $SMET_LAB_CACHE, else $XDG_CACHE_HOME/smet_lab, else ~/.cache/smet_lab."""
    if os.environ.get("SMET_LAB_CACHE"):
        return Path(os.environ["SMET_LAB_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "smet_lab"


def check_writable_dir(key: str, path) -> None:
    """ConfigError unless a folder can be made (or written) at `path`: its nearest existing ancestor is
    a writable folder (a probe folder is made there and removed), so that bad input leaves nothing behind."""
    if "://" in str(path):
        raise ConfigError(key, str(path), "a folder path (every node mounting it at the same path, e.g. NFS); "
                          "URIs such as s3:// are not supported")
    p = Path(path).expanduser().absolute()
    while not p.exists():
        p = p.parent
    if not p.is_dir() or not os.access(p, os.W_OK | os.X_OK):
        raise ConfigError(key, str(path), f"a folder that can be written ({p} is {'not writable' if p.is_dir() else 'a file'})")
    try:  # what access() cannot tell (root on /proc or a read-only mount): made and removed at once
        tempfile.TemporaryDirectory(dir=p).cleanup()
    except OSError as exc:
        raise ConfigError(key, str(path), f"a folder that can be written (making one in {p} failed: {exc.strerror})") from None


def claim_folder(path: Path) -> Path:
    """`path`, or `path-2`, `path-3`, ... if taken: created here, atomically (mkdir), so two processes
    never get the same folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        candidate = path if n == 1 else path.with_name(f"{path.name}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1


# Config values that name a file or folder (after a prefix), read from the folder a command starts in.
# A sweep's trials run in other folders and a run may be resumed from elsewhere: both get them absolute.
PATH_KEYS = {"data.path": "", "data.cache_dir": "", "data.tokenizer": "hf:", "train.resume_from": "",
             "tracking.uri": "sqlite:///"}


def anchored(key: str, value: Any, cwd) -> Any:
    """A PATH_KEYS value with its relative path made absolute against `cwd`; anything else as it is
    (another key, None, `auto`, an absolute or ~ path, a hub name such as hf:t5-base)."""
    prefix = PATH_KEYS.get(key)
    if prefix is None or not isinstance(value, str) or not value.startswith(prefix):
        return value
    rest = value[len(prefix):]
    if rest in ("", "auto") or rest.startswith(("/", "~")) or (prefix == "hf:" and not (Path(cwd) / rest).exists()):
        return value
    return prefix + str(Path(cwd) / rest)


def anchor_config(container: dict, cwd) -> dict:
    """The config dict with every PATH_KEYS value anchored at `cwd` (in place; returned for chaining)."""
    for key in PATH_KEYS:
        section, _, name = key.partition(".")
        if isinstance(container.get(section), dict) and name in container[section]:
            container[section][name] = anchored(key, container[section][name], cwd)
    return container


@dataclass
class ModelConfig:
    name: str = "tiny"
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    ffn_dim: int = 176
    vocab_size: int = 256  # replaced by the tokenizer's vocabulary size at build time
    seq_len: int = 64
    norm_eps: float = 1e-6
    init_std: float = 0.02
    rope_theta: float = 10000.0


@dataclass
class DataConfig:
    name: str = "pysource"  # pysource | synthetic | text_files | c4
    path: Optional[str] = None  # text_files: a file, directory or glob; c4: optional local files
    tokenizer: str = "byte"  # byte | hf:<name or path to tokenizer.json>
    val_fraction: float = 0.05
    seed: int = 0
    max_tokens: int = 0  # 0 = whole corpus (streamed corpora: required budget, see data/)
    cache_dir: Optional[str] = None  # a folder (auto: cache_root()/corpora): tokenize once, then read memory-mapped


@dataclass
class SparsityConfig:
    density: float = 0.25
    distribution: str = "uniform"  # uniform | erk
    update_every: int = 100  # Delta T; 0 = static topology
    prune_rate: float = 0.3  # zeta
    prune_schedule: str = "cosine"  # cosine | constant | linear | wsd
    prune: str = "magnitude"
    growth: str = "random"  # random | gradient
    block_size: int = 1
    weights: str = "dense"  # dense | compact (only the active values are stored; needs optim.state=compact)
    dense_patterns: List[str] = field(
        default_factory=lambda: ["tok_embeddings", "output", "norm"]
    )


@dataclass
class RegrowConfig:
    reset_step: bool = True
    warmup_steps: int = 100  # W; 0 = no warm-up
    warmup_kind: str = "linear_lr"  # linear_lr | moment_damping | released (the released code, bugs included)


@dataclass
class LRScalingConfig:
    rule: str = "inverse"  # none | inverse | inverse_sqrt | power
    power: float = 1.0
    scope: str = "sparse"  # sparse | all


@dataclass
class OptimConfig:
    lr: float = 1e-3  # alpha_0, the dense-training LR; sparse layers get lr * scale(d)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 = off
    schedule: str = "cosine"  # cosine | constant
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    state: str = "compact"  # compact | dense_masked
    kernel: str = "auto"  # eager | compiled | auto: the compact step as one fused pass (C on CPU, torch.compile on CUDA; smet_lab.optim.fused)
    regrow: RegrowConfig = field(default_factory=RegrowConfig)
    lr_scaling: LRScalingConfig = field(default_factory=LRScalingConfig)


@dataclass
class TrainConfig:
    max_steps: int = 3000
    batch_size: int = 16
    grad_accum: int = 1
    eval_every: int = 500
    eval_batches: int = 8
    log_every: int = 10
    probe_window: int = 20
    probe_batch_size: int = 32
    checkpoint_every: int = 0  # 0 = only at the end when an output dir is given
    resume_from: Optional[str] = None
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "float32"  # float32 | bfloat16
    threads: int = 0  # 0 = leave torch's default
    dist_backend: str = "auto"  # several processes (torchrun, ray.workers_per_trial): auto | gloo | nccl
    release_memory: bool = False  # glibc: freed blocks >= 128 KiB go back to the OS at once (lower peak RSS, slower)
    activation_checkpointing: bool = False  # recompute each block's activations in backward (less memory)


@dataclass
class RunConfig:
    """Everything the core trainer needs (no tracking, sweep or Ray keys)."""

    method: str = "smet"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a (possibly partial) nested dict, rejecting unknown keys."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in (data or {}).items():
        if key not in known:
            raise ConfigError(prefix + key, value, f"unknown key; known keys: {', '.join(known)}")
        sub = dataclass_type(known[key])
        kwargs[key] = from_dict(sub, value, f"{prefix}{key}.") if sub and isinstance(value, dict) else value
    return cls(**kwargs)


def dataclass_type(f: dataclasses.Field):
    """The dataclass a field holds (a config section), or None for a leaf value."""
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return type(default) if dataclasses.is_dataclass(default) else None


def run_config_from(container: dict) -> RunConfig:
    """The core RunConfig from a full (Hydra-composed, resolved) config dict; other sections
    (tracking, ray, sweep, hydra) are ignored."""
    core = {k: v for k, v in container.items() if k in ("method", "model", "data", "sparsity", "optim", "train")}
    return from_dict(RunConfig, core)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
