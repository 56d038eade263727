"""`--plan`: what a command would run, without running it. For a sweep: its trials and which of them a
resume would run, where it stores them, how many run at once and where they are tracked; for one run:
its size. Nothing is started or written (no Ray, no MLflow, no folder)."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from smet_lab.grid import leaves
from smet_lab.schema import local_cpus
from smet_lab.sweep.folder import resume_plan
from smet_lab.sweep.runner import plan, storage_root


def _tracked(cfg: DictConfig, what: str, untracked: str = "") -> str:
    tracking = OmegaConf.to_object(cfg.tracking)
    if not tracking.enabled:
        return f"not tracked (tracking=none){untracked}"
    return f"MLflow experiment '{tracking.experiment}' at {tracking.uri}: {what}"


def describe_run(cfg: DictConfig, output: str) -> str:
    import dataclasses

    import torch

    from smet_lab.config import run_config_from
    from smet_lab.model import LLaMA
    from smet_lab.train import check_config
    from smet_lab.train.checks import no_update_note, resolve_device

    run = run_config_from(OmegaConf.to_container(cfg, resolve=True))
    vocab = check_config(run)
    with torch.device("meta"):  # shapes only
        n = sum(p.numel() for p in LLaMA(dataclasses.replace(run.model, vocab_size=vocab)).parameters())
    t, s = run.train, run.sparsity
    tokens = t.max_steps * t.batch_size * run.model.seq_len
    sparse = f" ({s.distribution}, {s.weights} weights)" if s.density < 1 else ""
    note = no_update_note(dataclasses.asdict(run))
    resumes = []
    if t.resume_from:
        from smet_lab.train import checkpoint as ckpt

        changed = ckpt.changes(t.resume_from, run)
        resumes = [f"  resumes:  {ckpt.resolve(t.resume_from)} (step {ckpt.step_of(t.resume_from)})"
                   + (f"; changed: {', '.join(changed)}" if changed else "")]
    return "\n".join([
        f"one run: {run.method} at density {s.density:g}{sparse}, model {run.model.name} ({_count(n)} parameters, "
        f"vocabulary {vocab:,})",
        f"  training: {t.max_steps:,} steps x {t.batch_size} sequences x {run.model.seq_len} tokens = "
        f"{_count(tokens)} tokens of data={run.data.name} on {resolve_device(t.device)}",
        f"  output:   {output}",
        f"  tracking: {_tracked(cfg, 'one run')}", *resumes] + ([f"  note:     {note}"] if note else []))


def _count(n: int) -> str:
    return f"{n / 1e9:,.1f} B" if n >= 1e9 else f"{n / 1e6:,.1f} M" if n >= 1e6 else f"{n:,}"


def _values(values: list) -> str:
    return "[" + ", ".join(map(str, values)) + "]"


def _n(k, what: str) -> str:
    return f"{k:g} {what}{'s' * (k != 1)}"


def _resources(cfg: DictConfig) -> str:
    ray = cfg.ray
    shape = _n(ray.cpus_per_trial, "CPU") + (f" and {_n(ray.gpus_per_trial, 'GPU')}" if ray.gpus_per_trial else "")
    if ray.workers_per_trial > 1:
        shape = f"{ray.workers_per_trial} processes of {shape}"
    cap = f", at most {ray.max_concurrent} at once (ray.max_concurrent)" if ray.max_concurrent else ""
    if ray.address != "local":
        return f"the Ray cluster at {ray.address}: {shape} per trial, as many at once as it holds{cap}"
    cpus = local_cpus(ray)
    at_once = cpus // (ray.cpus_per_trial * ray.workers_per_trial)
    at_once = min(at_once, ray.max_concurrent) if ray.max_concurrent else at_once
    return f"a local Ray with {_n(cpus, 'CPU')}, {shape} per trial: {_n(at_once, 'trial')} at a time"


def describe_sweep(cfg: DictConfig, compose_for) -> str:
    from smet_lab.train.checks import no_update_note

    sweep, trials, configs = plan(cfg, compose_for)
    sweep_dir = storage_root(cfg, sweep) / sweep.name
    state, states, _ = resume_plan(sweep, sweep_dir, trials)
    steps = sorted({c["train"]["max_steps"] for c in configs.values()})
    tokens = sum(c["train"]["max_steps"] * c["train"]["batch_size"] * c["model"]["seq_len"] for c in configs.values())
    grid = [f"{key} {_values(values)}" for key, values in leaves(sweep.params).items()]
    grid.append(f"seed {_values(sweep.seeds)}")
    extra = f" + {len(sweep.extra_trials)} extra trial{'s' * (len(sweep.extra_trials) != 1)} per seed" \
        if sweep.extra_trials else ""
    tracked = _tracked(cfg, "a parent run and one child run per trial", "; the report is read from the folder")
    width = max(len(t.key) for t in trials)
    each = f"{steps[0]:,}" if len(steps) == 1 else f"{steps[0]:,}-{steps[-1]:,}"
    lines = [f"sweep {sweep.name}: {len(trials)} trials, {each} steps each ({_count(tokens)} training tokens in all)",
             f"  grid:     {' x '.join(grid)}{extra}",
             f"  folder:   {sweep_dir} ({state})",
             f"  runs on:  {_resources(cfg)}",
             f"  tracking: {tracked}",
             "  trials:"]
    lines += [f"    {t.key:<{width}}  {states[t.key]}" + (" (ends before its first topology update: static)"
                                                           if no_update_note(configs[t.key]) else "") for t in trials]
    return "\n".join(lines)
