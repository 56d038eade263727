"""SMETAdam against hand-computed numbers and independent reference implementations."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn as nn

from smet_lab.config import ConfigError, LRScalingConfig, ModelConfig, OptimConfig, RegrowConfig
from smet_lab.model import LLaMA
from smet_lab.optim import SMETAdam
from smet_lab.optim.compact import bias_correction_saturation
from smet_lab.optim.masked import MaskedState
from smet_lab.sparse import DynamicSparsity, RegrowEvent, SparseTopology
from smet_lab.train.memory import analytic_state_bytes, float32_floor, optimizer_layout_bytes
from smet_lab.train.probe import OUTLIER_RATIO, OUTLIER_STEPS, RegrownSteps

B1, B2 = 0.9, 0.999


class LinearLoss(nn.Module):
    """loss = sum(W * G): the gradient of every entry is the fixed G (a steady gradient)."""

    def __init__(self, out=16, inp=16, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(out, inp, generator=gen) * 0.02)
        self.register_buffer("G", torch.randn(out, inp, generator=gen))

    def loss(self):
        return (self.weight * self.G).sum()


def make(density=0.25, block_size=1, seed=0, **opt_kwargs):
    model = LinearLoss(seed=seed)
    topo = SparseTopology.build(model, density, block_size=block_size, dense_patterns=[], seed=seed)
    opt = SMETAdam(model, topo, **opt_kwargs)
    return model, topo, opt


def run_steps(model, opt, n):
    for _ in range(n):
        model.loss().backward()
        opt.step()
        opt.zero_grad()


def naive_first_step(s: int) -> float:
    """|first update| / lr of an entry with zeroed moments at global step s (steady gradient)."""
    return ((1 - B1) / (1 - B1 ** s)) / math.sqrt((1 - B2) / (1 - B2 ** s))


def regrow_some(topo, opt, n=8, seed=1, with_source=True, probe=False):
    """Replace the n lowest active blocks by n random inactive ones. Returns the new block ids, and with
    probe=True also the trainer's probe of their first steps (smet_lab.train.probe.RegrownSteps)."""
    layer = topo.layers[0]
    old = layer.block_ids()[:n].long()
    inactive = (~layer.active_mask()).nonzero().squeeze(1)
    new = inactive[torch.randperm(inactive.numel(), generator=torch.Generator().manual_seed(seed))[:n]]
    with torch.no_grad():
        layer.blocks()[old] = 0.0
    slots, old_slots = layer.replace(old, new)
    assert (layer.block_ids()[slots].long() == new).all()
    events = [RegrowEvent(0, slots, old, new, old_slots if with_source else None)]
    rows = opt.regrow(events)
    return (new, RegrownSteps.start(opt.global_step, topo, events, rows)) if probe else new


def probed_steps(model, opt, probe, n, lr):
    """n steps, each followed by the probe's observation; returns the metrics it reported."""
    found = {}
    for _ in range(n):
        run_steps(model, opt, 1)
        found.update(probe.observe(opt.topology, opt, lr))
    return found


