"""Pre-flight checks of a run config: every key's value, before anything is built (no corpus is read,
the model only on the meta device: shapes, no memory), each raising one ConfigError that names the key."""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path

import torch

from smet_lab.config import ConfigError, RuleError, RunConfig
from smet_lab.data import check_data
from smet_lab.methods import METHODS
from smet_lab.model import LLaMA, validate_model
from smet_lab.optim.options import LR_SCALING, validate_optim_config
from smet_lab.sparse.schedules import SCHEDULES
from smet_lab.sparse.topology import DISTRIBUTIONS, check_blocks, sparse_params, validate_patterns, validate_sparsity
from smet_lab.sparse.updater import validate_dynamic
from smet_lab.train import checkpoint as ckpt
from smet_lab.train.memory import WEIGHT_BYTES_PER_PARAM, training_floor_bytes

GIB = 1 << 30


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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


def check_config(cfg: RunConfig, fit_here: bool = True) -> int:
    """Pre-flight of the whole run config without building anything heavy (no corpus is read, the
    model only on the meta device): what a command line runs before it creates any output or tracking run. Returns the
    vocabulary size the run will have (the tokenizer's; model.vocab_size is replaced by it).
    fit_here=False: the run will not train on this machine (a Ray cluster's trial), or only its validity is asked:
    the memory floor is not checked."""
    validate_run(cfg)
    s, o = cfg.sparsity, cfg.optim
    validate_sparsity(s.density, s.distribution, s.block_size, s.weights)
    if s.weights == "compact" and o.state != "compact" and s.density < 1.0:
        raise ConfigError("sparsity.weights", s.weights, "needs optim.state=compact (dense_masked keeps dense-size state)")
    validate_dynamic(s.update_every, s.prune_rate, s.prune_schedule, s.prune, s.growth)
    if s.density < 1 and s.update_every > 0 and s.prune_rate > 0 and cfg.train.probe_window > s.update_every:
        # An update opens a new probe window: the one the update before opened would never close.
        raise ConfigError("train.probe_window", cfg.train.probe_window,
                          f"at most sparsity.update_every={s.update_every} (0: no probes): each topology update would cut "
                          "short the probe window of the one before, so no probe jump would ever be measured")
    validate_optim_config(o)
    if fit_here:
        check_threads(cfg.train.threads, usable_cores(), int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    tokenizer = check_data(cfg.data)
    check_shapes_and_fit(cfg, tokenizer.vocab_size, fit_here)
    if cfg.train.resume_from:
        probe = copy.deepcopy(cfg)
        probe.model.vocab_size = tokenizer.vocab_size
        ckpt.check(cfg.train.resume_from, probe)
        step = ckpt.step_of(cfg.train.resume_from)
        if step is not None and step >= cfg.train.max_steps:
            raise ConfigError("train.resume_from", cfg.train.resume_from, f"a checkpoint before the run's last step: this "
                              f"one is at step {step} and train.max_steps={cfg.train.max_steps}, so nothing is left to "
                              "train (to train on, give a larger train.max_steps)")
    return tokenizer.vocab_size


def no_update_note(config: dict) -> str | None:
    """A line when a dynamic sparse run would end before its first topology update (at step
    sparsity.update_every): it trains a static sparse model, which the method's regrowth settings never
    touch. Said, not refused: a short try-out run is the usual cause. `config`: the run's config as a dict."""
    s, t = config["sparsity"], config["train"]
    if s["density"] < 1 and s["prune_rate"] > 0 and 0 < t["max_steps"] <= s["update_every"]:
        return (f"no topology update in {t['max_steps']} steps (the first comes at sparsity.update_every="
                f"{s['update_every']}): the sparse layers keep their first topology, as method=static would")
    return None


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask: taskset, a container's cpuset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_threads(threads: int, cores: int, processes: int = 1) -> None:
    """More torch threads than cores (all processes of a torchrun on this host together) run several
    times slower than fewer: the threads wait on each other at every parallel op."""
    if threads > 1 and threads * processes > cores:
        most = max(1, cores // processes)
        raise ConfigError("train.threads", threads, f"at most {most}: "
                          + (f"{processes} processes x {threads} threads" if processes > 1 else f"{threads} threads")
                          + f" exceed the {cores} cores this process may use, and oversubscribed threads run "
                          "several times slower (0 = torch's default)")


def memory_bytes(device: torch.device) -> int | None:
    """The memory one process on `device` can use at most: the GPU's, or the host's RAM (a cgroup v2 limit if
    lower); None where the OS does not say."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        return min(total, int(limit)) if limit.isdigit() else total
    except OSError:
        return total


def check_rules(cfg: RunConfig, shapes: list[tuple]) -> None:
    """The rules that depend only on the config and the sparse layers' shapes, called once here: a user's
    rule that raises or breaks its contract stops the run before anything is created. (Growth and prune
    rules need a topology: their contract is checked at every update.)"""
    s, o = cfg.sparsity, cfg.optim
    calls = [("optim.lr_scaling.rule", o.lr_scaling.rule, lambda: LR_SCALING[o.lr_scaling.rule](s.density, o.lr_scaling.power))]
    if shapes:
        calls.append(("sparsity.distribution", s.distribution, lambda: DISTRIBUTIONS[s.distribution](shapes, s.density)))
    if shapes and s.update_every:
        calls.append(("sparsity.prune_schedule", s.prune_schedule,
                      lambda: [SCHEDULES[s.prune_schedule](p) for p in (0.0, 0.5, 1.0)]))
    for key, name, call in calls:
        try:
            call()
        except RuleError as exc:
            raise ConfigError(key, name, "its rule " + str(exc).removeprefix(f"{key}={name} ")) from None


def check_shapes_and_fit(cfg: RunConfig, vocab_size: int, fit_here: bool = True) -> None:
    """What depends on the model's layer shapes, read from the model built on the meta device (shapes, no
    memory): the sparse layers divide into blocks, something is sparse at density < 1, and (fit_here) the run's
    memory floor (weights, gradients, Adam state; the model is built dense first) fits this machine."""
    s = cfg.sparsity
    validate_patterns(s.dense_patterns)
    with torch.device("meta"):
        model = LLaMA(dataclasses.replace(cfg.model, vocab_size=vocab_size))
    n_all = sum(p.numel() for p in model.parameters())
    named = sparse_params(model, s.dense_patterns) if s.density < 1 else []
    if s.density < 1 and not named:
        raise ConfigError("sparsity.dense_patterns", list(s.dense_patterns),
                          f"match every weight matrix: nothing would be sparse at sparsity.density={s.density} "
                          "(method=dense trains the dense model)")
    check_blocks(named, s.block_size)
    check_rules(cfg, [tuple(p.shape) for _, p in named])
    n_sparse = sum(p.numel() for _, p in named)
    device = resolve_device(cfg.train.device)
    have = memory_bytes(device) if fit_here else None
    if have is None:
        return
    # Processes of one torchrun on this host each hold a replica; on a GPU each has its own device.
    replicas = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1) if device.type == "cpu" else 1

    def need(weights: str) -> int:
        return replicas * max(WEIGHT_BYTES_PER_PARAM * n_all,
                              training_floor_bytes(n_all - n_sparse, n_sparse, s.density, weights, cfg.optim.state))

    if need(s.weights) > have:
        where = f"GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "this machine"
        hint = "a smaller model"
        if s.weights == "dense" and n_sparse and cfg.optim.state == "compact":
            hint += f" (with sparsity.weights=compact: >= {need('compact') / GIB:.1f} GiB)"
        raise ConfigError("model", cfg.model.name,
                          f"its weights, gradients and Adam state need >= {need(s.weights) / GIB:.1f} GiB before "
                          f"activations ({n_all / 1e9:.2f} B parameters, density {s.density}, {s.weights} weights"
                          + (f", {replicas} processes" if replicas > 1 else "")
                          + f"); {where} has {have / GIB:.1f} GiB of memory; {hint}")
