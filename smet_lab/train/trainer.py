"""The training loop: one run of one method, with stability probes, memory accounting and resume.

Metrics go to `log(metrics, step)` (tracking plugs in there) and are kept in `RunResult.history`
(one dict per optimizer step, the full record that reports are built from). No Ray, MLflow or Hydra.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from smet_lab.config import RunConfig
from smet_lab.data import Corpus, TokenBatcher, load_corpus
from smet_lab.metrics import (COMM_BYTES, FINAL_DENSITY, FINAL_VAL_LOSS, FINAL_VAL_PPL, KERNEL_COMPILED, PARAMETERS,
                             STEPS, TOKENS_PER_S, WORLD_SIZE, computed)
from smet_lab.model import LLaMA, count_parameters
from smet_lab.optim import SMETAdam
from smet_lab.spikes import run_spike_summary
from smet_lab.sparse import DynamicSparsity, SparseTopology
from smet_lab.train import checkpoint as ckpt
from smet_lab.train.checks import resolve_device, validate_run
from smet_lab.train.distributed import World, check_world, topology_checksum
from smet_lab.train.probe import ProbeWindow, RegrownSteps, UpdateRMS
from smet_lab.train.memory import memory_summary, peak_memory, release_freed_memory

LogFn = Callable[[dict, int], None]


@dataclass(frozen=True)
class Callbacks:
    """How a run talks to the outside world, every part optional: `log(metrics, step)` is the metrics
    sink (tracking plugs in here), `progress(line)` gets a progress line every 5 % of the steps,
    `on_checkpoint(path, step)` follows each checkpoint written (a sweep hands it to Ray Tune; with
    several processes every process gets the call, the first with the path and the others None), and
    `should_stop()` is polled between steps (a Ctrl-C handler sets it): the run then checkpoints where
    it is and returns status KILLED."""

    log: Optional[LogFn] = None
    progress: Optional[Callable[[str], None]] = print
    on_checkpoint: Optional[Callable[[Path, int], None]] = None
    should_stop: Optional[Callable[[], bool]] = None


QUIET = Callbacks(progress=None)


@dataclass
class RunResult:
    status: str  # FINISHED | DIVERGED | KILLED (stopped on request)
    summary: dict
    history: list = field(default_factory=list)
    error: Optional[str] = None
    output_dir: Optional[str] = None


def lr_factor(step: int, cfg: RunConfig) -> float:
    """Schedule multiplier for optimizer step `step` (1-based): linear warm-up, then cosine to min."""
    o, total = cfg.optim, cfg.train.max_steps
    if o.warmup_steps > 0 and step <= o.warmup_steps:
        return step / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def mean_loss(model: torch.nn.Module, batches, bfloat16: bool = False, world: World = World()) -> float:
    """Mean over `batches` of the model's loss, in eval mode (how every val and probe loss is taken);
    with several processes each takes its rows of every batch and all get the same number."""
    model.eval()
    total = 0.0
    with torch.autocast(batches[0][0].device.type, dtype=torch.bfloat16, enabled=bfloat16):
        if world.size > 1:
            total = world.sum_loss(batches, lambda x, y: model(x, y).item())
        else:
            for x, y in batches:
                total += model(x, y).item()
    model.train()
    return total / len(batches)


class Run:
    """Everything one training run holds; built from a RunConfig, checkpointable."""

    def __init__(self, cfg: RunConfig, corpus: Corpus | None = None):
        validate_run(cfg)
        cfg = self.cfg = copy.deepcopy(cfg)  # vocab_size is filled in below; the caller's stays as given
        t, s, o = cfg.train, cfg.sparsity, cfg.optim
        self.world = world = World.current()  # several processes: smet_lab.train.distributed
        check_world(t.batch_size, world.size, t.dist_backend, t.device)
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        if t.release_memory:
            release_freed_memory()
        self.device = resolve_device(t.device)
        self.corpus = corpus if corpus is not None else load_corpus(cfg.data)
        cfg.model.vocab_size = self.corpus.vocab_size
        torch.manual_seed(t.seed)
        self.model = LLaMA(cfg.model).to(self.device)
        self.model.checkpoint_blocks = t.activation_checkpointing
        self.topology = SparseTopology.build(self.model, s.density, s.distribution, s.block_size,
                                             list(s.dense_patterns), seed=t.seed, weights=s.weights)
        self.updater = DynamicSparsity.from_config(self.topology, s, t.max_steps, seed=t.seed)
        self.optimizer = SMETAdam.from_config(self.model, self.topology, o)
        if world.size > 1:
            self.updater.reduce_grads = world.average
        seq = cfg.model.seq_len
        self.batcher = TokenBatcher(self.corpus.train, t.batch_size, seq, seed=t.seed, device=self.device,
                                    rank=world.rank, world=world.size)
        self.eval_batches = TokenBatcher.fixed_batches(self.corpus.val, t.batch_size, seq, t.eval_batches, device=self.device)
        # The probe: one fixed held-out batch, evaluated around topology updates (noise-free spikes).
        self.probe_batch = TokenBatcher.fixed_batches(self.corpus.val, t.probe_batch_size, seq, 1, device=self.device)[0]
        self.step = 0
        self.history: list[dict] = []
        self._rows: dict[int, dict] = {}
        self.probe = ProbeWindow()
        self.update_rms: UpdateRMS | None = None
        self.regrown: RegrownSteps | None = None
        self.train_time = 0.0
        self.tokens = 0
        self.comm_bytes = 0  # all-reduced per optimizer step (several processes)

    # -------------------------------------------------------------------------------- helpers
    def _autocast(self):
        enabled = self.cfg.train.dtype == "bfloat16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def loss_on(self, batches) -> float:
        return mean_loss(self.model, batches, self.cfg.train.dtype == "bfloat16", self.world)

    def record(self, step: int, metrics: dict) -> None:
        """Merge metrics into the history row of `step` (one row per optimizer step)."""
        row = self._rows.get(step)
        if row is None:
            row = self._rows[step] = {"step": step}
            self.history.append(row)
        row.update(metrics)

    # ------------------------------------------------------------------------------ one step
    def train_step(self) -> tuple[float, float]:
        cfg = self.cfg
        step = self.step + 1
        self.optimizer.set_lr_factor(lr_factor(step, cfg))
        self.updater.begin_step(step)
        loss_sum = 0.0
        for _ in range(cfg.train.grad_accum):
            x, y = self.batcher.next_batch()
            with self._autocast():
                loss = self.model(x, y) / cfg.train.grad_accum
            loss.backward()
            loss_sum += loss.item()
        if self.world.size > 1:  # one fused all-reduce: every process then takes the same step
            mean = torch.tensor([loss_sum], dtype=torch.float32, device=self.device)
            self.comm_bytes = self.world.average(self.optimizer.gradients() + [mean])
            loss_sum = mean.item()
        grad_norm = self.optimizer.clip_grad_norm_(cfg.optim.grad_clip).item()
        if not math.isfinite(loss_sum):
            self.optimizer.zero_grad()
            return loss_sum, grad_norm
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.step = step
        return loss_sum, grad_norm

    def after_step(self, loss: float, grad_norm: float, log: LogFn) -> dict:
        """Stability probes and topology update that follow optimizer step self.step; returns this step's
        metrics. Numbers that belong to the update step (known one or `probe_window` steps later) go
        into its history row and to `log` at once, under that step."""
        step, opt = self.step, self.optimizer
        # train/lr is the schedule's base rate (alpha_0 x schedule); sparse layers train at lr x scale(d).
        metrics = {"train/loss": loss, "train/lr": self.cfg.optim.lr * lr_factor(step, self.cfg),
                   "train/grad_norm": grad_norm}
        sparse = [g["lr"] for g in opt.param_groups if g["kind"] == "sparse"]
        if sparse:
            metrics["train/lr_sparse"] = sparse[0]
        if self.regrown is not None:
            found = self.regrown.observe(self.topology, opt, sparse[0])
            if found:
                self.record(self.regrown.update_step, found)
                log(found, self.regrown.update_step)
            if self.regrown.done:
                self.regrown = None
        earlier = {}
        if self.probe.is_open:
            value = self.loss_on([self.probe_batch])
            metrics["stability/probe_loss"] = value
            if self.update_rms is not None:
                self.update_rms.observe(self.topology, sparse[0])
            jump = self.probe.observe(value)
            if jump is not None:
                earlier["stability/probe_jump"] = jump
                earlier.update(self.update_rms.result(self.topology) if self.update_rms is not None else {})
                self.update_rms = None
        if earlier:
            self.record(self.probe.update_step, earlier)
            log(earlier, self.probe.update_step)
        if self.updater.is_update_step(step):
            before = self.loss_on([self.probe_batch])
            events = self.updater.update(step)
            if self.world.size > 1:
                self.world.check_same(f"the topology after the update at step {step}", topology_checksum(self.topology))
            rows = opt.regrow(events)
            self.regrown = None if rows is None else RegrownSteps.start(step, self.topology, events, rows)
            regrown = sum(e.new_blocks.numel() for e in events)
            n_active = sum(layer.n_active for layer in self.topology.layers)
            # Churn: pruned + regrown blocks, as a share of all sparse-layer blocks (and its running sum).
            flips = 2 * regrown / sum(layer.n_blocks for layer in self.topology.layers)
            total = flips + sum(r.get("stability/mask_flip_rate", 0.0) for r in self.history)
            metrics.update({"stability/mask_flip_rate": flips, "stability/mask_flip_rate_cumulative": total})
            metrics.update({"topo/regrown_fraction": regrown / max(1, n_active),
                            "topo/density": self.topology.density(), "stability/probe_loss": before})
            self.probe.open(step, before, self.cfg.train.probe_window)
            self.update_rms = UpdateRMS.start(self.topology, events) if self.probe.is_open else None
        return metrics

    def evaluate(self) -> dict:
        val = self.loss_on(self.eval_batches)
        return {"val/loss": val, "val/ppl": math.exp(min(val, 50.0))}

    # ----------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "topology": self.topology.state_dict(),
            "updater": self.updater.state_dict(),
            "data": self.batcher.state_dict(),
            "probe": self.probe.state_dict(),
            "update_rms": None if self.update_rms is None else self.update_rms.state_dict(),
            "regrown": None if self.regrown is None else self.regrown.state_dict(),
            "history": [dict(r) for r in self.history],
            "train_time": self.train_time,
            "tokens": self.tokens,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.topology.load_state_dict(state["topology"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.updater.load_state_dict(state["updater"])
        self.batcher.load_state_dict(state["data"])
        self.probe = ProbeWindow.from_state(state["probe"])
        self.update_rms = UpdateRMS.from_state(state.get("update_rms"), self.device)
        self.regrown = RegrownSteps.from_state(state.get("regrown"), self.device)
        self.history = [dict(r) for r in state["history"]]
        self._rows = {r["step"]: r for r in self.history}
        self.step = state["step"]
        self.train_time = state["train_time"]
        self.tokens = state["tokens"]
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def train(
    cfg: RunConfig,
    output_dir: str | Path | None = None,
    corpus: Corpus | None = None,
    callbacks: Callbacks | None = None,
) -> RunResult:
    """Train one run; `callbacks` is how it talks to the outside world (see Callbacks)."""
    run = Run(cfg, corpus)
    cfg, t = run.cfg, run.cfg.train
    if t.resume_from:
        run.load_state_dict(ckpt.load(t.resume_from, cfg))
    cb = callbacks or Callbacks()
    log, progress, should_stop = cb.log or (lambda metrics, step: None), cb.progress, cb.should_stop
    tokens_per_step = t.batch_size * t.grad_accum * cfg.model.seq_len
    report_every = max(1, t.max_steps // 20)

    def save(step: int, report: bool = True) -> None:
        """The checkpoint of `step`, handed to on_checkpoint when `report`; with several processes the
        first writes it (the state is the same on all) and the others hand on None."""
        path = ckpt.save(run, ckpt.folder(output_dir, step)) if run.world.is_main else None
        if report and cb.on_checkpoint:  # a sweep hands it to Ray Tune, the final one included (export takes it)
            cb.on_checkpoint(path, step)

    summary = {}
    window_time, window_tokens, started, first_step = 0.0, 0, time.perf_counter(), run.step
    status, error = "FINISHED", None

    while run.step < t.max_steps:
        tic = time.perf_counter()
        loss, grad_norm = run.train_step()
        dt = time.perf_counter() - tic
        if not math.isfinite(loss):
            status, error = "DIVERGED", f"training diverged: loss is {loss} at step {run.step + 1}"
            run.record(run.step + 1, {"train/loss": loss, "train/diverged": 1.0})
            log({"train/diverged": 1.0}, run.step + 1)
            break
        run.train_time += dt
        run.tokens += tokens_per_step
        window_time += dt
        window_tokens += tokens_per_step
        step = run.step
        metrics = run.after_step(loss, grad_norm, log)
        if step == t.max_steps or (t.eval_every and step % t.eval_every == 0):
            metrics.update(run.evaluate())
        if t.log_every and step % t.log_every == 0:
            metrics["train/tokens_per_s"] = window_tokens / max(window_time, 1e-9)
            window_time, window_tokens = 0.0, 0
        run.record(step, metrics)
        if t.log_every and (step % t.log_every == 0 or "val/loss" in metrics or "topo/density" in metrics):
            log(metrics, step)
        if progress and (step % report_every == 0 or step == t.max_steps):
            elapsed = time.perf_counter() - started
            eta = elapsed / max(1, step - first_step) * (t.max_steps - step)
            val = f" val {metrics['val/loss']:.4f}" if "val/loss" in metrics else ""
            sparse_lr = f" (sparse layers {metrics['train/lr_sparse']:.2e})" if "train/lr_sparse" in metrics else ""
            progress(f"step {step}/{t.max_steps} loss {loss:.4f}{val} base lr {metrics['train/lr']:.2e}{sparse_lr} "
                     f"{run.tokens / max(run.train_time, 1e-9):,.0f} tok/s ETA {eta:.0f}s")
        if output_dir and t.checkpoint_every and step % t.checkpoint_every == 0 and step < t.max_steps:
            save(step)
        if run.world.any(should_stop is not None and should_stop()):  # every process asks: they stop together
            status, error = "KILLED", f"interrupted at step {step}"
            if output_dir:
                save(step, report=False)
            break

    summary.update(summarize(run))
    summary.update(memory_summary(run.model, run.optimizer))
    summary.update(peak_memory(run.device))
    summary.update({WORLD_SIZE: float(run.world.size), COMM_BYTES: float(run.comm_bytes),
                    PARAMETERS: float(count_parameters(cfg.model))})
    if status == "DIVERGED":
        summary["summary/diverged"] = 1.0
    if output_dir and status == "FINISHED" and run.step == t.max_steps:
        save(run.step)
    log(summary, run.step)
    return RunResult(status, summary, run.history, error, str(output_dir) if output_dir else None)


def summarize(run: Run) -> dict:
    """Run-level numbers (smet_lab.metrics): the trainer's own, the spike and probe metrics from the
    history (smet_lab.spikes, default window and k), then every registered metric that has a compute."""
    hist = run.history
    vals = [r["val/loss"] for r in hist if "val/loss" in r]
    out = {STEPS: float(run.step), TOKENS_PER_S: run.tokens / run.train_time if run.train_time else 0.0,
           FINAL_DENSITY: run.topology.density(), KERNEL_COMPILED: float(run.optimizer.kernel == "compiled")}
    if vals:
        out[FINAL_VAL_LOSS] = vals[-1]
        out[FINAL_VAL_PPL] = math.exp(min(vals[-1], 50.0))
    out.update(run_spike_summary(hist))
    out.update(computed(hist))
    return out
