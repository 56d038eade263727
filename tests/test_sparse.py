"""Topology: selection, distributions, exact densities, prune/grow rules, schedules."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from smet_lab.config import ConfigError, ModelConfig
from smet_lab.model import LLaMA
from smet_lab.sparse import DynamicSparsity, SparseTopology, erk_densities, prune_rate_at
from smet_lab.sparse.criteria import GrowthContext, PruneContext, grow_gradient, grow_random, prune_magnitude
from smet_lab.sparse.ids import flatnonzero, isin_sorted


def prune_ctx(layer, n):
    return PruneContext(layer.name, layer.n_blocks, layer.block_size, layer.block_ids().long(), layer.gather(), n,
                        torch.Generator())


def grow_ctx(layer, n, excluded, grad=None, gen=None):
    """The context a growth rule gets: the active blocks minus the `excluded` (just pruned) ones."""
    active = layer.block_ids().long()
    active = active[~isin_sorted(active, excluded.long().sort().values)]
    return GrowthContext(layer.name, layer.n_blocks, layer.block_size, active, excluded.long(), n,
                         gen or torch.Generator(), None if grad is None else layer.blocks(grad))


def tiny_llama():
    torch.manual_seed(0)
    return LLaMA(ModelConfig(dim=32, n_layers=2, n_heads=2, ffn_dim=96, vocab_size=64, seq_len=16))


def test_sparse_layers_are_the_projections_and_dense_patterns_win():
    topo = SparseTopology.build(tiny_llama(), 0.3)
    names = sorted(layer.name.split(".", 2)[2] for layer in topo.layers)
    assert len(topo) == 14  # 7 projections x 2 layers
    assert set(names) == {"attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
                          "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight"}
    topo2 = SparseTopology.build(tiny_llama(), 0.3, dense_patterns=["norm", r"feed_forward"])
    assert len(topo2) == 2 * 4 + 1 + 1  # attention projections, plus embeddings and head now sparse


@pytest.mark.parametrize("block_size", [1, 8])
def test_uniform_init_has_exact_counts_and_zero_inactive_weights(block_size):
    topo = SparseTopology.build(tiny_llama(), 0.3, block_size=block_size)
    for layer in topo.layers:
        assert layer.n_active == round(0.3 * layer.param.numel() / block_size)
        assert layer.block_ids().dtype == torch.int32
        assert torch.unique(layer.block_ids()).numel() == layer.n_active
        w = layer.param.detach().view(-1, block_size)
        inactive = ~layer.active_mask()
        assert (w[inactive] == 0).all()
        assert (w[~inactive] != 0).all(dim=1).all()  # N(0, 0.02) draws are never exactly 0
    assert topo.density() == pytest.approx(0.3, abs=2e-3)


@pytest.mark.parametrize("block_size", [1, 8])
def test_padded_ids_decode_a_run_of_layers_as_padded_rows(block_size):
    """One decode of the flat position store gives the ids of a run of layers' nonzero blocks, each
    layer's shifted as if every earlier layer of the run took whole 256-block chunks."""
    topo = SparseTopology.build(tiny_llama(), 0.3, distribution="erk", block_size=block_size)
    own = [(layer.param.detach().view(-1, block_size) != 0).all(1).nonzero().view(-1) for layer in topo.layers]
    chunks = [math.ceil(layer.n_blocks / 256) for layer in topo.layers]
    assert block_size == 1 or any(layer.n_blocks % 256 for layer in topo.layers)  # padding is exercised
    for first, last in [(0, len(topo)), (3, 9), (5, 6)]:
        rows = topo.padded_ids(first, last)
        assert rows.dtype == torch.int32
        assert torch.equal(rows.long(), torch.cat([own[i] + 256 * sum(chunks[first:i]) for i in range(first, last)]))


def test_flatnonzero_lists_the_true_positions_in_order():
    gen = torch.Generator().manual_seed(1)
    for mask in [torch.rand(70_000, generator=gen) < 0.3, torch.zeros(5, dtype=torch.bool), torch.ones(3, dtype=torch.bool),
                 (torch.rand(600, generator=gen) < 0.5)[::3]]:
        got = flatnonzero(mask)
        assert got.dtype == torch.int64 and got.tolist() == [i for i, t in enumerate(mask.tolist()) if t]


