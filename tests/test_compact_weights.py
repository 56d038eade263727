"""sparsity.weights=compact: only the active values are stored; the same math as dense weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from helpers import Died, die_after, e2e
from smet_lab.config import DataConfig, ModelConfig, RunConfig
from smet_lab.data import load_corpus
from smet_lab.methods import apply_method
from smet_lab.model import LLaMA
from smet_lab.optim import SMETAdam
from smet_lab.sparse import DynamicSparsity, SparseTopology
from smet_lab.sparse.compact_linear import CompactLinear
from smet_lab.sparse.layer import SparseLayer
from smet_lab.train import QUIET, Callbacks, train
from smet_lab.train.memory import memory_summary

CORPUS = load_corpus(DataConfig(name="synthetic", max_tokens=60_000))
MODEL = ModelConfig(name="test", dim=32, n_layers=2, n_heads=2, ffn_dim=64, seq_len=16)


def run_cfg(method: str, weights: str, steps: int, update_every: int, **sparsity) -> RunConfig:
    cfg = apply_method(RunConfig(), method)
    cfg.model = MODEL
    cfg.train.max_steps, cfg.train.batch_size, cfg.train.eval_every, cfg.train.eval_batches = steps, 4, 100, 2
    cfg.train.probe_batch_size, cfg.train.log_every = 8, 10
    cfg.optim.warmup_steps = 10
    if method != "static":
        cfg.sparsity.update_every = update_every
    cfg.sparsity.weights = weights
    for key, value in sparsity.items():
        setattr(cfg.sparsity, key, value)
    return cfg


def losses(result) -> np.ndarray:
    return np.array([r["train/loss"] for r in result.history if "train/loss" in r])


@pytest.mark.parametrize("method", ["smet", e2e("naive_dst"), e2e("static")])  # the loop keeps smet (seconds each)
def test_compact_weights_train_like_dense_weights(method):
    """300 steps, a topology update every 50: the per-step losses agree to 1e-5 (the scatter then matmul
    sums in another order than a matmul over the zero-filled weight; the values are the same)."""
    dense = train(run_cfg(method, "dense", 300, 50), corpus=CORPUS, callbacks=QUIET)
    compact = train(run_cfg(method, "compact", 300, 50), corpus=CORPUS, callbacks=QUIET)
    assert len(losses(dense)) == 300
    assert np.abs(losses(dense) - losses(compact)).max() <= 1e-5
    assert compact.summary["summary/final_val_loss"] == pytest.approx(dense.summary["summary/final_val_loss"], abs=1e-5)


def test_compact_layer_forward_and_backward_by_hand():
    """A CompactLinear against nn.Linear with the masked dense weight: same output, same input gradient,
    and the gradient of the values is the dense weight gradient at the active blocks (slot order)."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 4, bias=False)
    active = torch.tensor([5, 0, 3, 9, 11], dtype=torch.int32)  # blocks of 2: 12 blocks in a 4x6 weight
    layer = SparseLayer("0.weight", lin.weight, 2, active)
    layer.apply_mask()
    masked = lin.weight.detach().clone()
    compact = CompactLinear(layer)
    x = torch.randn(3, 5, 6, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    w_ref = masked.clone().requires_grad_()
    seen = []
    layer.register_dense_grad_hook(lambda g: seen.append(g.clone()))
    out = compact(x)
    ref = torch.nn.functional.linear(x_ref, w_ref)
    torch.testing.assert_close(out, ref)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ref.backward(grad_out)
    torch.testing.assert_close(x.grad, x_ref.grad)
    expected = w_ref.grad.view(-1, 2)[active.sort().values.long()]
    torch.testing.assert_close(compact.values.grad, expected)
    torch.testing.assert_close(seen[0], w_ref.grad)
    assert compact.values.shape == (5, 2)


def test_replace_moves_compact_values_with_their_blocks():
    lin = nn.Linear(4, 2, bias=False)
    layer = SparseLayer("w", lin.weight, 1, torch.tensor([1, 4, 6], dtype=torch.int32))
    layer.apply_mask()
    values = layer.make_compact()
    before = dict(zip([1, 4, 6], values.detach().squeeze(1).tolist()))
    layer.replace(torch.tensor([4]), torch.tensor([0]))  # prune block 4, regrow block 0
    assert layer.block_ids().tolist() == [0, 1, 6]
    assert values.squeeze(1).tolist() == [0.0, before[1], before[6]]  # same tensor, re-ordered in place
    # the dense view reads zeros off the mask
    torch.testing.assert_close(layer.materialize().view(-1), torch.tensor([0.0, before[1], 0, 0, 0, 0, before[6], 0]))
    assert layer.gather(ids=torch.tensor([6, 4, 1])).squeeze(1).tolist() == [before[6], 0.0, before[1]]


def test_gradient_growth_picks_the_same_blocks_with_compact_weights():
    """RigL with compact weights sees the same dense gradient (formed in the layer's backward) and
    grows the same blocks as with dense weights."""
    picked = {}
    for weights in ("dense", "compact"):
        torch.manual_seed(0)
        model = LLaMA(ModelConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64, vocab_size=64, seq_len=16))
        topo = SparseTopology.build(model, 0.25, weights=weights, seed=0)
        opt = SMETAdam(model, topo, lr=1e-2, warmup_steps=5)
        upd = DynamicSparsity(topo, 100, update_every=2, prune_rate=0.3, growth="gradient", seed=0)
        gen = torch.Generator().manual_seed(1)
        ids = []
        for step in range(1, 7):
            x = torch.randint(64, (4, 17), generator=gen)
            upd.begin_step(step)
            model(x[:, :-1], x[:, 1:]).backward()
            opt.clip_grad_norm_(1.0)
            opt.step()
            opt.zero_grad()
            if upd.is_update_step(step):
                events = upd.update(step)
                opt.regrow(events)
                ids.append([sorted(e.new_blocks.tolist()) for e in events])  # a set: the order of near-ties may differ
        picked[weights] = ids
    assert len(picked["dense"]) == 3 and all(picked["dense"])
    assert picked["compact"] == picked["dense"]


