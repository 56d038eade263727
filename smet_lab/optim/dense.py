"""The dense parameter group (embeddings, head, norms): plain Adam with decoupled weight decay."""

from __future__ import annotations

import inspect
import math

import torch

FUSED_DEVICES = ("cpu", "cuda")


class DenseAdam:
    """torch.optim.AdamW on the dense parameters: its fused kernel (one pass per tensor) where this
    torch has one for the device (the feature test nanoGPT uses), else torch's foreach/for-loop
    implementation. Every parameter uses the optimizer's global step, not a count of its own steps.

    damp_steps = W reproduces warmup_kind="released": m *= t / W in place while the global step t < W.
    AdamW cannot damp, so those steps run the same math in foreach ops here."""

    def __init__(self, params: list[torch.nn.Parameter], betas: tuple[float, float], eps: float,
                 weight_decay: float, damp_steps: int = 0):
        fused = "fused" in inspect.signature(torch.optim.AdamW).parameters \
            and all(p.device.type in FUSED_DEVICES for p in params)
        self.adam = torch.optim.AdamW(params, lr=0.0, betas=betas, eps=eps, weight_decay=weight_decay,
                                      fused=fused or None)
        self.damp_steps = damp_steps
        # Allocated eagerly (AdamW would on its first step) so that memory accounting is exact from
        # step 0 and the damped steps have moments to update. Step tensors are where AdamW keeps them.
        for p in params:
            self.adam.state[p] = {
                "step": torch.zeros((), dtype=torch.float32, device=p.device if fused else "cpu"),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }
        self.state = self.adam.state
        self.params = params

    @torch.no_grad()
    def step(self, lr: float, t: int) -> None:
        """One step at global step t (1-based) with learning rate lr."""
        params = [p for p in self.params if p.grad is not None]
        if not params:
            return
        if t < self.damp_steps:
            self._damped_step(params, lr, t, t / self.damp_steps)
            return
        for p in params:
            self.state[p]["step"].fill_(t - 1)  # AdamW counts it up before use
        self.adam.param_groups[0]["lr"] = lr
        self.adam.step()

    def _damped_step(self, params: list[torch.Tensor], lr: float, t: int, damp: float) -> None:
        b1, b2 = self.adam.defaults["betas"]
        eps, wd = self.adam.defaults["eps"], self.adam.defaults["weight_decay"]
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
