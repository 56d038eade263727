"""Exact memory accounting of gradients and optimizer state, and peak process memory."""

from __future__ import annotations

import resource
import sys

import torch

from smet_lab.optim.smet_adam import SMETAdam

# float32 gradient + exp_avg + exp_avg_sq: what dense Adam keeps per parameter.
DENSE_ADAM_BYTES_PER_PARAM = 12


def compact_layout_minimum(opt: SMETAdam) -> int:
    """Analytic minimum of the compact layout for the sparse layers: per active block, B x (grad, m, v)
    in float32 + an int32 block id + an int16 age when the method needs one."""
    B = opt.topology.block_size
    per_block = B * DENSE_ADAM_BYTES_PER_PARAM + 4 + (2 if opt.age is not None else 0)
    return sum(layer.n_active for layer in opt.topology.layers) * per_block


def memory_summary(model: torch.nn.Module, opt: SMETAdam) -> dict[str, float]:
    n_params = sum(p.numel() for p in model.parameters())
    sparse_numel = opt.topology.numel
    state = opt.state_bytes()
    out = {
        "summary/memory/state_bytes": float(state),
        "summary/memory/state_ratio_vs_dense_adam": state / (DENSE_ADAM_BYTES_PER_PARAM * n_params),
        "summary/memory/weight_bytes": float(sum(p.numel() * p.element_size() for p in model.parameters())),
    }
    if sparse_numel:
        sparse = opt.state_bytes("sparse")
        out["summary/memory/sparse_state_bytes"] = float(sparse)
        out["summary/memory/sparse_state_ratio_vs_dense_adam"] = sparse / (DENSE_ADAM_BYTES_PER_PARAM * sparse_numel)
    return out


def peak_memory(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"summary/peak_cuda_bytes": float(torch.cuda.max_memory_allocated(device))}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"summary/peak_rss_bytes": float(rss if sys.platform == "darwin" else rss * 1024)}