def test_erk_densities_by_hand():
    # Two layers 10x10 (raw 20/100 = 0.2) and 10x40 (50/400 = 0.125); total 500 weights.
    d = erk_densities([(10, 10), (10, 40)], 0.5)
    eps = 250 / (0.2 * 100 + 0.125 * 400)
    assert d == pytest.approx([0.2 * eps, 0.125 * eps])
    assert d[0] * 100 + d[1] * 400 == pytest.approx(250)
    # A layer that would exceed density 1 is made dense and the rest rescaled.
    d = erk_densities([(2, 2), (100, 100)], 0.5)
    assert d[0] == 1.0
    assert d[1] == pytest.approx((0.5 * 10004 - 4) / 10000)


def test_erk_topology_total_density():
    topo = SparseTopology.build(tiny_llama(), 0.25, distribution="erk")
    assert topo.density() == pytest.approx(0.25, abs=2e-3)
    dens = topo.layer_densities()
    # ERK gives the square 32x32 attention maps a higher density than the 96x32 MLP maps.
    assert dens["layers.0.attention.wq.weight"] > dens["layers.0.feed_forward.w1.weight"]


class One(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.weight = nn.Parameter(w)


def test_magnitude_prune_picks_smallest_blocks():
    w = torch.tensor([[5.0, -4.0, 0.1, 3.0], [0.2, -6.0, 1.0, -0.05]])
    topo = SparseTopology.build(One(w.clone()), 1.0, dense_patterns=[])
    assert len(topo) == 0  # density 1: nothing sparse
    topo = SparseTopology.build(One(w.clone()), 0.99, dense_patterns=[])  # round(0.99*8) = 8 active
    layer = topo.layers[0]
    slots = prune_magnitude(prune_ctx(layer, 3))
    pruned = set(layer.block_ids()[slots].tolist())
    assert pruned == {2, 4, 7}  # |0.1|, |0.2|, |-0.05|


def test_block_magnitude_uses_l1_of_consecutive_weights():
    w = torch.tensor([[1.0, 1.0, -0.1, 0.1], [3.0, -3.0, 0.5, -0.6]])  # blocks of 2: L1 = 2, 0.2, 6, 1.1
    layer = SparseTopology.build(One(w), 0.99, block_size=2, dense_patterns=[]).layers[0]
    slots = prune_magnitude(prune_ctx(layer, 2))
    assert set(layer.block_ids()[slots].tolist()) == {1, 3}


def test_random_growth_never_regrows_just_pruned_and_is_uniform():
    gen = torch.Generator().manual_seed(0)
    layer = SparseTopology.build(One(torch.randn(20, 10)), 0.5, dense_patterns=[]).layers[0]
    active = set(layer.block_ids().tolist())
    excluded = layer.block_ids()[:10].long()
    counts = torch.zeros(200)
    trials = 3000
    for _ in range(trials):
        new = grow_random(grow_ctx(layer, 10, excluded, gen=gen))
        assert new.numel() == 10 and torch.unique(new).numel() == 10
        assert not (set(new.tolist()) & active)
        counts[new] += 1
    inactive = sorted(set(range(200)) - active)
    freq = counts[inactive] / trials
    assert freq.mean().item() == pytest.approx(10 / 100, rel=1e-6)  # 10 of the 100 inactive blocks each time
    # Each inactive block is drawn with probability 0.1; 3000 trials -> sd ~ 0.0055; allow 5 sd.
    assert (freq - 0.1).abs().max().item() < 0.0275


def test_gradient_growth_picks_largest_inactive_gradients():
    w = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 3.0]])
    layer = SparseTopology.build(One(w), 0.5, dense_patterns=[]).layers[0]
    layer.set_block_ids(torch.tensor([0, 2, 5], dtype=torch.int32))  # derived tensor: assign, not copy_
    grad = torch.tensor([[9.0, 0.5, 9.0, -4.0, 2.0, 9.0]])
    excluded = torch.tensor([0])  # pretend block 0 was just pruned
    new = grow_gradient(grow_ctx(layer, 2, excluded, grad))
    assert set(new.tolist()) == {3, 4}


