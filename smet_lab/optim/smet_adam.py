"""SMETAdam: Adam whose sparse-layer gradients and moments exist only for active weights.

Layout (state="compact"): all sparse layers share one flat buffer per quantity, shaped
[active blocks, block_size] in slot order (layer after layer; within a layer, ascending block id):

    grad, exp_avg, exp_avg_sq : float32 [K, B]
    cohort                    : uint8   [K]   which topology update grew the block (0 = active since
                                              the start); only when reset_step or a warm-up needs it
    births                    : int64   [C]   the global step of each cohort's update (C <= 256)
    positions                 : the topology's chunked position list (uint8 per active block + int16
                                per 256 blocks; see smet_lab.sparse.topology), shared, not copied

At block size 1 that is 12 + 1 + 1 (+ 2/256/d) bytes per active weight: 14.03 B at density 0.25,
0.292 x dense Adam's 12 B per weight (the released SMET layout, int32 index + int16 step, is 18 B).

The local step follows from the cohort: t_i = global_step - births[cohort_i] (= steps since regrowth,
counting the current one; = the global step for blocks active from the start), and so does the
warm-up min(1, t_i / W). Coefficients are computed once per cohort (a table of <= 256 float32 values)
and gathered per block. Cohort ids are recycled at topology updates: a cohort with no members left is
freed, and a cohort whose age reaches `merge_age` is merged into id 0. merge_age is max(W, T) with T
the smallest t from which float32 1 - b1^t and 1 - b2^t are exactly 1 (17,321 for b2 = 0.999; only W
without reset_step), so from then on the cohort's bias corrections and warm-up are exactly those of
id 0 (1.0) and the merge changes no bit of any update. If more than 255 cohorts are ever alive at once
(update_every * 255 < merge_age), the id tensor widens to int16 (then int32): still exact, 1 byte more.

A post-accumulate-grad hook gathers each sparse weight's dense gradient into `grad` as soon as
autograd produces it and drops the dense tensor, so a dense weight gradient lives only during its own
layer's backward. Gathers and scatters use the int32 block ids decoded from the position list in
O(active) work (one repeat_interleave + add), one index kernel per layer, no per-entry Python work.
The moments are updated in place over the flat buffers of all sparse layers at once; the bias-
corrected update is formed over chunks of consecutive layers of >= STEP_CHUNK entries (one chunk
for llama_20m, five for llama_130m at density 0.25), which bounds its temporaries. A topology update
moves surviving entries to their new slots with one O(active) gather per layer; no dense-size tensor
is built.

state="dense_masked" keeps the same math on dense-size buffers with a per-block mask and an int16
age per block (what mask-based DST libraries do), so memory can be compared like for like.

SMET semantics (docs/design.md section 2), per active entry i:
    regrow(i): m_i = v_i = 0, t_i = 0       (theta_i = 0 is the topology updater's job)
    step:      t_i += 1 (reset_step) else t_i = the global step
               u_i = (m_i / (1-b1^t_i)) / (sqrt(v_i / (1-b2^t_i)) + eps)
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

import math

import torch
import torch.nn as nn

from smet_lab.config import ConfigError
from smet_lab.sparse.topology import SparseTopology, moved_from
from smet_lab.sparse.updater import RegrowEvent

# Density-aware LR rules: scale(d, power). A new rule = one entry here.
LR_SCALING = {
    "none": lambda d, p: 1.0,
    "inverse": lambda d, p: 1.0 / d,
    "inverse_sqrt": lambda d, p: d ** -0.5,
    "power": lambda d, p: d ** -p,
}
WARMUP_KINDS = ("linear_lr", "moment_damping", "released")
STATE_LAYOUTS = ("compact", "dense_masked")
AGE_MAX = 32767  # dense_masked's int16 age saturates; exact as long as b2**AGE_MAX underflows float32
COHORT_DTYPES = (torch.uint8, torch.int16, torch.int32)  # widened only when ids run out
NEVER = 2 ** 62
STEP_CHUNK = 1 << 22  # state entries per chunk of the update's temporaries (16 MiB per float32 temp)


def _rows(blocks: torch.Tensor) -> torch.Tensor:
    """A [n, B] block view as index_select/index_add_ run it fastest: 1-D when B = 1 (the 2-D form
    with rows of one element is ~15x slower on CPU)."""
    return blocks.view(-1) if blocks.shape[1] == 1 else blocks


def bias_correction_saturation(beta: float) -> int:
    """Smallest t such that the step's float32 `1 - beta ** t` is exactly 1.0 for every t' >= t
    (evaluated with the same torch expression the step uses; NEVER if beyond 2^24 steps)."""
    if beta == 0.0:
        return 1
    estimate = math.ceil(25 * math.log(2) / -math.log(beta))
    hi = min(2 * estimate + 64, 2 ** 24)
    t = torch.arange(1, hi + 1, dtype=torch.float32)
    not_one = ((1 - beta ** t) != 1.0).nonzero()
    if not_one.numel() and int(not_one[-1]) == hi - 1:
        return NEVER
    return int(not_one[-1]) + 2 if not_one.numel() else 1


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
    ):
        validate_optimizer(lr, betas, eps, weight_decay, warmup_steps, warmup_kind, lr_scaling,
                           lr_scaling_power, lr_scaling_scope, state)
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
        self.last_regrow_update_ratio: float | None = None
        self._step_tensors: dict[torch.device, torch.Tensor] = {}

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

        # Dense Adam state, allocated eagerly so memory accounting is exact from step 0.
        for p in dense:
            self.state[p]["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            self.state[p]["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

        self._init_sparse_state()

    # ----------------------------------------------------------------------------------- layout
    def _init_sparse_state(self) -> None:
        layers = self.topology.layers
        B = self.topology.block_size
        self.compact = self.layout == "compact"
        sizes = [(layer.n_active if self.compact else layer.n_blocks) for layer in layers]
        self._offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        total = self._offsets[-1]
        device = layers[0].param.device if layers else torch.device("cpu")
        f32 = dict(dtype=torch.float32, device=device)
        self.grad = torch.zeros(total, B, **f32)
        self.exp_avg = torch.zeros(total, B, **f32)
        self.exp_avg_sq = torch.zeros(total, B, **f32)
        needs_age = (self.reset_step or self.warmup_steps > 0) and bool(layers)
        # compact: cohort id per active block + birth step per cohort (see the module docstring)
        self.cohort = torch.zeros(total, dtype=torch.uint8, device=device) if needs_age and self.compact else None
        self.births = torch.zeros(1, dtype=torch.int64) if self.cohort is not None else None
        self.merge_age = max(self.warmup_steps, *(map(bias_correction_saturation, self.betas) if self.reset_step else [0]))
        # dense_masked: int16 age and bool mask per block, dense-size
        self.age = torch.zeros(total, 1, dtype=torch.int16, device=device) if needs_age and not self.compact else None
        self.active = None
        if not self.compact:
            self.active = torch.cat([layer.active_mask() for layer in layers]).unsqueeze(1) if layers \
                else torch.zeros(0, 1, dtype=torch.bool, device=device)
        # Consecutive layers grouped into chunks of >= STEP_CHUNK state entries (see _sparse_step).
        self._chunks, first = [], 0
        for i in range(len(layers)):
            if (self._offsets[i + 1] - self._offsets[first]) * B >= STEP_CHUNK or i == len(layers) - 1:
                self._chunks.append((first, i + 1))
                first = i + 1
        self._fresh = [True] * len(layers)
        self._hooks = [layer.param.register_post_accumulate_grad_hook(self._make_hook(i))
                       for i, layer in enumerate(layers)]

    def _slice(self, i: int) -> slice:
        return slice(self._offsets[i], self._offsets[i + 1])

    def _make_hook(self, i: int):
        layer = self.topology.layers[i]

        def gather_grad(p: torch.Tensor) -> None:
            g = p.grad.view(-1, layer.block_size)
            buf = self.grad[self._slice(i)]
            if self.compact:
                idx = layer.block_idx
                g, out = _rows(g), _rows(buf)
                if self._fresh[i]:
                    torch.index_select(g, 0, idx, out=out)
                else:
                    out.add_(g.index_select(0, idx))
            else:
                mask = self.active[self._slice(i)]
                buf.copy_(g * mask) if self._fresh[i] else buf.addcmul_(g, mask)
            self._fresh[i] = False
            p.grad = None  # the dense gradient dies here

        return gather_grad

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # ------------------------------------------------------------------------------------ grads
    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            if group["kind"] == "dense":
                for p in group["params"]:
                    p.grad = None
        self._fresh = [True] * len(self.topology.layers)

    def _dense_grads(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        params = [p for g in self.param_groups if g["kind"] == "dense" for p in g["params"] if p.grad is not None]
        return params, [p.grad for p in params]

    def _settle_sparse_grads(self) -> None:
        # A layer whose hook did not fire since zero_grad has no gradient this step.
        for i, fresh in enumerate(self._fresh):
            if fresh:
                self.grad[self._slice(i)].zero_()
                self._fresh[i] = False

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Global L2 norm over dense AND sparse gradients; scales both if max_norm > 0."""
        self._settle_sparse_grads()
        _, grads = self._dense_grads()
        norms = [torch.linalg.vector_norm(g) for g in grads] + [torch.linalg.vector_norm(self.grad)]
        total = torch.linalg.vector_norm(torch.stack(norms))
        if max_norm and max_norm > 0:
            coef = (max_norm / (total + 1e-6)).clamp_(max=1.0)
            if grads:
                torch._foreach_mul_(grads, coef)
            self.grad.mul_(coef)
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
                self._dense_step(group)
            else:
                self._sparse_step(group)

    def _dense_step(self, group: dict) -> None:
        """Plain Adam (decoupled weight decay) on the dense parameters: torch's fused AdamW kernel on
        CPU and CUDA (one pass per tensor), the same math in foreach ops elsewhere."""
        params, grads = [], []
        for p in group["params"]:
            if p.grad is not None:
                params.append(p)
                grads.append(p.grad)
        if not params:
            return
        b1, b2 = self.betas
        t, lr = self.global_step, group["lr"]
        ms = [self.state[p]["exp_avg"] for p in params]
        vs = [self.state[p]["exp_avg_sq"] for p in params]
        # warmup_kind="released" damps dense moments too while the global step is below W; the fused
        # kernel cannot, so those first W - 1 steps take the foreach path below.
        damp = t / self.warmup_steps if self.warmup_kind == "released" and t < self.warmup_steps else 1.0
        if damp == 1.0 and hasattr(torch, "_fused_adamw_") and params[0].device.type in ("cpu", "cuda") \
                and all(p.dtype == params[0].dtype for p in params):
            # The kernel reads each tensor's step from `state_steps`; all share the global step (a
            # scalar counter like global_step itself, not per-parameter state).
            step = self._step_tensors.get(params[0].device)
            if step is None:
                step = self._step_tensors[params[0].device] = torch.zeros((), dtype=torch.float32, device=params[0].device)
            step.fill_(t)
            torch._fused_adamw_(params, grads, ms, vs, [], [step] * len(params), lr=lr, beta1=b1, beta2=b2,
                                weight_decay=self.weight_decay, eps=self.eps, amsgrad=False, maximize=False)
            return
        torch._foreach_lerp_(ms, grads, 1 - b1)
        if damp != 1.0:
            torch._foreach_mul_(ms, damp)
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, grads, grads, 1 - b2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, math.sqrt(1 - b2 ** t))
        torch._foreach_add_(denom, self.eps)
        if self.weight_decay:
            torch._foreach_mul_(params, 1 - lr * self.weight_decay)
        torch._foreach_addcdiv_(params, ms, denom, -lr / (1 - b1 ** t))

    def _cohort_ages(self) -> torch.Tensor:
        """float32 [C]: steps since each cohort's update, counting the current one (the local step)."""
        return (self.global_step - self.births).float()

    def _warming_now(self) -> bool:
        """True while blocks regrown at the last update are inside their W-step warm-up, and with
        warmup_kind="released" also during the first W global steps (every counter is below W)."""
        W, g = self.warmup_steps, self.global_step
        if W == 0:
            return False
        regrown = self.last_regrow_step is not None and g - self.last_regrow_step <= W
        return regrown or (self.warmup_kind == "released" and g < W)

    def _cohort_table(self, device) -> torch.Tensor:
        """Compact layout: [C, 3] per cohort: 1 - b1^t, 1 - b2^t and the warm-up factor min(1, t/W)
        (1 for id 0, i.e. blocks active from the start or merged, and for free ids), t = local step.
        warmup_kind="released": t is the released code's counter (local step + 1 for regrown cohorts,
        ids > 0) and id 0 is warmed too. A merge stays exact: at age >= merge_age >= W and T both
        counters give bias corrections and warm-up factors of exactly 1."""
        b1, b2 = self.betas
        t = self._cohort_ages()
        released = self.warmup_kind == "released"
        if released:
            t = t + (torch.arange(t.numel()) > 0)
        warm = torch.ones_like(t)
        if self.warmup_steps > 0:
            warming = t < self.warmup_steps
            if not released:
                warming &= self.births > 0
            warm = torch.where(warming, t / self.warmup_steps, warm)
        return torch.stack([1 - b1 ** t, 1 - b2 ** t, warm], 1).to(device)

    def _chunk_coefficients(self, sl: slice, table, warming: bool):
        """(bias correction 1, bias correction 2, warm-up factor or None) for the state rows `sl`."""
        b1, b2 = self.betas
        if table is not None:  # compact with cohorts: one value per cohort, gathered per block
            coef = table.index_select(0, self.cohort[sl].int())
            bc1, bc2 = (coef[:, 0:1], coef[:, 1:2]) if self.reset_step else \
                (1 - b1 ** self.global_step, 1 - b2 ** self.global_step)
            return bc1, bc2, coef[:, 2:3] if warming else None
        if self.reset_step:  # dense_masked: the int16 age per block is the local step
            t = self.age[sl].float()
            bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
        else:  # the shared global step (naive DST)
            bc1, bc2 = 1 - b1 ** self.global_step, 1 - b2 ** self.global_step
        warm = None
        if warming:
            age = self.age[sl]
            warm = (age.float() / self.warmup_steps).clamp_(max=1.0)
            if self.warmup_kind != "released":  # released: every block, its age is its counter
                regrown = age.int() < min(self.global_step, AGE_MAX)  # initial blocks: as old as the run
                warm = torch.where(regrown, warm, 1.0)
        return bc1, bc2, warm

    def _sparse_step(self, group: dict) -> None:
        """Adam on the compact (or masked) buffers, then the scatter into the weights. The moments
        are updated in place for all sparse layers at once; the bias-corrected update is formed in
        chunks of consecutive layers (>= STEP_CHUNK entries each), so its temporaries stay bounded
        by a chunk instead of growing with the model."""
        self._settle_sparse_grads()
        b1, b2 = self.betas
        g, m, v = self.grad, self.exp_avg, self.exp_avg_sq
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        if self.age is not None:
            self.age.clamp_(max=AGE_MAX - 1).add_(1)
        warming = self._warming_now()
        damping = warming and self.warmup_kind != "linear_lr"
        table = self._cohort_table(g.device) if self.cohort is not None else None
        probe, probe_sum = self._probe_slots, None
        lr = group["lr"]
        for first, last in self._chunks:
            sl = slice(self._offsets[first], self._offsets[last])
            m_c, v_c = m[sl], v[sl]
            bc1, bc2, warm = self._chunk_coefficients(sl, table, warming)
            if damping:
                m_c.mul_(warm)
            upd = (m_c / bc1).div_((v_c / bc2).sqrt_().add_(self.eps))
            if self.weight_decay:
                upd.add_(self._active_weights(first, last), alpha=self.weight_decay)
            if warm is not None and not damping:
                upd.mul_(warm)
            if probe is not None:
                # |delta theta| / lr of the entries regrown at the last update, on their first step.
                inside = probe[(probe >= sl.start) & (probe < sl.stop)] - sl.start
                part = upd[inside].abs().sum()
                probe_sum = part if probe_sum is None else probe_sum + part
            for i in range(first, last):
                layer = self.topology.layers[i]
                rows = upd[self._offsets[i] - sl.start:self._offsets[i + 1] - sl.start]
                if self.compact:
                    _rows(layer.blocks()).index_add_(0, layer.block_idx, _rows(rows), alpha=-lr)
                else:
                    layer.blocks().add_(rows, alpha=-lr)
        if probe is not None:
            self.last_regrow_update_ratio = (probe_sum / (probe.numel() * self.topology.block_size)).item()
            self._probe_slots = None

    _probe_slots: torch.Tensor | None = None

    def _active_weights(self, first: int, last: int) -> torch.Tensor:
        """[k, B] weights of layers first..last-1 in slot order (all blocks for dense_masked)."""
        layers = self.topology.layers[first:last]
        if self.compact:
            return torch.cat([layer.gather() for layer in layers])
        return torch.cat([layer.blocks() for layer in layers])

    # ---------------------------------------------------------------------------------- regrowth
    @torch.no_grad()
    def regrow(self, events: list[RegrowEvent]) -> None:
        """Reset the state of entries regrown by a topology update (see the module docstring).

        Call it after the topology has changed (DynamicSparsity.update), with at most one event per
        layer. Compact layout: the surviving entries of a changed layer move to their new slots
        (ascending block ids) and the regrown ones start with m = v = 0 in a new cohort."""
        fresh_slots = []
        for e in events:
            off = self._offsets[e.layer]
            if self.compact:
                slots = self._move_to_new_slots(e)
            else:
                old = e.old_blocks.to(self.grad.device) + off
                slots = e.new_blocks.to(self.grad.device)
                self.active[old] = False
                self.exp_avg[old] = 0.0
                self.exp_avg_sq[old] = 0.0
                self.active[slots + off] = True
            slots = slots + off
            self.exp_avg[slots] = 0.0
            self.exp_avg_sq[slots] = 0.0
            if self.age is not None:  # released: its counter restarts at 1 (then +1 before use)
                self.age[slots] = 1 if self.warmup_kind == "released" else 0
            fresh_slots.append(slots)
        if fresh_slots:
            fresh = torch.cat(fresh_slots).int()
            if self.cohort is not None:
                self.cohort[fresh] = 0  # counted in id 0 while ids are recycled, then given the new id
                new_id = self._new_cohort()  # may re-map or widen self.cohort
                self.cohort[fresh] = new_id
            self.last_regrow_step = self.global_step
            self._probe_slots = fresh

    def _move_to_new_slots(self, e: RegrowEvent) -> torch.Tensor:
        """Permute one layer's compact state from the old slot order to the new one; returns the
        (layer-local) slots of the regrown blocks. O(k log n) with the event's `old_slots` (the
        updater gives them), O(k log k) without; no dense-size tensor either way."""
        layer = self.topology.layers[e.layer]
        device = self.grad.device
        slots = e.slots.to(device, torch.long)
        if e.old_slots is not None:
            source = moved_from(layer.n_active, e.old_slots, slots)
        else:  # derive it: survivors keep their relative order
            ids = layer.block_idx.long()  # the new order
            is_new = torch.zeros(ids.numel(), dtype=torch.bool, device=device)
            is_new[slots] = True
            survivors = ids[~is_new]
            old_ids = torch.cat([survivors, e.old_blocks.to(device, torch.long)]).sort().values
            if old_ids.numel() != ids.numel() or not bool((ids[slots] == e.new_blocks.to(device)).all()):
                raise ValueError(f"regrow event for layer {layer.name} does not match its topology")
            source = torch.full((ids.numel(),), -1, dtype=torch.long, device=device)
            source[~is_new] = torch.searchsorted(old_ids, survivors)
        source.clamp_(min=0)  # regrown slots: any row, reset by the caller
        sl = self._slice(e.layer)
        for buf in (self.grad, self.exp_avg, self.exp_avg_sq, self.cohort):
            if buf is not None:
                buf[sl] = buf[sl].index_select(0, source)
        return slots

    def _new_cohort(self) -> int:
        """A free cohort id for blocks grown now. Recycles ids first: cohorts old enough to be exact
        copies of id 0 are merged into it, and cohorts without members are freed."""
        g = self.global_step
        births = self.births
        ids = torch.arange(births.numel())
        merge = (ids > 0) & (births >= 0) & (g - births >= self.merge_age)
        if merge.any():
            remap = torch.where(merge, 0, ids).to(self.cohort.dtype).to(self.cohort.device)
            self.cohort = remap.index_select(0, self.cohort.int())
            births[merge] = -1
        members = torch.bincount(self.cohort.int(), minlength=births.numel()).cpu()
        births[(ids > 0) & (members == 0)] = -1
        free = ((ids > 0) & (births < 0)).nonzero()
        if free.numel():
            new = int(free[0])
        else:
            new = births.numel()
            if new > torch.iinfo(self.cohort.dtype).max:  # more live cohorts than ids: widen (exact)
                self.cohort = self.cohort.to(COHORT_DTYPES[COHORT_DTYPES.index(self.cohort.dtype) + 1])
            births = self.births = torch.cat([births, torch.full((1,), -1, dtype=torch.int64)])
        births[new] = g
        return new

    # -------------------------------------------------------------------------------- accounting
    def state_bytes_by_role(self) -> dict[str, int]:
        """Bytes of every gradient and optimizer-state tensor, by role. Dense gradients count at full
        size: they exist from backward to the step. Sparse gradients exist only in the flat buffer."""
        dense = [p for g in self.param_groups if g["kind"] == "dense" for p in g["params"]]

        def nbytes(tensors):
            return sum(t.numel() * t.element_size() for t in tensors if t is not None)

        return {
            "dense/grad": nbytes(dense),
            "dense/exp_avg": nbytes(self.state[p]["exp_avg"] for p in dense),
            "dense/exp_avg_sq": nbytes(self.state[p]["exp_avg_sq"] for p in dense),
            "sparse/grad": nbytes([self.grad]),
            "sparse/exp_avg": nbytes([self.exp_avg]),
            "sparse/exp_avg_sq": nbytes([self.exp_avg_sq]),
            "sparse/cohort": nbytes([self.cohort]),
            "sparse/cohort_births": nbytes([self.births]),
            "sparse/age": nbytes([self.age]),
            "sparse/index": self.topology.index_bytes(),
            "sparse/mask": nbytes([self.active]),
        }

    def state_bytes(self, part: str = "all") -> int:
        """Bytes of gradients + optimizer state; part = all | sparse | dense."""
        return sum(b for role, b in self.state_bytes_by_role().items()
                   if part == "all" or role.startswith(part + "/"))

    # ---------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        dense = [p for g in self.param_groups if g["kind"] == "dense" for p in g["params"]]
        return {
            "format": 2,
            "global_step": self.global_step,
            "last_regrow_step": self.last_regrow_step,
            "layout": self.layout,
            "dense": [(self.state[p]["exp_avg"].clone(), self.state[p]["exp_avg_sq"].clone()) for p in dense],
            "exp_avg": self.exp_avg.clone(),
            "exp_avg_sq": self.exp_avg_sq.clone(),
            "cohort": None if self.cohort is None else self.cohort.clone(),
            "births": None if self.births is None else self.births.clone(),
            "age": None if self.age is None else self.age.clone(),
            "active": None if self.active is None else self.active.clone(),
            "lr": [g["lr"] for g in self.param_groups],
            "probe_slots": None if self._probe_slots is None else self._probe_slots.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != 2 or state["layout"] != self.layout or state["exp_avg"].shape != self.exp_avg.shape \
                or (state["cohort"] is None) != (self.cohort is None):
            raise ValueError("optimizer checkpoint does not match this model/sparsity/state layout")
        self.global_step = state["global_step"]
        self.last_regrow_step = state["last_regrow_step"]
        dense = [p for g in self.param_groups if g["kind"] == "dense" for p in g["params"]]
        for p, (m, v) in zip(dense, state["dense"]):
            self.state[p]["exp_avg"].copy_(m)
            self.state[p]["exp_avg_sq"].copy_(v)
        self.exp_avg.copy_(state["exp_avg"])
        self.exp_avg_sq.copy_(state["exp_avg_sq"])
        if self.cohort is not None:
            self.cohort = state["cohort"].to(self.grad.device).clone()  # its dtype may have widened
            self.births = state["births"].cpu().clone()
        if self.age is not None:
            self.age.copy_(state["age"])
        if self.active is not None:
            self.active.copy_(state["active"])
        for g, lr in zip(self.param_groups, state["lr"]):
            g["lr"] = lr
        slots = state.get("probe_slots")
        self._probe_slots = None if slots is None else slots.to(self.grad.device)


def validate_optimizer(lr, betas, eps, weight_decay, warmup_steps, warmup_kind, lr_scaling,
                       lr_scaling_power, lr_scaling_scope, state) -> None:
    def number(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if not number(lr) or lr <= 0:
        raise ConfigError("optim.lr", lr, "a positive number")
    if len(betas) != 2 or not all(number(b) and 0.0 <= b < 1.0 for b in betas):
        raise ConfigError("optim.betas", list(betas), "two numbers in [0, 1)")
    if not number(eps) or eps <= 0:
        raise ConfigError("optim.eps", eps, "a positive number")
    if not number(weight_decay) or weight_decay < 0:
        raise ConfigError("optim.weight_decay", weight_decay, "a non-negative number")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or not 0 <= warmup_steps < AGE_MAX:
        raise ConfigError("optim.regrow.warmup_steps", warmup_steps, f"an integer in [0, {AGE_MAX})")
    if warmup_kind not in WARMUP_KINDS:
        raise ConfigError("optim.regrow.warmup_kind", warmup_kind, "one of " + ", ".join(WARMUP_KINDS))
    if lr_scaling not in LR_SCALING:
        raise ConfigError("optim.lr_scaling.rule", lr_scaling, "one of " + ", ".join(LR_SCALING))
    if not number(lr_scaling_power) or lr_scaling_power < 0:
        raise ConfigError("optim.lr_scaling.power", lr_scaling_power, "a non-negative number")
    if lr_scaling_scope not in ("sparse", "all"):
        raise ConfigError("optim.lr_scaling.scope", lr_scaling_scope, "one of sparse, all")
    if state not in STATE_LAYOUTS:
        raise ConfigError("optim.state", state, "one of " + ", ".join(STATE_LAYOUTS))
