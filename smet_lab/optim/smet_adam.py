"""SMETAdam: Adam whose sparse-layer gradients and moments exist only for active weights.

Two parameter groups. The dense one (embeddings, head, norms) is plain AdamW (smet_lab.optim.dense).
The sparse one keeps its state in one of two layouts behind the SparseState interface, chosen once
by `state`: "compact" (per active block, smet_lab.optim.compact) or "dense_masked" (dense-size with a
mask, smet_lab.optim.masked).

A post-accumulate-grad hook hands each sparse weight's dense gradient to the layout as soon as
autograd produces it and drops the dense tensor, so a dense weight gradient lives only during its own
layer's backward. The moments are updated in place over the flat buffers of all sparse layers at
once; the bias-corrected update is formed over chunks of consecutive layers of >= STEP_CHUNK entries
(one chunk for llama_20m, about twenty for llama_130m at density 0.25), which bounds its temporaries.

SMET semantics (docs/design.md section 2), per active entry i:
    regrow(i): m_i = v_i = 0, t_i = 0       (theta_i = 0 is the topology updater's job)
    step:      t_i += 1 (reset_step) else t_i = the global step
               u_i = (m_i / (1-b1^t_i)) / (sqrt(v_i / (1-b2^t_i)) + eps) + weight_decay * theta_i
               lr_i = lr * scale(d) * warm_i,  warm_i = min(1, age_i / W) for regrown entries
               (age_i = steps since regrowth, counting the current one)
warmup_kind="moment_damping": m_i *= warm_i in place instead of scaling lr_i (regrown entries only).
warmup_kind="released": the released SMET code, bugs included. Every tensor keeps a counter c
incremented before use: the global step for dense parameters and sparse entries never regrown, and
age_i + 1 for regrown entries (the released code sets it to 1 at regrowth). Then m *= min(1, c / W)
in place for EVERY tensor with c < W (so all parameters are damped during the first W global steps),
and with reset_step the bias corrections use t_i = c (a regrown entry's first update uses t = 2).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from smet_lab.config import OptimConfig
from smet_lab.optim.dense import DenseAdam
from smet_lab.optim.fused import exact_step, fused_step, resolve_kernel
from smet_lab.optim.options import LR_SCALING, STATE_LAYOUTS, optimizer_kwargs, validate_optimizer
from smet_lab.optim.sparse_state import SparseState
from smet_lab.sparse.topology import SparseTopology
from smet_lab.sparse.updater import RegrowEvent

__all__ = ["SMETAdam"]

# The layout's keys in a checkpoint; those of the other layout are saved as None (format 2).
LAYOUT_KEYS = ("cohort", "births", "age", "active")


class SMETAdam(torch.optim.Optimizer):
    def __init__(
        self,
        model: nn.Module,
        topology: SparseTopology,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        reset_step: bool = True,
        warmup_steps: int = 0,
        warmup_kind: str = "linear_lr",
        lr_scaling: str = "inverse",
        lr_scaling_power: float = 1.0,
        lr_scaling_scope: str = "sparse",
        state: str = "compact",
        kernel: str = "auto",
    ):
        validate_optimizer(lr, betas, eps, weight_decay, warmup_steps, warmup_kind, lr_scaling,
                           lr_scaling_power, lr_scaling_scope, state, kernel)
        self.topology = topology
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = eps
        self.weight_decay = weight_decay
        self.reset_step = reset_step
        self.warmup_steps = warmup_steps
        self.warmup_kind = warmup_kind
        self.layout = state
        self.global_step = 0
        self.last_regrow_step: int | None = None

        self.lr_scale = LR_SCALING[lr_scaling](topology.density(), lr_scaling_power)
        sparse_ids = {id(layer.param) for layer in topology.layers}
        dense = [p for p in model.parameters() if p.requires_grad and id(p) not in sparse_ids]
        sparse = [layer.param for layer in topology.layers]
        groups = []
        if dense:
            scale = self.lr_scale if lr_scaling_scope == "all" else 1.0
            groups.append({"params": dense, "lr": lr * scale, "base_lr": lr * scale, "kind": "dense"})
        if sparse:
            groups.append({"params": sparse, "lr": lr * self.lr_scale, "base_lr": lr * self.lr_scale, "kind": "sparse"})
        super().__init__(groups, {"lr": lr})

        self.dense = None
        if dense:
            released = warmup_kind == "released"
            self.dense = DenseAdam(dense, self.betas, eps, weight_decay, warmup_steps if released else 0)
            self.state.update(self.dense.state)  # the same per-parameter dicts, as torch optimizers show them
        self.sparse: SparseState = STATE_LAYOUTS[state](topology, self.betas, reset_step, warmup_steps, warmup_kind)
        # The sparse step's kernel (smet_lab.optim.fused); only the compact layout has a fused one.
        entries = self.sparse.grad.numel()
        self.kernel = resolve_kernel(kernel, entries, self.sparse.device) if state == "compact" and entries else "eager"
        self._fused = fused_step(self.sparse.device) if self.kernel == "compiled" else None
        if self._fused is not None and self._fused.failed:  # could not be built: said once, eager from here
            self._fused, self.kernel = None, "eager"
        if self.kernel == "eager" and state == "compact" and entries:  # the same bits, faster where it builds
            self._fused = exact_step(self.sparse.device)
        if self._fused is not None:
            self.sparse.fused = self._fused  # the layout gathers and decodes its rows with the kernel's helpers
        self._fresh = [True] * len(topology.layers)
        self._hooks = [layer.param.register_post_accumulate_grad_hook(self._make_hook(i))
                       for i, layer in enumerate(topology.layers)]

    @classmethod
    def from_config(cls, model: nn.Module, topology: SparseTopology, cfg: OptimConfig) -> SMETAdam:
        """The optimizer an `optim` config section describes (schedule and clipping are the trainer's)."""
        return cls(model, topology, **optimizer_kwargs(cfg))

    # The sparse layers' flat [rows, block_size] buffers and cohort births (None without cohorts).
    grad = property(lambda self: self.sparse.grad)
    exp_avg = property(lambda self: self.sparse.exp_avg)
    exp_avg_sq = property(lambda self: self.sparse.exp_avg_sq)
    births = property(lambda self: self.sparse.births)

    # ------------------------------------------------------------------------------------ grads
    def _make_hook(self, i: int):
        def gather_grad(p: torch.Tensor) -> None:
            self.sparse.gather(i, p.grad, self._fresh[i])
            self._fresh[i] = False
            p.grad = None  # the dense gradient dies here

        return gather_grad

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _dense_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups if g["kind"] == "dense" for p in g["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self._dense_params():
            p.grad = None
        self._fresh = [True] * len(self.topology.layers)

    def _settle_sparse_grads(self) -> None:
        # A layer whose hook did not fire since zero_grad has no gradient this step.
        for i, fresh in enumerate(self._fresh):
            if fresh:
                self.sparse.grad[self.sparse.rows(i)].zero_()
                self._fresh[i] = False

    def gradients(self) -> list[torch.Tensor]:
        """Every gradient this step's update reads, as tensors to reduce in place across processes:
        the sparse layers' buffer (active entries only with the compact layout), then the dense
        parameters' gradients (every process has the same graph, so the same list)."""
        self._settle_sparse_grads()
        return [self.sparse.grad] + [p.grad for p in self._dense_params() if p.grad is not None]

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Global L2 norm over dense AND sparse gradients; scales both if max_norm > 0. (Per-tensor norms:
        torch.nn.utils.get_total_norm computes the same bits with ~0.1 ms more Python per call.)"""
        self._settle_sparse_grads()
        grads = [p.grad for p in self._dense_params() if p.grad is not None] + [self.sparse.grad]
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        if max_norm and max_norm > 0:
            coef = (max_norm / (total + 1e-6)).clamp_(max=1.0)
            torch._foreach_mul_(grads, coef)
        return total

    # ------------------------------------------------------------------------------------- step
    def set_lr_factor(self, factor: float) -> None:
        """Multiply every group's base lr (density scaling included) by the schedule's factor."""
        for group in self.param_groups:
            group["lr"] = group["base_lr"] * factor

    @torch.no_grad()
    def step(self, closure=None):
        self.global_step += 1
        for group in self.param_groups:
            if group["kind"] == "dense":
                self.dense.step(group["lr"], self.global_step)
            else:
                self._sparse_step(group["lr"])

    def _warming_now(self) -> bool:
        """True while blocks regrown at the last update are inside their W-step warm-up, and with
        warmup_kind="released" also during the first W global steps (every counter is below W)."""
        W, g = self.warmup_steps, self.global_step
        if W == 0:
            return False
        regrown = self.last_regrow_step is not None and g - self.last_regrow_step <= W
        return regrown or (self.warmup_kind == "released" and g < W)

    def _sparse_step(self, lr: float) -> None:
        """Adam on the layout's buffers, then the update into the weights, chunk by chunk."""
        self._settle_sparse_grads()
        if self._fused is not None and self._fused_step(lr):
            return
        b1, b2 = self.betas
        s = self.sparse
        g, m, v = s.grad, s.exp_avg, s.exp_avg_sq
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        warming = self._warming_now()
        s.begin_step(self.global_step, warming)
        damping = warming and self.warmup_kind != "linear_lr"
        for first, last in s.chunks:
            sl = s.span(first, last)
            m_c, v_c = m[sl], v[sl]
            bc1, bc2, warm = s.coefficients(sl)
            if damping:
                m_c.mul_(warm)
            upd = (m_c / bc1).div_((v_c / bc2).sqrt_().add_(self.eps))
            if self.weight_decay:
                upd.add_(s.weights(first, last), alpha=self.weight_decay)
            if warm is not None and not damping:
                upd.mul_(warm)
            s.descend(first, last, upd, lr)

    @torch.no_grad()
    def preconditioned(self, rows: torch.Tensor) -> torch.Tensor:
        """|m_hat| / (sqrt(v_hat) + eps) of the sparse state's `rows` [n, B] as the last step formed it
        (before the warm-up factor, weight decay and lr): Adam's preconditioned step, 1 for a steady
        gradient. For the stability probes (smet_lab.train.probe)."""
        s, rows = self.sparse, rows.to(self.sparse.device, torch.long)
        bc1, bc2, _ = s.coefficients(rows)
        m, v = s.exp_avg[rows], s.exp_avg_sq[rows]
        return (m / bc1).div_((v / bc2).sqrt_().add_(self.eps)).abs_()

    def _fused_step(self, lr: float) -> bool:
        """The sparse step as one fused pass per chunk (one over all rows with compact weights), or with
        kernel eager the kernel's exact form, chunk by chunk as the eager ops go; False if the kernel
        cannot run it (nothing changed, the caller runs the eager step)."""
        s = self.sparse
        compact, exact = s.values is not None, self.kernel == "eager"
        if not self._fused.takes(s.cohort, s.values if compact else s.dense):
            return False
        s.begin_step(self.global_step, self._warming_now())
        table = s.fused_table()
        damping = self.warmup_kind != "linear_lr"
        run = self._fused.exact if exact else self._fused
        for first, last in [(0, len(s.layers))] if compact and not exact else s.chunks:
            sl = s.span(first, last)
            theta, rows = (s.values[sl], None) if compact else (s.dense, s.step_index(first, last))
            cohort = None if s.cohort is None else s.cohort[sl]
            if not run(s.grad[sl], s.exp_avg[sl], s.exp_avg_sq[sl], cohort, table, lr, *self.betas, self.eps,
                       self.weight_decay, damping, theta, rows):
                if first:  # earlier chunks are updated: an eager rerun would update them twice
                    raise RuntimeError("optim.kernel=compiled: the fused kernel failed to build in the middle of a "
                                       "step; run with optim.kernel=eager")
                self._fused, self.kernel, s.fused = None, "eager", None
                return False
            if rows is not None:
                s.forget_index(first)
        return True

    # ---------------------------------------------------------------------------------- regrowth
    @torch.no_grad()
    def regrow(self, events: list[RegrowEvent]) -> torch.Tensor | None:
        """Reset the state of entries regrown by a topology update (see the module docstring); returns
        their rows in the sparse state (int32; None without events).

        Call it after the topology has changed (DynamicSparsity.update), with at most one event per
        layer. The regrown entries start with m = v = 0 and a local step that starts now."""
        fresh = self.sparse.regrow(events, self.global_step)
        if fresh is not None:
            self.last_regrow_step = self.global_step
        return fresh

    # -------------------------------------------------------------------------------- accounting
    def state_bytes_by_role(self) -> dict[str, int]:
        """Bytes of every gradient and optimizer-state tensor, by role. Dense gradients count at full
        size: they exist from backward to the step. Sparse gradients exist only in the layout's buffer."""
        dense = self._dense_params()

        def nbytes(tensors):
            return sum(t.numel() * t.element_size() for t in tensors)

        return {
            "dense/grad": nbytes(dense),
            "dense/exp_avg": nbytes(self.state[p]["exp_avg"] for p in dense),
            "dense/exp_avg_sq": nbytes(self.state[p]["exp_avg_sq"] for p in dense),
            **self.sparse.bytes_by_role(),
            "sparse/index": self.topology.index_bytes(),
        }

    def state_bytes(self, part: str = "all") -> int:
        """Bytes of gradients + optimizer state; part = all | sparse | dense."""
        return sum(b for role, b in self.state_bytes_by_role().items()
                   if part == "all" or role.startswith(part + "/"))

    # ---------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        return {
            "format": 2,
            "global_step": self.global_step,
            "last_regrow_step": self.last_regrow_step,
            "layout": self.layout,
            "dense": [(self.state[p]["exp_avg"].clone(), self.state[p]["exp_avg_sq"].clone())
                      for p in self._dense_params()],
            **dict.fromkeys(LAYOUT_KEYS),
            **self.sparse.state_dict(),
            "lr": [g["lr"] for g in self.param_groups],
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != 2 or state["layout"] != self.layout or not self.sparse.matches(state):
            raise ValueError("optimizer checkpoint does not match this model/sparsity/state layout")
        self.global_step = state["global_step"]
        self.last_regrow_step = state["last_regrow_step"]
        for p, (m, v) in zip(self._dense_params(), state["dense"]):
            self.state[p]["exp_avg"].copy_(m)
            self.state[p]["exp_avg_sq"].copy_(v)
        self.sparse.load_state_dict(state)
        for g, lr in zip(self.param_groups, state["lr"]):
            g["lr"] = lr