def test_update_keeps_density_exact_and_zeroes_pruned_and_regrown():
    topo = SparseTopology.build(tiny_llama(), 0.25)
    counts = [layer.n_active for layer in topo.layers]
    upd = DynamicSparsity(topo, total_steps=1000, update_every=100, prune_rate=0.3, prune_schedule="constant")
    before = [layer.active_mask().clone() for layer in topo.layers]
    events = upd.update(100)
    for layer, c, b, e in zip(topo.layers, counts, before, events):
        after = layer.active_mask()
        assert layer.n_active == c and int(after.sum()) == c
        assert e.new_blocks.numel() == int(0.3 * c)
        assert not b[e.new_blocks].any()  # grown blocks were inactive
        assert not after[e.old_blocks].any()  # pruned blocks are gone
        w = layer.param.detach().view(-1)
        assert (w[~after] == 0).all() and (w[e.new_blocks] == 0).all()
        assert (layer.block_ids()[e.slots].long() == e.new_blocks).all()  # slots overwritten in place


@pytest.mark.parametrize("growth", ["random", "gradient"])
@pytest.mark.parametrize("block_size", [1, 16])
def test_built_in_rules_meet_the_contract_their_output_skips(monkeypatch, growth, block_size):
    """The built-in rules' output skips the contract checks (criteria.BUILT_IN) and the run's replace
    skips SparseLayer.replace's own: with the checks on and every layer replaced alone and checked, 12
    updates of every layer pass them, and topology and weights end exactly where the unchecked updates
    put them."""
    from smet_lab.sparse import criteria, topology

    def layer_by_layer(self, first, last, changes, active=None):
        return [self.layers[i].replace(old, new, old_slots=slots, check=True) for i, old, new, slots in changes]

    def run(checked: bool):
        if checked:
            monkeypatch.setattr(criteria, "BUILT_IN", ())
            monkeypatch.setattr(topology.SparseTopology, "replace", layer_by_layer)
        model = tiny_llama()
        topo = SparseTopology.build(model, 0.25, block_size=block_size)
        upd = DynamicSparsity(topo, total_steps=10_000, update_every=1, prune_rate=0.4, prune_schedule="constant",
                              growth=growth)
        x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(5))
        for step in range(1, 13):
            upd.begin_step(step)
            model(x, x).backward()  # the dense gradients RigL's growth reads
            model.zero_grad()
            upd.update(step)
        monkeypatch.undo()
        return [layer.block_ids() for layer in topo.layers] + [p.detach().clone() for p in model.parameters()]

    unchecked, checked = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(unchecked, checked))


