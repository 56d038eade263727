"""The contenders of benchmarks/peers.py: smet_lab's methods (common.build) and the two mask-based DST
libraries, sparsimony 0.1.0 (SET) and rigl-torch 0.5.2 (RigL), set up on smet_lab's LLaMA with the
adaptations they need (ADAPTATIONS, each with its reason; none of them changes the peers' arithmetic)
and what their code shows (NOTES)."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import time
import types
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from common import METHODS, Setup, build, dense_adam, topology_update
from smet_lab.model import LLaMA, model_preset
from smet_lab.sparse.topology import SparseTopology, is_dense

PEERS = ("sparsimony_set", "rigl_torch")
LABELS = {"dense": "dense Adam (fused)", "sparsimony_set": "sparsimony 0.1.0 SET", "rigl_torch": "rigl-torch 0.5.2 RigL"}
LR, CLIP, EVERY, PRUNE, T_END = 1e-3, 1.0, 100, 0.3, 10_000  # T_END = common.build's total_steps
INSTALL = "pip install -c constraints.txt --no-deps sparsimony==0.1.0 rigl-torch==0.5.2"

OPT_STEP = {  # what the "opt step ms" column times, per contender
    "dense": "fused Adam step + zero_grad",
    "naive_dst": "SMETAdam.step (dense_masked state) + zero_grad; its gradient gather runs in backward hooks (step time only)",
    "smet": "SMETAdam.step (compact state) + zero_grad; its gradient gather runs in backward hooks (step time only)",
    "smet_compact": "as smet, with compact weights",
    "sparsimony_set": "fused Adam step over the dense `original` weights + sparsimony's step wrapper (a momentum_buffer "
                      "lookup per sparse layer, nothing to do for Adam) + zero_grad; the mask itself is applied in forward "
                      "(weight = mask * original at every forward, torch.ao FakeSparsity) and its backward (step time only)",
    "rigl_torch": "fused Adam step + rigl-torch's step wrapper: reset_momentum (SGD momentum only, nothing to do for Adam) "
                  "and apply_mask_to_weights (w *= mask per sparse layer) + zero_grad; gradients are masked by a tensor "
                  "hook (grad * mask) in backward (step time only)",
}
ADAPTATIONS = [  # every change made to run the peers; all in this file, none in site-packages
    "both: installed with --no-deps (sparsimony declares numpy==1.*; the project pins numpy==2.4.6, which it runs on)",
    "rigl-torch: a stub `torchvision` module (two never-matching classes) sits in sys.modules only while rigl_torch is "
    "imported: rigl_torch/util.py imports torchvision just for an isinstance check against ResNet blocks, and "
    "torchvision is not installed",
    "rigl-torch: RigLScheduler gets an nn.ModuleList of the projection nn.Linear modules instead of the model (its "
    "get_W takes every module with a .weight: embedding, norms, head) and ignore_linear_layers=False (the default "
    "keeps every nn.Linear dense)",
    "rigl-torch: subclass, random_sparsify first sets every layer's sparsity to 1 - density: with "
    "sparsity_distribution='uniform' the library keeps the first layer in its list (block 0's wq) dense",
    "rigl-torch: subclass, cosine_annealing returns alpha = 0.3: a constant prune fraction as smet_lab's "
    "prune_schedule=constant (the library anneals alpha/2 (1 + cos(pi t / T_end)))",
    "sparsimony: subclass of SET, _step undoes one of its two _step_count increments per call (else the counter "
    "visits only odd steps and ConstantScheduler's step % 100 == 0 never fires: no update ever happens)",
    "sparsimony: SET's _assert_sparsity_level is replaced by its base class DSTMixin's (ones == int(numel * (1 - "
    "sparsity))): SET's compares the count of ones with numel * sparsity and fails on every correct mask",
    "sparsimony: init_method=None, so the active weights keep smet_lab's N(0, 0.02^2) init as in every other "
    "contender (the default 'grad_flow' redraws them with a fan-in-scaled init); sparse config = the projections' "
    "tensor_fqn, UniformDistribution without exclusions (sparsity 0.75 in every projection)",
    "both: the per-step scheduler call (rigl `pruner()`, sparsimony `sparsifier.step()`: a counter increment when no "
    "update is due) is made only for the timed topology updates, with the counter set to step 100(u+1) - 1 first, "
    "as smet_lab's update is called only at updates; rigl-torch's update follows its usage `if pruner(): "
    "optimizer.step()`: forward + backward (hooks keep the dense gradient, untimed), then the timed pruner() call",
]
NOTES = [  # read from the peers' code (and shown by --check)
    "Adam state of regrown weights: neither peer resets it. rigl-torch's reset_momentum masks only SGD's "
    "'momentum_buffer', so exp_avg/exp_avg_sq of pruned and regrown weights stay as they were (a weight pruned "
    "earlier, or in this very update, comes back with its old m and v). sparsimony's wrapper likewise touches only "
    "'momentum_buffer'.",
    "Regrown weights' values: rigl-torch sets new connections to 0. sparsimony's SET.grow_mask computes "
    "torch.where(new_mask != mask, grown_weights_init, original) and discards the result, and the trained `original` "
    "is never zeroed under the mask, so a regrown weight comes back with its stale value (its init value if never "
    "active, its value when pruned, moved since by the decaying m) instead of 0.",
    "Masks: rigl-torch keeps a bool mask (1 B per sparse-layer weight) and, from the backward before an update until "
    "the next backward, a float dense-gradient copy per sparse layer (4 B per weight; JSON update_buffer_bytes); "
    "sparsimony keeps float32 masks (4 B per weight). Both train dense-size weights, gradients and Adam moments.",
    "Initial topology: smet_lab and rigl-torch draw it at random; sparsimony keeps the largest 25 % of the dense init "
    "by magnitude. Topology update cost: both peers sort/top-k whole dense layers (rigl-torch two full top-k sorts "
    "per layer).",
]


@dataclass
class Contender:
    name: str
    setup: Setup  # model + opt: what common.train_step runs
    update: Callable[[int, torch.Tensor, torch.Tensor], float]  # a real prune + regrow at step t; seconds
    density: Callable[[], float]  # active entries / entries of the sparse layers
    layers: Callable[[], list] = lambda: []  # peers: (bool mask, masked weight, trained param) per sparse layer
    buffers: Callable[[], int] = lambda: 0  # peers: bytes of update-time buffers held now
    masks: Callable[[], list] = lambda: []  # peers: the mask tensors the library keeps


def sparse_names(model: nn.Module) -> list[str]:
    """The parameters SparseTopology.build makes sparse (its rule, its default dense patterns)."""
    patterns = list(inspect.signature(SparseTopology.build).parameters["dense_patterns"].default)
    return [n for n, p in model.named_parameters() if not is_dense(n, p, patterns)]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def import_peer(name: str) -> None:
    if name == "rigl_torch" and importlib.util.find_spec("torchvision") is None:
        tv = types.ModuleType("torchvision")
        tv.models = types.ModuleType("torchvision.models")
        tv.models.resnet = types.ModuleType("torchvision.models.resnet")
        tv.models.resnet.Bottleneck = type("Bottleneck", (), {})
        tv.models.resnet.BasicBlock = type("BasicBlock", (), {})
        stubs = {"torchvision": tv, "torchvision.models": tv.models, "torchvision.models.resnet": tv.models.resnet}
        sys.modules.update(stubs)
        try:
            importlib.import_module("rigl_torch.RigL")  # rigl_torch.util keeps its reference to the stub
        finally:
            for k in stubs:
                sys.modules.pop(k, None)
    elif name == "sparsimony_set":
        importlib.import_module("sparsimony.dst.set")


def make(name: str, model_name: str, vocab: int, density: float, seed: int = 0, kernel: str = "auto") -> Contender:
    if name in METHODS:
        s = build(name, model_name, vocab, density, 1, None, "cpu", seed=seed, lr=LR, total_steps=T_END, kernel=kernel)
        return Contender(name, s, lambda t, x, y: topology_update(s, t),
                         lambda: s.topology.density() if s.topology is not None else 1.0)
    import_peer(name)
    torch.manual_seed(seed)  # as common.build: the same initial weights
    model = LLaMA(model_preset(model_name, vocab_size=vocab))
    opt, kind = dense_adam(model.parameters(), LR, torch.device("cpu"))
    setup, names = Setup(name, model, opt, dense_adam=kind), sparse_names(model)
    return (make_sparsimony if name == "sparsimony_set" else make_rigl)(setup, names, density)


def make_sparsimony(s: Setup, names: list[str], density: float) -> Contender:
    from sparsimony.distributions.base import UniformDistribution
    from sparsimony.dst.base import DSTMixin
    from sparsimony.dst.set import SET
    from sparsimony.schedulers.base import ConstantScheduler
    from sparsimony.utils import get_mask, get_original_tensor

    class FixedSET(SET):
        _assert_sparsity_level = DSTMixin._assert_sparsity_level

        def _step(self):
            super()._step()
            self._step_count -= 1  # SET._step advances the counter twice

    sp = FixedSET(ConstantScheduler(PRUNE, T_END, EVERY), UniformDistribution(), s.opt, sparsity=1 - density,
                  init_method=None)  # the optimizer first: prepare() wraps its step
    sp.prepare(s.model, [{"tensor_fqn": n} for n in names])

    def update(t, x, y):
        sp._step_count = t - 1
        return timed(sp.step)

    @torch.no_grad()
    def layers():
        return [(get_mask(**g).bool(), getattr(g["module"], g["tensor_name"]), get_original_tensor(**g)) for g in sp.groups]

    def density_now():
        ls = layers()
        return sum(int(m.sum()) for m, _, _ in ls) / sum(m.numel() for m, _, _ in ls)

    return Contender("sparsimony_set", s, update, density_now, layers, masks=lambda: [get_mask(**g) for g in sp.groups])


def make_rigl(s: Setup, names: list[str], density: float) -> Contender:
    from rigl_torch.RigL import RigLScheduler

    class UniformRigL(RigLScheduler):
        def random_sparsify(self):
            self.S = [1 - self.dense_allocation] * len(self.W)  # every listed layer sparse, the first one too
            super().random_sparsify()

        def cosine_annealing(self):
            return self.alpha  # constant prune fraction

    projections = nn.ModuleList(s.model.get_submodule(n.rpartition(".")[0]) for n in names)
    sched = UniformRigL(projections, s.opt, dense_allocation=density, T_end=T_END, delta=EVERY, alpha=PRUNE,
                        ignore_linear_layers=False)

    def update(t, x, y):
        sched.step = t - 1  # the next backward precedes an update: the hooks keep the dense gradient
        s.model(x, y).backward()
        torch.nn.utils.clip_grad_norm_(s.model.parameters(), CLIP, foreach=True)
        out = []
        dt = timed(lambda: out.append(sched()))
        assert out == [False] and sched.step == t, "rigl-torch did not update"  # False: skip optimizer.step()
        s.opt.zero_grad(set_to_none=True)
        return dt

    def layers():
        return [(m.bool(), w.detach(), w) for m, w in zip(sched.backward_masks, sched.W)]

    def density_now():
        return sum(int(m.sum()) for m in sched.backward_masks) / sum(m.numel() for m in sched.backward_masks)

    def buffers():
        return sum(h.dense_grad.numel() * h.dense_grad.element_size() for h in sched.backward_hook_objects
                   if h is not None and h.dense_grad is not None)

    return Contender("rigl_torch", s, update, density_now, layers, buffers, lambda: list(sched.backward_masks))

