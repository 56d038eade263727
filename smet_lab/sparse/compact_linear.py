"""sparsity.weights="compact": a linear layer that keeps only its active weights.

The module holds `values` [k, B] (the float32 master copy of the active blocks, in slot order) and
reads the positions from its SparseLayer. Autograd saves only the input and the values: the dense
weight is materialised (zeros, then the values scattered in) for F.linear and dropped, and again in
backward for the input gradient; the weight gradient is formed densely for this one layer, shown to
the layer's dense-gradient hooks (RigL) and gathered into the compact gradient at once. So at most one
layer's dense weight and one dense weight gradient exist at any moment.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from smet_lab.sparse.layer import SparseLayer


class MaterializedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, values: torch.Tensor, layer: SparseLayer) -> torch.Tensor:
        ctx.layer = layer
        device = x.device.type
        # Backward runs in autograd's thread, outside this autocast region: re-enter the same one there.
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(x, values)
        return F.linear(x, layer.materialize(values))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, values = ctx.saved_tensors
        layer: SparseLayer = ctx.layer
        ids = layer.block_ids().long()  # decoded once for the scatter and the gather below
        device, enabled, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = torch.matmul(grad_out, layer.materialize(values, ids)).to(x.dtype)
            grad_w = torch.mm(grad_out.reshape(-1, grad_out.shape[-1]).t(), x.reshape(-1, x.shape[-1]))
        grad_w = grad_w.to(values.dtype)
        layer.dense_grad_formed(grad_w)
        return grad_x, layer.gather(grad_w, ids), None


class CompactLinear(nn.Module):
    """Replaces a bias-free nn.Linear whose weight is a sparse layer with compact weights."""

    def __init__(self, layer: SparseLayer):
        super().__init__()
        self.out_features, self.in_features = layer.shape
        self.values = layer.make_compact()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return MaterializedLinear.apply(x, self.values, self.layer)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"active={self.layer.n_active}x{self.layer.block_size}")


def make_compact(model: nn.Module, layer: SparseLayer) -> None:
    """Swap the nn.Linear that owns `layer`'s weight for a CompactLinear; the dense weight is freed."""
    path, _, leaf = layer.name.rpartition(".")
    module = model.get_submodule(path)
    if leaf != "weight" or not isinstance(module, nn.Linear) or module.bias is not None:
        raise ValueError(f"sparsity.weights=compact supports bias-free nn.Linear weights, not {layer.name}")
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, CompactLinear(layer))
