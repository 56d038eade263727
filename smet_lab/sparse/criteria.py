"""Prune and growth rules. A rule is one function of a context; registering it in PRUNE / GROWTH
(`smet_lab.extend.register_prune` / `register_growth`) makes it a config option (`sparsity.prune`,
`sparsity.growth`). The built-in rules below use exactly the contract a user's rule gets:

    prune(ctx: PruneContext) -> int64 slots (positions in ctx.active) of the ctx.n blocks to vacate
    grow(ctx: GrowthContext) -> int64 ids of ctx.n distinct blocks, inactive and not ctx.excluded

What a rule returns is checked (count, range, duplicates, active or excluded ids): a wrong rule
stops the run with one line naming it instead of corrupting the topology.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from smet_lab.config import RuleError
from smet_lab.sparse.ids import blocks_taken, flatnonzero


@dataclass(frozen=True)
class PruneContext:
    layer_name: str
    n_blocks: int
    block_size: int
    active: torch.Tensor  # int64 [k]: active block ids, ascending (slot order)
    weights: torch.Tensor  # [k, block_size]: the active blocks' weights, in slot order
    n: int  # how many blocks to vacate
    generator: torch.Generator  # seeded, checkpointed with the run


@dataclass(frozen=True)
class GrowthContext:
    layer_name: str
    n_blocks: int
    block_size: int
    active: torch.Tensor  # int64: active block ids after pruning, ascending
    excluded: torch.Tensor  # int64: the block ids this update pruned (never regrow them)
    n: int  # how many blocks to grow
    generator: torch.Generator
    dense_grad: Optional[torch.Tensor]  # [n_blocks, block_size] if the rule needs_dense_grad, else None


@dataclass(frozen=True)
class GrowthRule:
    fn: Callable[[GrowthContext], torch.Tensor]
    needs_dense_grad: bool = False


def prune_magnitude(ctx: PruneContext) -> torch.Tensor:
    """The n active blocks with the smallest L1 magnitude."""
    return torch.topk(ctx.weights.abs().sum(1), ctx.n, largest=False, sorted=False).indices


def grow_random(ctx: GrowthContext) -> torch.Tensor:
    """SET: n blocks uniformly at random among the inactive ones, never the blocks this update pruned.

    Rejection sampling: draws that hit an active or excluded block are dropped."""
    device = ctx.active.device
    free = blocks_taken(ctx.n_blocks, ctx.active, ctx.excluded).logical_not_()
    chosen = torch.empty(0, dtype=torch.long, device=device)
    while chosen.numel() < ctx.n:
        draw = torch.randint(ctx.n_blocks, (2 * (ctx.n - chosen.numel()) + 16,), generator=ctx.generator).to(device)
        # Keep the free blocks and deduplicate (ascending, through a block map: faster than unique's
        # sort), then shuffle so that the kept subset is uniform.
        draw = flatnonzero(blocks_taken(ctx.n_blocks, chosen, draw).logical_and_(free))
        draw = draw.index_select(0, torch.randperm(draw.numel(), generator=ctx.generator).to(device))
        chosen = draw[:ctx.n]
    return chosen


def grow_gradient(ctx: GrowthContext) -> torch.Tensor:
    """RigL: the n inactive blocks with the largest L1 norm of the dense gradient."""
    scores = ctx.dense_grad.abs().sum(1)
    scores[torch.cat([ctx.active, ctx.excluded.long()])] = -1.0  # never chosen (scores are >= 0 otherwise)
    return torch.topk(scores, ctx.n, sorted=False).indices


PRUNE: dict[str, Callable[[PruneContext], torch.Tensor]] = {"magnitude": prune_magnitude}
GROWTH: dict[str, GrowthRule] = {"random": GrowthRule(grow_random),
                                 "gradient": GrowthRule(grow_gradient, needs_dense_grad=True)}


def _ids(out, rule: str, what: str, n: int, limit: int) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.dim() != 1 or out.dtype.is_floating_point or out.dtype == torch.bool:
        raise RuleError(f"{rule} must return a 1-D integer tensor of {what}, got {type(out).__name__}"
                        f"{'' if not isinstance(out, torch.Tensor) else f' {out.dtype} {tuple(out.shape)}'}")
    out = out.long()
    if out.numel() != n:
        raise RuleError(f"{rule} returned {out.numel()} {what} for {n} requested")
    if n and (out.min() < 0 or out.max() >= limit):
        raise RuleError(f"{rule} returned {what} outside [0, {limit})")
    if int(blocks_taken(limit, out).sum()) != n:
        raise RuleError(f"{rule} returned duplicate {what}")
    return out


# The rules above meet the contract by construction (tests/test_sparse.py): their output skips the
# checks, which cost about a third of a topology update's small ops on a small model.
BUILT_IN = (prune_magnitude, grow_random, grow_gradient)


def _call(fn, ctx, rule: str):
    """A user's rule on ctx; an exception inside it is one line naming the rule and where it raised."""
    try:
        return fn(ctx)
    except Exception as exc:  # noqa: BLE001 - the user's code
        raise RuleError.raised(rule, exc, fn) from exc


def checked_prune(name: str, ctx: PruneContext) -> torch.Tensor:
    if PRUNE[name] in BUILT_IN:
        return PRUNE[name](ctx)
    rule = f"sparsity.prune={name} (layer {ctx.layer_name})"
    return _ids(_call(PRUNE[name], ctx, rule), rule, "slots", ctx.n, ctx.active.numel())


def checked_growth(name: str, ctx: GrowthContext) -> torch.Tensor:
    if GROWTH[name].fn in BUILT_IN:
        return GROWTH[name].fn(ctx)
    rule = f"sparsity.growth={name} (layer {ctx.layer_name})"
    out = _ids(_call(GROWTH[name].fn, ctx, rule), rule, "block ids", ctx.n, ctx.n_blocks)
    state = torch.zeros(ctx.n_blocks, dtype=torch.uint8, device=ctx.active.device)  # 1 active, 2 excluded
    state[ctx.active] = 1
    state[ctx.excluded.to(state.device, torch.long)] = 2
    hit = state[out.to(state.device)]
    if bool((hit == 1).any()):
        raise RuleError(f"{rule} returned block ids that are already active")
    if bool((hit == 2).any()):
        raise RuleError(f"{rule} returned block ids that this update pruned (ctx.excluded)")
    return out
