"""The dense parameter group (embeddings, head, norms): plain Adam with decoupled weight decay."""

from __future__ import annotations

import inspect
import math

import torch
from torch.optim.adamw import adamw

FUSED_DEVICES = ("cpu", "cuda")
# The op behind adamw(fused=True), called directly where this torch has it: the functional wrapper's
# Python costs ~0.07 ms per step after a backward (tiny model: 0.18 -> 0.11 ms; same kernel, same bits).
FUSED_ADAMW = getattr(torch, "_fused_adamw_", None)


class DenseAdam:
    """AdamW on the dense parameters: torch's fused AdamW kernel (one pass per tensor) where this torch
    has one for the device (the feature test nanoGPT uses), else the foreach implementation of the
    functional `torch.optim.adamw.adamw`. Both skip torch.optim.Optimizer.step's per-call machinery
    (hooks, profiler scope, state initialisation): measured 0.31 ms per step on the tiny model through
    AdamW.step, 0.18 through the functional call, 0.11 through the op; the same kernel and bits.
    Every parameter uses the optimizer's global step, not a count of its own steps.

    damp_steps = W reproduces warmup_kind="released": m *= t / W in place while the global step t < W.
    AdamW cannot damp, so those steps run the same math in foreach ops here."""

    def __init__(self, params: list[torch.nn.Parameter], betas: tuple[float, float], eps: float,
                 weight_decay: float, damp_steps: int = 0):
        self.fused = "fused" in inspect.signature(torch.optim.AdamW).parameters \
            and all(p.device.type in FUSED_DEVICES for p in params)
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        self.damp_steps = damp_steps
        # Allocated eagerly so that memory accounting is exact from step 0 and the damped steps have
        # moments to update. The step tensors live where AdamW's fused / foreach kernels read them.
        self.state = {p: {
            "step": torch.zeros((), dtype=torch.float32, device=p.device if self.fused else "cpu"),
            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
        } for p in params}
        self.params = params
        self._steps_at: int | None = 0  # the value every step tensor holds, None when unknown

    @torch.no_grad()
    def step(self, lr: float, t: int) -> None:
        """One step at global step t (1-based) with learning rate lr."""
        params = [p for p in self.params if p.grad is not None]
        if not params:
            return
        if t < self.damp_steps:
            self._damped_step(params, lr, t, t / self.damp_steps)
            self._steps_at = None
            return
        steps = [self.state[p]["step"] for p in params]
        if self._steps_at != t - 1:
            for s in steps:
                s.fill_(t - 1)  # counted up to t before use
        tensors = (params, [p.grad for p in params], [self.state[p]["exp_avg"] for p in params],
                   [self.state[p]["exp_avg_sq"] for p in params], [], steps)
        hp = dict(amsgrad=False, beta1=self.betas[0], beta2=self.betas[1], lr=lr, weight_decay=self.weight_decay,
                  eps=self.eps, maximize=False)
        if self.fused and FUSED_ADAMW is not None:
            torch._foreach_add_(steps, 1)
            FUSED_ADAMW(*tensors, **hp)
        else:
            adamw(*tensors, foreach=not self.fused, fused=self.fused, **hp)
        self._steps_at = t if len(params) == len(self.params) else None

    def _damped_step(self, params: list[torch.Tensor], lr: float, t: int, damp: float) -> None:
        (b1, b2), eps, wd = self.betas, self.eps, self.weight_decay
        grads = [p.grad for p in params]
        ms = [self.state[p]["exp_avg"] for p in params]
        vs = [self.state[p]["exp_avg_sq"] for p in params]
        torch._foreach_lerp_(ms, grads, 1 - b1)
        torch._foreach_mul_(ms, damp)
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, grads, grads, 1 - b2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, math.sqrt(1 - b2 ** t))
        torch._foreach_add_(denom, eps)
        if wd:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_addcdiv_(params, ms, denom, -lr / (1 - b1 ** t))