def test_compact_run_resumes_bitwise_and_its_checkpoint_is_compact(tmp_path):
    cfg = run_cfg("smet", "compact", 40, 10, growth="gradient")
    cfg.train.checkpoint_every = 17
    full = train(cfg, corpus=CORPUS, callbacks=QUIET)
    with pytest.raises(Died):
        train(cfg, output_dir=tmp_path, corpus=CORPUS, callbacks=Callbacks(progress=None, should_stop=die_after(20)))
    ckpt = tmp_path / "checkpoints" / "step_17"
    cfg.train.resume_from = str(ckpt)
    resumed = train(cfg, output_dir=tmp_path / "b", corpus=CORPUS, callbacks=QUIET)
    assert list(losses(resumed)) == list(losses(full))
    # The checkpoint holds the active values only: k x B floats per sparse layer, no dense weight.
    state = torch.load(ckpt / "state.pt", weights_only=False)
    model = state["model"]
    assert not any(name.endswith(("wq.weight", "w1.weight")) for name in model)
    for name, ids in state["topology"]["layers"].items():
        values = model[name.removesuffix("weight") + "values"]
        assert values.shape == (ids.numel(), 1)


def test_memory_of_compact_weights_by_role():
    """Bytes by role against the layout's arithmetic: the sparse layers' weights are their active
    values (4 B each), and at density 0.25, B = 1 the sparse layers keep <= 0.30 x dense Adam's 16 B."""
    torch.manual_seed(0)
    model = LLaMA(ModelConfig(dim=64, n_layers=2, n_heads=4, ffn_dim=176, vocab_size=256, seq_len=16))
    sparse_numel = 2 * (4 * 64 * 64 + 3 * 64 * 176)
    topo = SparseTopology.build(model, 0.25, weights="compact")
    opt = SMETAdam(model, topo, lr=1e-3, warmup_steps=10)
    k = topo.n_active_weights
    assert k == sum(round(0.25 * n) for n in [64 * 64] * 8 + [64 * 176] * 6)
    s = memory_summary(model, opt)
    assert s["summary/memory/bytes/weights/sparse"] == 4 * k
    assert s["summary/memory/bytes/weights/dense"] == 4 * (2 * 256 * 64 + 5 * 64)
    chunks = sum(-(-n // 256) for n in [64 * 64] * 8 + [64 * 176] * 6)
    sparse_total = 4 * k + 12 * k + (k + 2 * chunks) + k + 8  # weights, grad+m+v, positions, cohort ids, births
    assert s["summary/memory/sparse_training_ratio_vs_dense_adam"] == pytest.approx(sparse_total / (16 * sparse_numel))
    assert s["summary/memory/sparse_training_ratio_vs_dense_adam"] <= 0.30
    assert s["summary/memory/training_bytes"] == sum(v for key, v in s.items() if key.startswith("summary/memory/bytes/"))
    # the dense model's parameter count, not the compact one's
    n_dense_model = sparse_numel + 2 * 256 * 64 + 5 * 64
    assert s["summary/memory/training_ratio_vs_dense_adam"] == pytest.approx(s["summary/memory/training_bytes"] / (16 * n_dense_model))


@pytest.mark.parametrize("method,key,value", [
    ("smet", "optim.regrow.warmup_kind", "moment_damping"),
    ("smet", "optim.regrow.warmup_kind", "released"),
    ("smet_no_warmup", None, None), ("smet_no_reset", None, None), ("smet_no_scaling", None, None),
    ("smet", "sparsity.block_size", 128),
    ("smet", "sparsity.distribution", "erk"),
    ("naive_dst", "sparsity.growth", "gradient"),
])
def test_every_ablation_and_option_trains_alike_with_compact_weights(method, key, value):
    """60 steps, an update every 10: compact and dense weights give the same losses (to 1e-5)."""
    runs = []
    for weights in ("dense", "compact"):
        cfg = run_cfg(method, weights, 60, 10)
        if key:
            section, leaf = key.rsplit(".", 1)
            node = cfg
            for part in section.split("."):
                node = getattr(node, part)
            setattr(node, leaf, value)
        runs.append(losses(train(cfg, corpus=CORPUS, callbacks=QUIET)))
    assert len(runs[0]) == 60 and np.abs(runs[0] - runs[1]).max() <= 1e-5
