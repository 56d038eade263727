"""Exact memory accounting of gradients and optimizer state, analytic layout sizes, peak memory.

Per active block of B weights, the layouts of the sparse layers cost (float32 grad, m, v = 12 B per
weight in all of them):

    compact (default)  12 B + 1 B position offset + 2 B per 256 blocks (chunk counts)
                       + 1 B cohort id when the method needs a local step or a warm-up
                       + 8 B per live cohort (birth-step table, <= 256 entries)
    released SMET      12 B + 4 B int32 index + 2 B int16 step   (18 B per active weight at B = 1)
    dense_masked       12 B per weight, active or not + 1 B mask and 2 B age (when needed) per block
                       + the topology's position store
    dense Adam         12 B per weight

`analytic_state_bytes` evaluates these formulas; the tests check that the tensors hold exactly that.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys

import torch

from smet_lab.optim.smet_adam import SMETAdam
from smet_lab.sparse.layer import CHUNK
from smet_lab.sparse.topology import SparseTopology

# float32 gradient + exp_avg + exp_avg_sq: what dense Adam keeps per parameter, besides the weight.
DENSE_ADAM_BYTES_PER_PARAM = 12
WEIGHT_BYTES_PER_PARAM = 4  # float32 master weights
DENSE_ADAM_TRAINING_BYTES_PER_PARAM = DENSE_ADAM_BYTES_PER_PARAM + WEIGHT_BYTES_PER_PARAM
RELEASED_SMET_INDEX_BYTES = 4 + 2  # int32 block index + int16 step per active block


def _chunks(n_blocks: int) -> int:
    return -(-n_blocks // CHUNK)


def position_bytes(topology: SparseTopology) -> int:
    """The chunked position list: a uint8 offset per active block + an int16 count per 256 blocks."""
    return sum(layer.n_active + 2 * _chunks(layer.n_blocks) for layer in topology.layers)


def float32_floor(topology: SparseTopology) -> int:
    """12 B (float32 grad, m, v) per active weight of the sparse layers, no index at all."""
    return DENSE_ADAM_BYTES_PER_PARAM * topology.n_active_weights


def training_floor_bytes(n_dense: int, n_sparse: int, density: float, weights: str, state: str) -> int:
    """A lower bound of a run's persistent memory before it is built (activations, index and cohort bytes
    not counted): float32 weights (the sparse layers' active values only with compact weights) and the
    gradient + Adam moments of the dense parameters and of the sparse layers (their active entries only
    with the compact state). n_dense / n_sparse: parameters outside / inside the sparse layers."""
    active = round(density * n_sparse)
    weights_n = n_dense + (active if weights == "compact" else n_sparse)
    state_n = n_dense + (active if state == "compact" else n_sparse)
    return WEIGHT_BYTES_PER_PARAM * weights_n + DENSE_ADAM_BYTES_PER_PARAM * state_n


def analytic_state_bytes(topology: SparseTopology, layout: str, needs_step: bool, n_cohorts: int = 1) -> int:
    """Gradient + optimizer-state bytes of the sparse layers by the layout's formula (module docstring).
    layout: compact | released | dense_masked."""
    k = sum(layer.n_active for layer in topology.layers)
    if layout == "compact":
        return float32_floor(topology) + position_bytes(topology) + (k + 8 * n_cohorts if needs_step else 0)
    if layout == "released":
        return float32_floor(topology) + RELEASED_SMET_INDEX_BYTES * k
    if layout == "dense_masked":
        n_blocks = sum(layer.n_blocks for layer in topology.layers)
        return (DENSE_ADAM_BYTES_PER_PARAM * topology.numel + n_blocks * (1 + (2 if needs_step else 0))
                + position_bytes(topology))
    raise ValueError(f"unknown layout {layout!r}")


def optimizer_layout_bytes(opt: SMETAdam) -> int:
    """analytic_state_bytes for this optimizer's layout, method and current number of cohorts."""
    needs_step = opt.reset_step or opt.warmup_steps > 0
    n_cohorts = opt.births.numel() if opt.births is not None else 0
    return analytic_state_bytes(opt.topology, opt.layout, needs_step, n_cohorts)


def torch_adam_state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of a torch.optim optimizer's state tensors and of the model's gradients (dense size: the
    gradients exist from backward to the step), counted from the tensors."""
    params = [p for p in model.parameters() if p.requires_grad]
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return {"grad": sum(p.numel() * p.element_size() for p in params), "state": state}


def training_bytes_by_role(model: torch.nn.Module, opt: SMETAdam) -> dict[str, int]:
    """Persistent training memory by role (smet_lab.metrics.MEMORY_ROLES): the weights of the dense and
    of the sparse layers (dense tensors, or the active values with compact weights), then every
    gradient and optimizer-state tensor (SMETAdam.state_bytes_by_role)."""
    sparse = {id(layer.param) for layer in opt.topology.layers}
    weights = {"weights/dense": 0, "weights/sparse": 0}
    for p in model.parameters():
        weights["weights/sparse" if id(p) in sparse else "weights/dense"] += p.numel() * p.element_size()
    return {**weights, **opt.state_bytes_by_role()}


def analytic_training_bytes(model: torch.nn.Module, opt: SMETAdam) -> int:
    """The least a float32 run of this method can keep: 16 B (weight, gradient, m, v) per dense-layer
    parameter and per active sparse weight, plus the index the compact layout needs at least."""
    topo = opt.topology
    needs_step = opt.reset_step or opt.warmup_steps > 0
    n_cohorts = opt.births.numel() if opt.births is not None else 1
    sparse = {id(layer.param) for layer in topo.layers}
    dense_numel = sum(p.numel() for p in model.parameters() if id(p) not in sparse)
    out = (DENSE_ADAM_BYTES_PER_PARAM + WEIGHT_BYTES_PER_PARAM) * dense_numel
    if topo.layers:
        out += WEIGHT_BYTES_PER_PARAM * topo.n_active_weights + analytic_state_bytes(topo, "compact", needs_step, n_cohorts)
    return out


def memory_summary(model: torch.nn.Module, opt: SMETAdam) -> dict[str, float]:
    """summary/memory/*: bytes by role, totals, and ratios to dense Adam and to the analytic minimum.
    Ratios count the parameters of the dense model (a compact-weight layer counts its full size)."""
    topo = opt.topology
    roles = training_bytes_by_role(model, opt)
    n_params = roles["weights/dense"] // WEIGHT_BYTES_PER_PARAM + topo.numel
    state = opt.state_bytes()
    training = sum(roles.values())
    out = {
        "summary/memory/state_bytes": float(state),
        "summary/memory/state_ratio_vs_dense_adam": state / (DENSE_ADAM_BYTES_PER_PARAM * n_params),
        "summary/memory/weight_bytes": float(roles["weights/dense"] + roles["weights/sparse"]),
        "summary/memory/training_bytes": float(training),
        "summary/memory/training_ratio_vs_dense_adam": training / (DENSE_ADAM_TRAINING_BYTES_PER_PARAM * n_params),
        "summary/memory/analytic_min_bytes": float(analytic_training_bytes(model, opt)),
        **{f"summary/memory/bytes/{role}": float(b) for role, b in roles.items()},
    }
    if topo.numel:
        sparse = opt.state_bytes("sparse")
        out["summary/memory/sparse_state_bytes"] = float(sparse)
        out["summary/memory/sparse_state_ratio_vs_dense_adam"] = sparse / (DENSE_ADAM_BYTES_PER_PARAM * topo.numel)
        out["summary/memory/sparse_training_ratio_vs_dense_adam"] = (
            (sparse + roles["weights/sparse"]) / (DENSE_ADAM_TRAINING_BYTES_PER_PARAM * topo.numel))
    return out


MMAP_THRESHOLD = 128 * 1024
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def release_freed_memory() -> bool:
    """Make glibc malloc serve every block of >= 128 KiB with its own mapping, returned to the OS when
    freed. By default the threshold adapts upwards (to 32 MiB) after the first large free, so freed
    activations, dense weight gradients and step temporaries stay in the heap, fragmented, and count
    in the RSS: on llama_130m, batch 1, that is ~400 MiB of SMET's peak (benchmarks/results/memory.md).
    Process-wide and idempotent; False where the C library has no mallopt (not glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def peak_memory(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"summary/peak_cuda_bytes": float(torch.cuda.max_memory_allocated(device))}
    return {"summary/peak_rss_bytes": float(peak_rss_bytes())}


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss if sys.platform == "darwin" else rss * 1024