@pytest.mark.parametrize("weights", ["dense", "compact"])
@pytest.mark.parametrize("block_size", [1, 16])
def test_a_run_of_layers_is_replaced_as_sets_say(weights, block_size):
    """SparseTopology.replace (one block map over a run of layers) against set arithmetic per layer: the
    new active ids are (active - old) | new, the slots are the new blocks' ranks among them, old_slots
    the old blocks' ranks before; the pruned and regrown weights are zero and every other keeps its value."""
    topo = SparseTopology.build(tiny_llama(), 0.3, distribution="erk", block_size=block_size, weights=weights)
    gen = torch.Generator().manual_seed(3)
    before = [(layer.block_ids().tolist(), layer.materialize() if layer.compact else layer.param.detach().clone())
              for layer in topo.layers]
    first, last, changes = 2, 12, []
    for i in range(first, last, 2):  # every other layer of the run changes, one swaps nothing
        layer, active = topo.layers[i], before[i][0]
        n = 0 if i == 6 else max(1, layer.n_active // 3)
        inactive = sorted(set(range(layer.n_blocks)) - set(active))
        old = torch.tensor(active)[torch.randperm(len(active), generator=gen)[:n]]
        new = torch.tensor(inactive)[torch.randperm(len(inactive), generator=gen)[:n]]
        changes.append((i, old, new, torch.tensor([active.index(b) for b in old.tolist()])))
    done = topo.replace(first, last, changes)
    for (i, old, new, old_slots), (slots, got_old_slots) in zip(changes, done):
        layer, (active, dense) = topo.layers[i], before[i]
        ids = sorted((set(active) - set(old.tolist())) | set(new.tolist()))
        assert layer.block_ids().tolist() == ids and layer.n_active == len(active)
        assert slots.tolist() == [ids.index(b) for b in new.tolist()] and torch.equal(got_old_slots.long(), old_slots)
        dense = dense.view(-1, block_size).clone()
        dense[torch.cat([old, new])] = 0.0
        after = layer.materialize() if layer.compact else layer.param.detach()
        assert torch.equal(after.view(-1, block_size), dense)
    for i in set(range(len(topo))) - {c[0] for c in changes}:  # untouched layers, in the run or not
        assert topo.layers[i].block_ids().tolist() == before[i][0]


def test_an_update_maps_runs_of_layers_within_the_budget(monkeypatch):
    """runs() covers the layers in order with runs of at most RUN_BLOCKS padded blocks (a larger layer
    alone), and an update in many small runs leaves topology and weights where one run leaves them."""
    from smet_lab.sparse import topology

    def update(run_blocks: int):
        monkeypatch.setattr(topology, "RUN_BLOCKS", run_blocks)
        model = tiny_llama()
        topo = SparseTopology.build(model, 0.25)
        runs = topo.runs()
        assert [i for a, b in runs for i in range(a, b)] == list(range(len(topo)))
        assert all(b - a == 1 or 256 * (topo.chunk_start[b] - topo.chunk_start[a]) <= run_blocks for a, b in runs)
        upd = DynamicSparsity(topo, total_steps=1000, update_every=100, prune_rate=0.3, prune_schedule="constant")
        events = upd.update(100)
        return runs, [layer.block_ids() for layer in topo.layers] + [p.detach().clone() for p in model.parameters()] \
            + [t for e in events for t in (e.slots, e.old_slots, e.old_blocks, e.new_blocks)]

    one_run, whole = update(1 << 20)
    many_runs, parts = update(3000)  # 32 x 32 layers take 4 chunks (1024 blocks), the 96 x 32 ones 12
    assert one_run == [(0, 14)] and len(many_runs) > 4 and any(b - a > 1 for a, b in many_runs)
    assert all(torch.equal(a, b) for a, b in zip(whole, parts))


def test_update_schedule_and_steps():
    topo = SparseTopology.build(tiny_llama(), 0.25)
    upd = DynamicSparsity(topo, total_steps=1000, update_every=100, prune_rate=0.2)
    assert [s for s in range(0, 1001) if upd.is_update_step(s)] == list(range(100, 1000, 100))
    static = DynamicSparsity(topo, total_steps=1000, update_every=0)
    assert not any(static.is_update_step(s) for s in range(1001))


def test_prune_rate_schedules():
    assert prune_rate_at("constant", 0.2, 500, 1000) == 0.2
    assert prune_rate_at("cosine", 0.2, 0, 1000) == pytest.approx(0.2)
    assert prune_rate_at("cosine", 0.2, 1000, 1000) == pytest.approx(0.005)
    assert prune_rate_at("cosine", 0.2, 500, 1000) == pytest.approx(0.005 + 0.195 * 0.5)
    assert prune_rate_at("linear", 0.2, 500, 1000) == pytest.approx(0.2 * (1 - 0.975 * 0.5))
    assert prune_rate_at("wsd", 0.2, 900, 1000) == pytest.approx(0.2)
    assert prune_rate_at("wsd", 0.2, 950, 1000) == pytest.approx(0.2 * 0.55)
    assert prune_rate_at("wsd", 0.2, 1000, 1000) == pytest.approx(0.02)
    assert math.isclose(prune_rate_at("cosine", 0.2, 250, 1000), 0.005 + 0.195 * 0.5 * (1 + math.cos(math.pi / 4)))


@pytest.mark.parametrize("kwargs,key", [
    ({"density": 0.0}, "sparsity.density"), ({"density": 1.5}, "sparsity.density"),
    ({"density": 0.5, "distribution": "er"}, "sparsity.distribution"),
    ({"density": 0.5, "block_size": 0}, "sparsity.block_size"),
    ({"density": 0.5, "block_size": 7}, "sparsity.block_size"),
])
def test_bad_topology_values(kwargs, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        SparseTopology.build(tiny_llama(), **kwargs)


@pytest.mark.parametrize("kwargs,key", [
    ({"update_every": -1}, "sparsity.update_every"), ({"prune_rate": 1.0}, "sparsity.prune_rate"),
    ({"prune_schedule": "step"}, "sparsity.prune_schedule"), ({"growth": "momentum"}, "sparsity.growth"),
    ({"prune": "random"}, "sparsity.prune"),
])
def test_bad_dynamic_values(kwargs, key):
    topo = SparseTopology.build(tiny_llama(), 0.5)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        DynamicSparsity(topo, total_steps=100, **kwargs)