@pytest.mark.parametrize("s", [1000, 5000])
def test_naive_dst_cold_start_matches_formula(s):
    assert naive_first_step(1000) == pytest.approx(2.514, abs=1e-3)  # the "2.5x at s = 1000"
    model, topo, opt = make(lr=1e-3, reset_step=False, warmup_steps=0, lr_scaling="none")
    run_steps(model, opt, s - 1)  # the update happens after global step s-1; first regrown step is s
    new, probe = regrow_some(topo, opt, probe=True)
    before = topo.layers[0].blocks()[new].clone()
    found = probed_steps(model, opt, probe, 1, 1e-3)
    delta = (topo.layers[0].blocks()[new] - before).abs() / 1e-3
    expected = naive_first_step(s)
    assert torch.allclose(delta, torch.full_like(delta, expected), rtol=1e-4)
    assert found["stability/regrow_update_ratio"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("W", [1, 10, 100])
def test_smet_first_step_after_regrowth_is_lr_over_W(W):
    model, topo, opt = make(lr=1e-3, reset_step=True, warmup_steps=W, lr_scaling="none")
    run_steps(model, opt, 1499)
    new = regrow_some(topo, opt)
    deltas = []
    for k in range(1, 4):
        before = topo.layers[0].blocks()[new].clone()
        run_steps(model, opt, 1)
        deltas.append(((topo.layers[0].blocks()[new] - before).abs() / 1e-3).mean().item())
    # With t_i reset to 1, Adam's bias-corrected step of a steady gradient is exactly lr (1 x lr),
    # scaled by the warm-up factor min(1, k/W) on the k-th step after regrowth.
    for k, d in enumerate(deltas, start=1):
        assert d == pytest.approx(min(1.0, k / W), rel=1e-4)


def test_entries_active_from_the_start_are_not_warmed():
    model, topo, opt = make(lr=1e-3, reset_step=True, warmup_steps=50, lr_scaling="none")
    run_steps(model, opt, 20)
    new = regrow_some(topo, opt)
    layer = topo.layers[0]
    old_entries = layer.block_ids()[~torch.isin(layer.block_ids().long(), new)].long()  # never regrown
    before = layer.blocks()[old_entries].clone()
    run_steps(model, opt, 1)
    # Steady gradient, so an entry that has never been regrown moves by exactly lr (bias-corrected).
    delta = (layer.blocks()[old_entries] - before).abs() / 1e-3
    assert torch.allclose(delta, torch.ones_like(delta), rtol=1e-5)


def reference_smet(weight, G, masks, regrow_at, steps, lr, W, reset, scale, damping=False, betas=(B1, B2),
                   released=False, weight_decay=0.0):
    """Independent dense, per-entry re-implementation of docs/design.md section 2. released=True: the
    released code's counter (set to 1 at regrowth, +1 before use) damps m of every entry while < W.
    weight_decay: decoupled, w -= lr * scale * warm * weight_decay * w along with the Adam step (the
    linear_lr warm-up scales the decay too; the damping kinds damp m only)."""
    B1, B2 = betas
    w = weight.clone()
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    age = torch.zeros_like(w)
    regrown = torch.zeros_like(w, dtype=torch.bool)
    mask = masks[0].clone()
    for step in range(1, steps + 1):
        g = G * mask
        m = B1 * m + (1 - B1) * g
        v = B2 * v + (1 - B2) * g * g
        age = age + 1
        counter = age + regrown.float() if released else age
        t = counter if reset else torch.full_like(w, float(step))
        warm = torch.where(regrown, torch.clamp(age / W, max=1.0), torch.ones_like(w)) if W else torch.ones_like(w)
        if released and W:
            warm = torch.clamp(counter / W, max=1.0)
        if damping or released:
            m = m * warm
            warm = torch.ones_like(w)
        u = (m / (1 - B1 ** t)) / (torch.sqrt(v / (1 - B2 ** t)) + 1e-8) + weight_decay * w
        w = w - lr * scale * warm * u * mask
        if step in regrow_at:
            new_mask = masks[regrow_at.index(step) + 1]
            grown = new_mask & ~mask
            w = torch.where(new_mask, w, torch.zeros_like(w))
            w[grown] = 0.0
            m[grown] = 0.0
            v[grown] = 0.0
            age[grown] = 0.0
            regrown |= grown
            mask = new_mask
    return w


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("method", ["smet", "naive", "no_reset", "damping", "released"])
@pytest.mark.parametrize("layout", ["compact", "dense_masked"])
def test_matches_dense_reference_through_topology_updates(method, layout, weight_decay):
    reset = method in ("smet", "damping", "released")
    W = 0 if method == "naive" else 5
    kind = {"damping": "moment_damping", "released": "released"}.get(method, "linear_lr")
    kw = dict(lr=1e-2, reset_step=reset, warmup_steps=W, lr_scaling="inverse" if method != "naive" else "none",
              warmup_kind=kind, state=layout, weight_decay=weight_decay)
    model, topo, opt = make(density=0.25, **kw)
    weight0 = model.weight.detach().clone()
    masks, regrow_at = run_with_updates(model, topo, opt, steps=30, update_every=7)
    scale = 4.0 if method != "naive" else 1.0  # inverse scaling at density 0.25
    ref = partial(reference_smet, weight0 * masks[0], model.G, masks, regrow_at, 30, 1e-2, W, reset, scale,
                  damping=method == "damping", released=method == "released")
    assert len(regrow_at) == 4
    assert torch.allclose(model.weight.detach(), ref(weight_decay=weight_decay), atol=1e-6, rtol=1e-5)
    if weight_decay:  # the decay is large enough that ignoring it would fail the comparison
        assert not torch.allclose(model.weight.detach(), ref(), atol=1e-4, rtol=1e-3)
    # Invariant: inactive weights stay exactly zero.
    assert (model.weight.detach()[~masks[-1]] == 0).all()


def run_with_updates(model, topo, opt, steps, update_every, prune_rate=0.3, masks_now=None):
    """Train a LinearLoss with DST updates; returns the mask sequence (masks_now(), default the one
    layer's weight-shaped mask) and the update steps (for the reference)."""
    updater = DynamicSparsity(topo, total_steps=steps + 1, update_every=update_every, prune_rate=prune_rate,
                              prune_schedule="constant")
    masks_now = masks_now or (lambda: topo.layers[0].active_mask().view(model.weight.shape).clone())
    masks, regrow_at = [masks_now()], []
    for step in range(1, steps + 1):
        model.loss().backward()
        opt.step()
        opt.zero_grad()
        if updater.is_update_step(step):
            opt.regrow(updater.update(step))
            regrow_at.append(step)
            masks.append(masks_now())
    return masks, regrow_at


def released_first_update(W: float) -> float:
    """|first update| / lr of a regrown entry under warmup_kind="released" (steady gradient g, m = v = 0
    at regrowth). Its counter is 1 at regrowth and +1 before use, so t = 2 and the damping is
    d = min(1, 2/W): m = d(1-b1)g, v = (1-b2)g^2, and
        |u| = (d(1-b1)/(1-b1^2)) / sqrt((1-b2)/(1-b2^2)) = d sqrt(1+b2) / (1+b1).
    (moment_damping has t = 1, d = min(1, 1/W): |u| = d.)"""
    return min(1.0, 2 / W) * math.sqrt(1 + B2) / (1 + B1)


@pytest.mark.parametrize("layout", ["compact", "dense_masked"])
@pytest.mark.parametrize("kind,W,expected", [("released", 1, 0.7441), ("released", 10, 0.1488),
                                             ("moment_damping", 1, 1.0), ("moment_damping", 10, 0.1)])
def test_first_regrown_update_released_vs_moment_damping(layout, kind, W, expected):
    """The released code's off-by-one: its first update of a regrown weight uses t = 2, not 1, so it
    is sqrt(1.999)/1.9 = 0.744 x lr undamped (W = 1) and 0.2 x 0.744 = 0.149 x lr at W = 10, where
    moment_damping (t = 1) gives 1 x lr and 0.1 x lr."""
    if kind == "released":
        assert released_first_update(W) == pytest.approx(expected, abs=1e-4)
    model, topo, opt = make(lr=1e-3, reset_step=True, warmup_steps=W, warmup_kind=kind, lr_scaling="none",
                            state=layout)
    run_steps(model, opt, 30)  # past W: the entries active from the start are no longer damped
    new, probe = regrow_some(topo, opt, probe=True)
    before = topo.layers[0].blocks()[new].clone()
    found = probed_steps(model, opt, probe, 1, 1e-3)
    delta = (topo.layers[0].blocks()[new] - before).abs() / 1e-3
    assert torch.allclose(delta, torch.full_like(delta, expected), rtol=2e-4)
    assert found["stability/regrow_update_ratio"] == pytest.approx(expected, rel=2e-4)


class WithDense(LinearLoss):
    """LinearLoss plus a 1-D (hence dense) parameter with its own steady gradient Gb."""

    def __init__(self, seed=0):
        super().__init__(seed=seed)
        gen = torch.Generator().manual_seed(seed + 1)
        self.bias = nn.Parameter(torch.randn(16, generator=gen) * 0.02)
        self.register_buffer("Gb", torch.randn(16, generator=gen))

    def loss(self):
        return super().loss() + (self.bias * self.Gb).sum()


@pytest.mark.parametrize("layout", ["compact", "dense_masked"])
@pytest.mark.parametrize("kind", ["released", "moment_damping"])
def test_released_damps_dense_and_initial_weights_in_the_first_W_steps(layout, kind):
    """With released, every tensor's counter is the global step until a regrowth, so during the first
    W steps the dense parameters and the initially active sparse weights are damped too. Steady
    gradient g, W = 10, damping d_s = s/10 applied in place to m after its update at step s:
        step 1: m = d_1(1-b1)g,                    bias-corrected |u| = d_1 = 0.1
        step 2: m = d_2(b1 d_1(1-b1) + (1-b1))g,  |u| = d_2 (0.009 + 0.1) / (1 - b1^2) = 0.114737
    (v_hat = g^2 exactly for a steady gradient). moment_damping leaves them plain Adam: |u| = 1, 1."""
    model = WithDense()
    topo = SparseTopology.build(model, 0.25, dense_patterns=[])
    assert [layer.name for layer in topo.layers] == ["weight"]
    opt = SMETAdam(model, topo, lr=1e-3, reset_step=True, warmup_steps=10, warmup_kind=kind,
                   lr_scaling="none", state=layout)
    active = topo.layers[0].block_ids().long()
    assert 0.2 * (B1 * 0.1 * (1 - B1) + (1 - B1)) / (1 - B1 ** 2) == pytest.approx(0.114737, abs=1e-6)
    expected = {"released": [0.1, 0.114737], "moment_damping": [1.0, 1.0]}[kind]
    for step in range(2):
        bias, weight = model.bias.detach().clone(), topo.layers[0].blocks()[active].clone()
        run_steps(model, opt, 1)
        dense_delta = (model.bias.detach() - bias).abs() / 1e-3
        sparse_delta = (topo.layers[0].blocks()[active] - weight).abs() / 1e-3
        for delta in (dense_delta, sparse_delta):
            assert torch.allclose(delta, torch.full_like(delta, expected[step]), rtol=1e-4)


@pytest.mark.parametrize("layout", ["compact", "dense_masked"])
@pytest.mark.parametrize("used", [False, True])
def test_released_resume_is_bitwise(tmp_path, layout, used):
    """Checkpoint inside the warm-up (global step < W, just after a regrowth), reload everything into
    fresh objects (or objects that trained two steps, before any regrowth: nothing they computed may linger),
    continue: weights and state equal an uninterrupted run bit for bit."""
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64, vocab_size=50, seq_len=16)
    x = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(0))

    def build():
        torch.manual_seed(0)
        model = LLaMA(cfg)
        topo = SparseTopology.build(model, 0.25)
        opt = SMETAdam(model, topo, lr=1e-2, warmup_steps=6, warmup_kind="released", state=layout)
        updater = DynamicSparsity(topo, total_steps=20, update_every=3, prune_rate=0.3, prune_schedule="constant")
        return model, topo, opt, updater

    def train(objs, steps):
        model, _, opt, updater = objs
        for step in steps:
            model(x, x).backward()
            opt.step()
            opt.zero_grad()
            if updater.is_update_step(step):
                opt.regrow(updater.update(step))

    full = build()
    train(full, range(1, 11))
    first = build()
    train(first, range(1, 5))
    torch.save({k: o.state_dict() for k, o in zip(("model", "topology", "optimizer", "updater"), first)},
               tmp_path / "state.pt")
    resumed = build()
    if used:
        train(resumed, range(1, 3))
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    for k, o in zip(("model", "topology", "optimizer", "updater"), resumed):
        o.load_state_dict(state[k])
    train(resumed, range(5, 11))
    assert all(torch.equal(a, b) for a, b in zip(full[0].parameters(), resumed[0].parameters()))
    for a, b in ((full[2].exp_avg, resumed[2].exp_avg), (full[2].exp_avg_sq, resumed[2].exp_avg_sq)):
        assert torch.equal(a, b)
    dense = lambda opt: [s[k] for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq")]
    assert all(torch.equal(a, b) for a, b in zip(dense(full[2]), dense(resumed[2])))


def test_cohort_merge_is_exact_and_keeps_ids_few(one_thread):
    """Cohorts older than merge_age are merged into id 0; the updates are bit-for-bit those of a run
    that never merges, and both follow the dense reference."""
    betas = (0.5, 0.6)  # float32 bias corrections reach exactly 1 after a few dozen steps
    kw = dict(lr=1e-2, betas=betas, reset_step=True, warmup_steps=3, lr_scaling="none")
    runs = []
    for merge in (True, False):
        model, topo, opt = make(density=0.25, **kw)
        weight0 = model.weight.detach().clone()
        if not merge:
            opt.sparse.merge_age = 2 ** 62
        masks, regrow_at = run_with_updates(model, topo, opt, steps=120, update_every=2, prune_rate=0.1)
        runs.append((model.weight.detach().clone(), opt))
    (merged_w, merged), (plain_w, plain) = runs
    assert merged.sparse.merge_age == max(3, bias_correction_saturation(0.5), bias_correction_saturation(0.6)) < 60
    assert torch.equal(merged_w, plain_w)
    live_age = lambda o: [o.global_step - b for c, b in enumerate(o.births.tolist()) if c > 0 and b >= 0]
    assert max(live_age(plain)) >= merged.sparse.merge_age  # some cohorts did live long enough to be merged...
    assert max(live_age(merged), default=0) < merged.sparse.merge_age  # ...and were, in the merging run
    ref = reference_smet(weight0 * masks[0], model.G, masks, regrow_at, 120, 1e-2, 3, True, 1.0, betas=betas)
    assert torch.allclose(merged_w, ref, atol=1e-6, rtol=1e-5)


@pytest.fixture
def one_thread():
    """Hundreds of tiny steps: one thread avoids thread-pool wake-ups (seconds on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_cohort_ids_widen_when_more_than_255_are_alive(one_thread):
    torch.manual_seed(0)
    model = LinearLoss(out=64, inp=64)
    topo = SparseTopology.build(model, 0.25, dense_patterns=[])  # 1024 active weights
    opt = SMETAdam(model, topo, lr=1e-2, reset_step=True, warmup_steps=1000, lr_scaling="none")
    layer = topo.layers[0]
    weight0 = model.weight.detach().clone()
    mask = layer.active_mask()
    gen = torch.Generator().manual_seed(3)
    olds = layer.block_ids().long()[torch.randperm(1024, generator=gen)[:300]]  # active since the start
    news = (~mask).nonzero().squeeze(1)[torch.randperm(3072, generator=gen)[:300]]  # never active before
    masks, regrow_at = [mask.view(64, 64).clone()], []
    for step in range(1, 301):  # one block regrown after every step: 300 cohorts, all alive
        model.loss().backward()
        opt.step()
        opt.zero_grad()
        old, new = olds[step - 1 : step], news[step - 1 : step]
        layer.zero_blocks(old)
        slots, old_slots = layer.replace(old, new)
        opt.regrow([RegrowEvent(0, slots, old, new, old_slots)])
        regrow_at.append(step)
        mask[old], mask[new] = False, True
        masks.append(mask.view(64, 64).clone())
    assert opt.sparse.cohort.dtype == torch.int16 and opt.births.numel() == 301
    assert opt.state_bytes("sparse") == 1024 * 12 + (1024 + 16 * 2) + 1024 * 2 + 301 * 8
    model.loss().backward()  # a last step, taken by the reference too
    opt.step()
    ref = reference_smet(weight0, model.G, masks + [masks[-1]], regrow_at, 301, 1e-2, 1000, True, 1.0)
    assert torch.allclose(model.weight.detach(), ref, atol=1e-6, rtol=1e-5)


def test_regrow_event_without_old_slots_gives_the_same_state():
    results = []
    for with_source in (True, False):
        model, topo, opt = make(lr=1e-2, reset_step=True, warmup_steps=4)
        run_steps(model, opt, 5)
        regrow_some(topo, opt, with_source=with_source)
        run_steps(model, opt, 3)
        results.append((model.weight.detach().clone(), opt.exp_avg.clone(), opt.exp_avg_sq.clone(),
                        opt.sparse.cohort.clone()))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("layout,kind", [("compact", "linear_lr"), ("compact", "moment_damping"),
                                         ("dense_masked", "linear_lr"), ("compact", "released")])
def test_chunked_update_equals_one_chunk(monkeypatch, layout, kind):
    """The update is formed chunk by chunk (bounded temporaries): one chunk per layer gives exactly the
    same weights and state as one chunk for all layers (weight decay and warm-up on)."""
    import smet_lab.optim.sparse_state as sparse_state

    cfg = ModelConfig(dim=32, n_layers=2, n_heads=2, ffn_dim=64, vocab_size=50, seq_len=16)
    x = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(0))
    outcomes = []
    for chunk in (1 << 40, 1):
        monkeypatch.setattr(sparse_state, "STEP_CHUNK", chunk)
        torch.manual_seed(0)
        model = LLaMA(cfg)
        topo = SparseTopology.build(model, 0.25)
        opt = SMETAdam(model, topo, lr=1e-2, weight_decay=0.1, warmup_steps=5, warmup_kind=kind, state=layout)
        assert len(opt.sparse.chunks) == (1 if chunk > 1 else len(topo.layers))
        updater = DynamicSparsity(topo, total_steps=20, update_every=4, prune_rate=0.3, prune_schedule="constant")
        for step in range(1, 11):
            model(x, x).backward()
            opt.step()
            opt.zero_grad()
            if updater.is_update_step(step):
                opt.regrow(updater.update(step))
        outcomes.append(([p.detach().clone() for p in model.parameters()], opt.exp_avg.clone()))
    (w1, m1), (w2, m2) = outcomes
    assert all(torch.equal(a, b) for a, b in zip(w1, w2)) and torch.equal(m1, m2)


def test_dense_method_equals_torch_adam():
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64, vocab_size=50, seq_len=16)
    torch.manual_seed(0)
    a = LLaMA(cfg)
    b = LLaMA(cfg)
    b.load_state_dict(a.state_dict())
    topo = SparseTopology.build(a, 1.0)
    ours = SMETAdam(a, topo, lr=3e-3, lr_scaling="none")
    ref = torch.optim.Adam(b.parameters(), lr=3e-3)
    x = torch.randint(0, 50, (4, 16))
    for _ in range(5):
        for model, opt in ((a, ours), (b, ref)):
            model(x, x).backward()
            opt.step()
            opt.zero_grad()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6), n


@pytest.mark.parametrize("kind", ["linear_lr", "released"])
def test_cohort_tables_are_the_float32_torch_formula_bit_for_bit(kind):
    """The per-cohort tables of a window of steps (one pow over a padded [K, C] view, one division and
    one where for the warm-up factor) equal, bit for bit, the float32 torch ops over each step's C-vector of local
    steps, at every table size (the vectorised and scalar lanes of pow differ in the last bit)."""
    _, _, opt = make(reset_step=True, warmup_steps=7, warmup_kind=kind, betas=(0.9, 0.999))
    s, gen = opt.sparse, torch.Generator().manual_seed(0)
    for C in [*range(1, 40), 63, 255]:
        for W in (7, 100, 5000):
            first = int(torch.randint(W, 3 * W + 200_000, (), generator=gen))
            births = torch.randint(-1, first, (C,), generator=gen)
            births[0] = 0
            s.births, s.warmup_steps = births, W
            start, rows1, rows2, warm, ones = s._cohort_tables(first)
            assert start == first and len(rows1) == len(rows2) == len(warm) == len(ones) >= 16
            for k in (0, 1, len(ones) // 2, len(ones) - 1):
                t = (first + k - births).float() + ((torch.arange(C) > 0) if kind == "released" else 0)
                growing = (t < W) & ((births > 0) | (kind == "released"))
                expected = torch.stack([1 - 0.9 ** t, 1 - 0.999 ** t, torch.where(growing, t / W, torch.ones_like(t))])
                assert torch.equal(torch.stack([rows1[k], rows2[k], warm[k]]), expected), (C, W, k)
                assert ones[k] == [bool((row == 1).all()) for row in expected]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("direct", [True, False])
def test_dense_group_is_bitwise_torch_adamw(monkeypatch, weight_decay, direct):
    """The dense group runs torch's fused AdamW kernel on CPU (directly, or through the functional adamw
    where the op is missing): with the lr changing every step, its parameters equal those of a plain
    torch.optim.AdamW(fused=True) on copies fed the same gradients, bit for bit."""
    if not direct:
        monkeypatch.setattr("smet_lab.optim.dense.FUSED_ADAMW", None)
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64, vocab_size=50, seq_len=16)
    torch.manual_seed(0)
    model = LLaMA(cfg)
    topo = SparseTopology.build(model, 0.25)
    hp = dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-7, weight_decay=weight_decay)
    opt = SMETAdam(model, topo, **hp)
    assert opt.dense.fused
    dense = [p for g in opt.param_groups if g["kind"] == "dense" for p in g["params"]]
    assert len(dense) == 5  # embeddings, head, final norm, two block norms
    copies = [p.detach().clone() for p in dense]
    start = [c.clone() for c in copies]
    ref = torch.optim.AdamW(copies, **hp, fused=True)
    gen = torch.Generator().manual_seed(1)
    for step in range(1, 13):
        factor = 0.5 + 0.1 * step
        opt.set_lr_factor(factor)
        ref.param_groups[0]["lr"] = 3e-3 * factor
        x = torch.randint(0, 50, (4, 16), generator=gen)
        model(x, x).backward()
        for c, p in zip(copies, dense):
            c.grad = p.grad.clone()
        opt.step()
        ref.step()
        opt.zero_grad()
    assert all(torch.equal(p, c) for p, c in zip(dense, copies))
    assert not any(torch.equal(c, c0) for c, c0 in zip(copies, start))


def test_dense_group_counts_the_global_step_when_a_parameter_skips_one():
    """Every dense parameter is updated with the global step's bias corrections: one that had no
    gradient at step 3 holds step count 2 after it (untouched) and 4 after step 4, like the others."""
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64, vocab_size=50, seq_len=16)
    torch.manual_seed(0)
    model = LLaMA(cfg)
    opt = SMETAdam(model, SparseTopology.build(model, 0.25))
    dense = [p for g in opt.param_groups if g["kind"] == "dense" for p in g["params"]]
    skipped = dense[0]
    for step in range(1, 7):
        x = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(step))
        model(x, x).backward()
        if step == 3:
            skipped.grad = None
        opt.step()
        opt.zero_grad()
        counts = [int(opt.state[p]["step"]) for p in dense]
        assert counts == [2 if step == 3 else step] + [step] * (len(dense) - 1)


def test_released_dense_group_follows_the_reference_with_weight_decay():
    """warmup_kind="released" damps the dense moments for the first W global steps (its own foreach
    path), then hands over to AdamW at the right step count; decay as for sparse weights."""
    model = WithDense()
    topo = SparseTopology.build(model, 0.25, dense_patterns=[])
    opt = SMETAdam(model, topo, lr=1e-2, reset_step=True, warmup_steps=4, warmup_kind="released",
                   lr_scaling="none", weight_decay=0.2)
    bias0 = model.bias.detach().double()
    run_steps(model, opt, 10)
    # float64 reference: AdamW forms its bias corrections in double, the reference's float32 1 - b2^t
    # would differ from them by ~1e-5 relative.
    ones, Gb = torch.ones(16, dtype=torch.bool), model.Gb.double()
    ref = reference_smet(bias0, Gb, [ones], [], 10, 1e-2, 4, True, 1.0, released=True, weight_decay=0.2)
    assert torch.allclose(model.bias.detach().double(), ref, atol=1e-7, rtol=1e-6)
    undamped = reference_smet(bias0, Gb, [ones], [], 10, 1e-2, 0, True, 1.0, weight_decay=0.2)
    assert not torch.allclose(ref, undamped, atol=1e-5, rtol=1e-4)


def test_from_config_takes_every_optimizer_option():
    cfg = OptimConfig(lr=2e-3, betas=[0.8, 0.95], eps=1e-6, weight_decay=0.05, state="dense_masked",
                      regrow=RegrowConfig(reset_step=False, warmup_steps=7, warmup_kind="moment_damping"),
                      lr_scaling=LRScalingConfig(rule="power", power=0.5, scope="all"))
    model = LLaMA(ModelConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64, vocab_size=50, seq_len=16))
    topo = SparseTopology.build(model, 0.25)
    opt = SMETAdam.from_config(model, topo, cfg)
    lrs = {g["kind"]: g["lr"] for g in opt.param_groups}
    assert lrs == pytest.approx({"dense": 4e-3, "sparse": 4e-3})  # 2e-3 * 0.25^-0.5, scope all
    assert (opt.betas, opt.eps, opt.weight_decay) == ((0.8, 0.95), 1e-6, 0.05)
    assert (opt.reset_step, opt.warmup_steps, opt.warmup_kind) == (False, 7, "moment_damping")
    assert opt.layout == "dense_masked"
    assert isinstance(opt.sparse, MaskedState) and opt.sparse.age is not None  # the warm-up needs an age
    assert opt.dense.betas == (0.8, 0.95) and opt.dense.weight_decay == 0.05
    opt.remove_hooks()
    with pytest.raises(ConfigError, match=r"optim\.regrow\.warmup_kind"):
        SMETAdam.from_config(model, topo, OptimConfig(regrow=RegrowConfig(warmup_kind="cosine")))


def test_grad_clipping_covers_sparse_gradients():
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64, vocab_size=50, seq_len=16)
    torch.manual_seed(0)
    model = LLaMA(cfg)
    topo = SparseTopology.build(model, 0.3)
    opt = SMETAdam(model, topo, lr=1e-3)
    x = torch.randint(0, 50, (4, 16))
    # Independent reference: plain autograd on a copy, sparse-layer grads masked to active entries.
    ref = LLaMA(cfg)
    ref.load_state_dict(model.state_dict())
    ref(x, x).backward()
    masks = {layer.name: layer.active_mask().view(-1, 1).expand(-1, 1).reshape(layer.param.shape) for layer in topo.layers}
    sq = sum(((p.grad * masks[n]) if n in masks else p.grad).pow(2).sum() for n, p in ref.named_parameters())
    model(x, x).backward()
    total = opt.clip_grad_norm_(0.5)
    assert total.item() == pytest.approx(math.sqrt(sq.item()), rel=1e-5)
    # After clipping, the norm over dense and sparse gradients together is the cap.
    dense = [p.grad for p in model.parameters() if p.grad is not None]
    clipped = math.sqrt(sum(g.pow(2).sum().item() for g in dense) + opt.grad.pow(2).sum().item())
    assert clipped == pytest.approx(0.5, rel=1e-4)
    assert all(layer.param.grad is None for layer in topo.layers)  # dense sparse-layer grads are dropped


@pytest.mark.parametrize("block_size", [1, 16])
def test_state_bytes_hand_computed(block_size):
    model, topo, opt = make(density=0.25, block_size=block_size, lr=1e-3, reset_step=True, warmup_steps=10)
    # 16x16 = 256 weights in 256/B blocks; density 0.25 -> 64 active weights in k = 64/B blocks.
    k = 64 // block_size
    grads_and_moments = 64 * 4 * 3  # grad, m, v: float32 per active weight = 768
    positions = k * 1 + 1 * 2       # uint8 offset per active block + int16 count of the one 256-block chunk
    local_step = k * 1 + 1 * 8      # uint8 cohort id per active block + int64 birth of cohort 0
    expected = grads_and_moments + positions + local_step  # B=1: 768+66+72 = 906; B=16: 768+6+12 = 786
    roles = opt.state_bytes_by_role()
    assert roles["sparse/index"] == positions and roles["sparse/cohort"] == k and roles["sparse/cohort_births"] == 8
    assert opt.state_bytes("sparse") == expected
    assert opt.state_bytes() == expected  # no dense parameters in this model
    assert optimizer_layout_bytes(opt) == expected
    assert float32_floor(topo) == grads_and_moments
    # The released SMET layout stores an int32 index + an int16 step per active block: 18 B at B=1.
    assert analytic_state_bytes(topo, "released", True) == grads_and_moments + 6 * k
    if block_size == 1:
        assert (grads_and_moments + 6 * k) / (256 * 12) == pytest.approx(0.375)


def test_state_bytes_follow_the_cohorts():
    model, topo, opt = make(density=0.25, lr=1e-3, reset_step=True, warmup_steps=10)
    base = opt.state_bytes()
    run_steps(model, opt, 3)
    regrow_some(topo, opt)  # a second cohort: one more int64 birth step, nothing else grows
    assert opt.births.tolist() == [0, 3]
    assert opt.state_bytes() == base + 8 == optimizer_layout_bytes(opt)


def test_naive_dst_needs_no_step_and_masked_layout_is_dense_size():
    _, topo, naive = make(density=0.25, lr=1e-3, reset_step=False, warmup_steps=0)
    assert naive.sparse.cohort is None
    assert naive.state_bytes() == 64 * 12 + (64 + 2)  # grad, m, v + the positions (offsets + one chunk count)
    assert naive.state_bytes() == analytic_state_bytes(topo, "compact", needs_step=False)
    _, topo, masked = make(density=0.25, lr=1e-3, reset_step=True, warmup_steps=10, state="dense_masked")
    # dense grad, m, v for all 256 weights + bool mask and int16 age per block + the topology's positions
    assert masked.state_bytes() == 256 * 12 + 256 * 1 + 256 * 2 + (64 + 2)
    assert masked.state_bytes() == analytic_state_bytes(topo, "dense_masked", needs_step=True)


def test_compact_llama_state_ratio_at_density_quarter():
    cfg = ModelConfig(dim=128, n_layers=2, n_heads=4, ffn_dim=352, vocab_size=256, seq_len=32)
    model = LLaMA(cfg)
    topo = SparseTopology.build(model, 0.25)
    opt = SMETAdam(model, topo, lr=1e-3, warmup_steps=100)
    sparse_ratio = opt.state_bytes("sparse") / (12 * topo.numel)
    # 12 + 1 + 1 B per active weight + 2 B per 256 weights + 8 B: 0.25 * 14/12 + 2/256/12 = 0.2923 (+ 8 B)
    assert sparse_ratio == pytest.approx(0.25 * 14 / 12 + 2 / 256 / 12, rel=1e-3)
    assert sparse_ratio <= 0.30
    assert opt.state_bytes("sparse") == optimizer_layout_bytes(opt)


def test_bad_optimizer_values_are_rejected_with_the_key():
    model = LinearLoss()
    topo = SparseTopology.build(model, 0.5, dense_patterns=[])
    cases = [({"lr": -1.0}, "optim.lr"), ({"warmup_steps": -1}, "optim.regrow.warmup_steps"),
             ({"warmup_kind": "cosine"}, "optim.regrow.warmup_kind"), ({"lr_scaling": "sqrt"}, "optim.lr_scaling.rule"),
             ({"state": "sparse"}, "optim.state"), ({"betas": (0.9, 1.0)}, "optim.betas"),
             ({"lr_scaling_scope": "dense"}, "optim.lr_scaling.scope")]
    for kwargs, key in cases:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            SMETAdam(model, topo, **kwargs)
    with pytest.raises(ConfigError, match="one of linear_lr, moment_damping, released"):
        SMETAdam(model, topo, warmup_kind="cosine")
    SMETAdam(model, topo, warmup_kind="released", warmup_steps=10).remove_hooks()


def test_lr_scaling_rules_and_scope():
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64, vocab_size=50, seq_len=16)
    model = LLaMA(cfg)
    topo = SparseTopology.build(model, 0.25)
    expected = {"none": 1.0, "inverse": 4.0, "inverse_sqrt": 2.0}
    for rule, scale in expected.items():
        opt = SMETAdam(model, topo, lr=1e-3, lr_scaling=rule)
        lrs = {g["kind"]: g["lr"] for g in opt.param_groups}
        assert lrs == pytest.approx({"dense": 1e-3, "sparse": 1e-3 * scale})
        opt.remove_hooks()
    opt = SMETAdam(model, topo, lr=1e-3, lr_scaling="power", lr_scaling_power=1.5, lr_scaling_scope="all")
    assert {g["kind"]: g["lr"] for g in opt.param_groups} == pytest.approx({"dense": 8e-3, "sparse": 8e-3})


def preconditioned_step(j: int, t: int) -> float:
    """|m_hat| / sqrt(v_hat) after j steps of a steady gradient from zeroed moments, bias-corrected
    with step t (eps negligible: |G| ~ 1)."""
    return ((1 - B1 ** j) / (1 - B1 ** t)) / math.sqrt((1 - B2 ** j) / (1 - B2 ** t))


@pytest.mark.parametrize("state", ["compact", "dense_masked"])
@pytest.mark.parametrize("reset,after", [(True, 3000), (False, 20), (False, 3000)])
def test_adam_outlier_share_of_regrown_entries_by_hand(reset, after, state):
    """stability/adam_outlier_frac_regrown against the closed form: with a local step the preconditioned
    step of a steady gradient is exactly 1; under the global step it starts at 3.08 (s = 3000: outliers on
    every one of the first 5 updates), while at s = 20 the global bias correction still compensates."""
    model, topo, opt = make(lr=1e-3, reset_step=reset, warmup_steps=0, lr_scaling="none", state=state)
    run_steps(model, opt, after)
    _, probe = regrow_some(topo, opt, probe=True)
    found = probed_steps(model, opt, probe, OUTLIER_STEPS - 1, 1e-3)
    assert "stability/adam_outlier_frac_regrown" not in found  # measured over the first OUTLIER_STEPS updates
    found = probed_steps(model, opt, probe, 1, 1e-3)
    steps = [preconditioned_step(j, j if reset else after + j) for j in range(1, OUTLIER_STEPS + 1)]
    expected = sum(r > OUTLIER_RATIO for r in steps) / OUTLIER_STEPS
    assert all(abs(r - OUTLIER_RATIO) > 0.05 for r in steps)  # no entry is a float-rounding tie
    assert found["stability/adam_outlier_frac_regrown"] == expected and probe.done
    assert expected == {(True, 3000): 0.0, (False, 20): 0.0, (False, 3000): 1.0}[(reset, after)]


@pytest.mark.parametrize("weights", ["dense", "compact"])
def test_a_skipped_step_and_a_second_micro_batch_change_nothing_but_the_gradient(weights):
    """The compact state's per-step index (dense weights: decoded in each layer's gradient hook, turned
    into rows of the one flat weight buffer) survives a step that is skipped (zero_grad after a
    non-finite loss) and serves a second micro-batch: the weights end exactly as a reference that
    sees one backward of twice the loss, at two layers whose flat-buffer rows do not start at 0."""
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64, vocab_size=50, seq_len=16)
    x = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(0))
    outcomes = []
    for skipped in (False, True):
        torch.manual_seed(0)
        model = LLaMA(cfg)
        topo = SparseTopology.build(model, 0.25, weights=weights)
        opt = SMETAdam(model, topo, lr=1e-2, warmup_steps=0)
        if weights == "dense":
            flat = opt.sparse.dense
            assert all(layer.param.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
                       for layer in topo.layers)
        for _ in range(3):
            if skipped:
                model(x, x).backward()
                opt.zero_grad()  # the step that never happened
                model(x, x).backward()  # two micro-batches of the same loss
                model(x, x).backward()
            else:
                (2 * model(x, x)).backward()
            grads = opt.gradients()[0].clone()  # Adam is scale-free: compare what it is fed
            opt.step()
            opt.zero_grad()
        outcomes.append([grads] + [layer.gather().clone() for layer in topo.layers])
    for a, b in zip(*outcomes):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


class ManyLinearLoss(nn.Module):
    """Several LinearLoss weights whose sizes are no whole number of position-store chunks (256 blocks),
    so that the flat dense buffer pads between layers."""

    def __init__(self, shapes=((12, 40), (7, 48), (20, 36)), seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weights = nn.ParameterList([nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes])
        self.G = [torch.randn(s, generator=gen) for s in shapes]

    def loss(self):
        return sum((w * g).sum() for w, g in zip(self.weights, self.G))


@pytest.mark.parametrize("chunk", [1 << 40, 1])
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("method", ["smet", "naive", "damping", "released"])
def test_flat_step_over_padded_layers_matches_the_per_entry_reference(monkeypatch, method, block_size, chunk):
    """The step over all layers at once (one decode of the position store per chunk of layers, gradient
    gathers from its per-layer split, one index_add_ into the padded flat weights) equals the dense
    per-entry reference layer by layer through 4 topology updates: block sizes 1 and 16, with cohorts
    (smet, damping, released) and without (naive), one chunk for all layers or one per layer."""
    import smet_lab.optim.sparse_state as sparse_state

    monkeypatch.setattr(sparse_state, "STEP_CHUNK", chunk)
    reset, W = method != "naive", 0 if method == "naive" else 5
    kind = {"damping": "moment_damping", "released": "released"}.get(method, "linear_lr")
    model = ManyLinearLoss()
    topo = SparseTopology.build(model, 0.25, block_size=block_size, dense_patterns=[], seed=3)
    weight0 = [w.detach().clone() for w in model.weights]
    opt = SMETAdam(model, topo, lr=1e-2, reset_step=reset, warmup_steps=W, warmup_kind=kind,
                   lr_scaling="inverse" if reset else "none")
    assert len(opt.sparse.chunks) == (1 if chunk > 1 else 3)
    assert opt.sparse.block_base != [0, *[sum(lay.n_blocks for lay in topo.layers[:i + 1]) for i in range(3)]]

    def masks_now():
        return [lay.active_mask().repeat_interleave(block_size).view(lay.shape).clone() for lay in topo.layers]

    masks, regrow_at = run_with_updates(model, topo, opt, steps=30, update_every=7, masks_now=masks_now)
    assert len(regrow_at) == 4
    for i, w in enumerate(model.weights):
        layer_masks = [m[i] for m in masks]
        assert any(not torch.equal(a, b) for a, b in zip(layer_masks, layer_masks[1:]))  # the layer's topology moved
        ref = reference_smet(weight0[i] * layer_masks[0], model.G[i], layer_masks, regrow_at, 30, 1e-2, W, reset,
                             4.0 if reset else 1.0, damping=method == "damping", released=method == "released")
        assert torch.allclose(w.detach(), ref, atol=1e-6, rtol=1e-5), (i, (w.detach() - ref).abs().max())
