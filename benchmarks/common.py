"""Shared setup of the benchmarked methods (imported by the benchmark scripts).

    dense      torch.optim.Adam on every parameter (fused=True where the device supports it: the
               fastest torch Adam on CPU and CUDA, so the baseline is not handicapped)
    naive_dst  SMETAdam with state=dense_masked, global step, no warm-up, no LR scaling: dense-size
               gradient and moments + a mask, what mask-based DST libraries keep
    smet       SMETAdam with the compact state, local step reset, warm-up W=100, lr/d
    smet_compact  smet with compact weights (sparsity.weights=compact): only the active values stored
SMET's step runs the kernel `kernel` (optim.kernel: auto = compiled for >= 2^19 state entries when a
compiler is present, as a run with the default config would).

Sparse methods: uniform density over the attention and MLP projections (embeddings, head and norms
dense), block size B, magnitude prune 0.3 + random regrowth when a topology update is timed.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass

import torch

from smet_lab.model import LLaMA, model_preset
from smet_lab.optim import SMETAdam
from smet_lab.sparse import DynamicSparsity, SparseTopology

METHODS = ("dense", "naive_dst", "smet", "smet_compact")


@dataclass
class Setup:
    method: str
    model: LLaMA
    opt: torch.optim.Optimizer
    topology: SparseTopology | None = None
    updater: DynamicSparsity | None = None
    dense_adam: str = ""


def describe_machine() -> str:
    """The machine in words for result headers: architecture, CPU model, core count."""
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    return f"{platform.machine()}, {cpu}, {os.cpu_count()} CPUs"


def median_time(fn, repeats: int) -> float:
    """Seconds: the median of `repeats` timed calls of fn after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def dense_adam(params, lr: float, device: torch.device) -> tuple[torch.optim.Adam, str]:
    try:
        return torch.optim.Adam(params, lr=lr, fused=True), "fused"
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, lr=lr, foreach=True), "foreach"


def build(method: str, model_name: str, vocab: int, density: float, block_size: int, seq_len: int | None = None,
          device: str = "cpu", seed: int = 0, lr: float = 1e-3, total_steps: int = 10_000, kernel: str = "auto") -> Setup:
    overrides = {"vocab_size": vocab}
    if seq_len:
        overrides["seq_len"] = seq_len
    torch.manual_seed(seed)
    model = LLaMA(model_preset(model_name, **overrides)).to(device)
    if method == "dense":
        opt, kind = dense_adam(model.parameters(), lr, torch.device(device))
        return Setup(method, model, opt, dense_adam=kind)
    weights = "compact" if method == "smet_compact" else "dense"
    topo = SparseTopology.build(model, density, block_size=block_size, seed=seed, weights=weights)
    if method == "naive_dst":
        opt = SMETAdam(model, topo, lr=lr, reset_step=False, warmup_steps=0, lr_scaling="none", state="dense_masked")
    elif method in ("smet", "smet_compact"):
        opt = SMETAdam(model, topo, lr=lr, reset_step=True, warmup_steps=100, lr_scaling="inverse", state="compact",
                       kernel=kernel)
    else:
        raise ValueError(method)
    updater = DynamicSparsity(topo, total_steps, update_every=100, prune_rate=0.3, prune_schedule="constant", seed=seed)
    return Setup(method, model, opt, topo, updater)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(s: Setup, x: torch.Tensor, y: torch.Tensor, clip: float = 1.0) -> tuple[float, float]:
    """forward + backward + clip + optimizer step + zero_grad; returns (seconds, optimizer-step seconds)."""
    device = x.device
    sync(device)
    t0 = time.perf_counter()
    s.model(x, y).backward()
    if isinstance(s.opt, SMETAdam):
        s.opt.clip_grad_norm_(clip)
    else:
        torch.nn.utils.clip_grad_norm_(s.model.parameters(), clip, foreach=True)
    sync(device)
    t1 = time.perf_counter()
    s.opt.step()
    s.opt.zero_grad(set_to_none=True)
    sync(device)
    t2 = time.perf_counter()
    return t2 - t0, t2 - t1


def topology_update(s: Setup, step: int) -> float:
    """One topology update (prune + regrow + optimizer state reset); seconds."""
    if s.updater is None:
        return 0.0
    device = next(s.model.parameters()).device
    sync(device)
    t0 = time.perf_counter()
    s.opt.regrow(s.updater.update(step))
    sync(device)
    return time.perf_counter() - t0


def batch(step: int, batch_size: int, seq_len: int, vocab: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(vocab, (batch_size, seq_len + 1), generator=gen).to(device)
    return tokens[:, :-1], tokens[:, 1:]
