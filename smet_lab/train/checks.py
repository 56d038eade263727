"""Pre-flight checks of a run config: every key's value, before anything is built (no corpus is read,
no model built), each raising one ConfigError that names the key."""

from __future__ import annotations

import copy

import torch

from smet_lab.config import ConfigError, RunConfig
from smet_lab.data import check_data
from smet_lab.methods import METHODS
from smet_lab.model import validate_model
from smet_lab.optim.options import validate_optim_config
from smet_lab.sparse.topology import validate_sparsity
from smet_lab.sparse.updater import validate_dynamic
from smet_lab.train import checkpoint as ckpt


def validate_run(cfg: RunConfig) -> None:
    """Reject bad values before any work (one ConfigError per problem, key named)."""
    if cfg.method not in METHODS:
        raise ConfigError("method", cfg.method, "one of " + ", ".join(METHODS))
    if cfg.method == "dense" and cfg.sparsity.density != 1.0:
        raise ConfigError("sparsity.density", cfg.sparsity.density,
                          "method=dense trains every weight (1.0); use static, naive_dst or smet* for a sparse run")
    t = cfg.train
    for key in ("max_steps", "batch_size", "grad_accum", "eval_batches", "probe_batch_size"):
        v = getattr(t, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"train.{key}", v, "a positive integer")
    for key in ("eval_every", "log_every", "probe_window", "checkpoint_every", "threads", "seed"):
        v = getattr(t, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"train.{key}", v, "a non-negative integer")
    if t.device not in ("auto", "cpu", "cuda"):
        raise ConfigError("train.device", t.device, "one of auto, cpu, cuda")
    if t.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device", t.device, "CUDA is not available on this machine; use auto or cpu")
    for key in ("release_memory", "activation_checkpointing"):
        if not isinstance(getattr(t, key), bool):
            raise ConfigError(f"train.{key}", getattr(t, key), "true or false")
    if t.dtype not in ("float32", "bfloat16"):
        raise ConfigError("train.dtype", t.dtype, "one of float32, bfloat16")
    o = cfg.optim
    if o.schedule not in ("cosine", "constant"):
        raise ConfigError("optim.schedule", o.schedule, "one of cosine, constant")
    if isinstance(o.warmup_steps, bool) or not isinstance(o.warmup_steps, int) or o.warmup_steps < 0:
        raise ConfigError("optim.warmup_steps", o.warmup_steps, "a non-negative integer")
    if not isinstance(o.min_lr_ratio, (int, float)) or not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError("optim.min_lr_ratio", o.min_lr_ratio, "a number in [0, 1]")
    if not isinstance(o.grad_clip, (int, float)) or o.grad_clip < 0:
        raise ConfigError("optim.grad_clip", o.grad_clip, "a non-negative number (0 = off)")
    validate_model(cfg.model)


def check_config(cfg: RunConfig) -> int:
    """Pre-flight of the whole run config without building anything heavy (no corpus is read, no
    model built): what a command line runs before it creates any output or tracking run. Returns the
    vocabulary size the run will have (the tokenizer's; model.vocab_size is replaced by it)."""
    validate_run(cfg)
    s, o = cfg.sparsity, cfg.optim
    validate_sparsity(s.density, s.distribution, s.block_size, s.weights)
    if s.weights == "compact" and o.state != "compact" and s.density < 1.0:
        raise ConfigError("sparsity.weights", s.weights, "needs optim.state=compact (dense_masked keeps dense-size state)")
    validate_dynamic(s.update_every, s.prune_rate, s.prune_schedule, s.prune, s.growth)
    validate_optim_config(o)
    tokenizer = check_data(cfg.data)
    if cfg.train.resume_from:
        probe = copy.deepcopy(cfg)
        probe.model.vocab_size = tokenizer.vocab_size
        ckpt.check(cfg.train.resume_from, probe)
    return tokenizer.vocab_size
