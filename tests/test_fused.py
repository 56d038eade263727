"""optim.kernel: the fused compact step computes what the eager step computes.

The CPU kernel (adam_rows.c) rounds as eager does (m and v bit for bit, and a step's weights too
wherever torch's sqrt is correctly rounded), but its sqrt always is and torch's is not; torch.compile
(the CUDA kernel, compiled here for the CPU) evaluates lerp/addcmul without eager's fused multiply-adds.
So a run agrees with the eager one to float32 rounding, not bit for bit. Over 40 steps with 3 topology updates (weight decay 0.1; every step fused,
the ones right after an update included) the tests ask: per-step losses to 1e-5 (measured <= 3.8e-6),
weights to 3e-4 absolute (measured <= 1.5e-4, a regrown entry whose first steps amplify one rounding),
m to 1e-5 absolute (<= 2.2e-6) and v to 3e-3 relative (<= 1.6e-3: tiny v of rarely-updated entries).
`adam_rows` run uncompiled exercises the torch.compile path's wrapper (tables, packed values, chunks,
the dense weights' gather and scatter) in every configuration without paying for a compile each.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import warnings

import numpy as np
import pytest
import torch

from smet_lab.data import load_corpus
from smet_lab.config import DataConfig, ModelConfig
from smet_lab.model import LLaMA
from smet_lab.optim import SMETAdam
from smet_lab.optim import fused, smet_adam
from smet_lab.optim.fused import AUTO_MIN_ENTRIES, CompiledStep, NativeStep, adam_rows, compiler_present, resolve_kernel
from smet_lab.sparse import DynamicSparsity, SparseTopology
from smet_lab.train.probe import RegrownSteps

MODEL = ModelConfig(name="test", dim=32, n_layers=2, n_heads=2, ffn_dim=64, seq_len=16, vocab_size=256)
TOKENS = load_corpus(DataConfig(name="synthetic", max_tokens=20_000)).train
needs_c = pytest.mark.skipif(not compiler_present(torch.device("cpu")), reason="no C compiler for the CPU kernel")
needs_cxx = pytest.mark.skipif(not any(map(shutil.which, ("g++", "clang++", "c++"))), reason="no C++ compiler for torch.compile")

# (reset_step, warmup_steps, warmup_kind): with cohorts (local step and/or warm-up) and without
OPTIONS = {
    "cohorts-linear_lr": (True, 5, "linear_lr"),
    "cohorts-moment_damping": (True, 5, "moment_damping"),
    "warmup_only-linear_lr": (False, 5, "linear_lr"),
    "no_cohorts": (False, 0, "linear_lr"),
}


def train(kernel: str, block_size: int, weights: str, option: str, weight_decay: float = 0.0, steps: int = 40,
          probed: dict | None = None):
    """`steps` optimizer steps of a small LLaMA at density 0.3, a topology update every 10 steps;
    `probed` collects the trainer's probes of the regrown entries ({(update step, metric): value})."""
    reset_step, warmup, kind = OPTIONS[option]
    torch.manual_seed(0)
    model = LLaMA(MODEL)
    topo = SparseTopology.build(model, 0.3, block_size=block_size, seed=0, weights=weights)
    opt = SMETAdam(model, topo, lr=3e-3, reset_step=reset_step, warmup_steps=warmup, warmup_kind=kind,
                   weight_decay=weight_decay, kernel=kernel)
    updater = DynamicSparsity(topo, 1000, update_every=10, prune_rate=0.3, prune_schedule="constant", seed=0)
    gen = torch.Generator().manual_seed(1)
    losses, probe = [], None
    for step in range(1, steps + 1):
        starts = torch.randint(len(TOKENS) - 17, (4,), generator=gen)
        chunk = torch.stack([torch.as_tensor(TOKENS[s:s + 17], dtype=torch.long) for s in starts.tolist()])
        loss = model(chunk[:, :-1], chunk[:, 1:])
        loss.backward()
        losses.append(loss.item())
        opt.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
        if probe is not None and probed is not None:
            lr = next(g["lr"] for g in opt.param_groups if g["kind"] == "sparse")
            probed.update({(probe.update_step, k): v for k, v in probe.observe(topo, opt, lr).items()})
        if step % 10 == 0:
            events = updater.update(step)
            probe = RegrownSteps.start(step, topo, events, opt.regrow(events))
    weights_now = torch.cat([layer.gather().reshape(-1) for layer in topo.layers])
    return torch.tensor(losses), weights_now, opt


@functools.cache
def eager_reference(block_size: int, weights: str, option: str):
    """train("eager", ..., weight_decay=0.1), the run three tests compare with: made once per configuration
    (with the default chunks and the C kernel's exact form where it builds) and only read."""
    return train("eager", block_size, weights, option, weight_decay=0.1)


def assert_same_training(a, b):
    (la, wa, oa), (lb, wb, ob) = a, b
    assert (la - lb).abs().max() <= 1e-5
    torch.testing.assert_close(wb, wa, rtol=0, atol=3e-4)
    torch.testing.assert_close(ob.exp_avg, oa.exp_avg, rtol=0, atol=1e-5)
    torch.testing.assert_close(ob.exp_avg_sq, oa.exp_avg_sq, rtol=3e-3, atol=1e-9)


def torch_compile_path(monkeypatch, compiled=adam_rows):
    """Route the fused step through the torch.compile path (CUDA's) on this CPU, with `compiled` for
    torch.compile(adam_rows): adam_rows itself runs the wrapper's arithmetic uncompiled."""
    monkeypatch.setattr(smet_adam, "fused_step", lambda device: CompiledStep())
    monkeypatch.setattr(CompiledStep, "_compiled", compiled)


@needs_c
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("weights", ["dense", "compact"])
@pytest.mark.parametrize("block_size", [1, 16])
def test_native_step_equals_the_eager_step(block_size, weights, option):
    eager = eager_reference(block_size, weights, option)
    fused_run = train("compiled", block_size, weights, option, weight_decay=0.1)
    assert fused_run[2].kernel == "compiled" and eager[2].kernel == "eager"
    assert_same_training(eager, fused_run)


@needs_c
@pytest.mark.parametrize("chunks", ["one", "several"])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("weights", ["dense", "compact"])
@pytest.mark.parametrize("block_size", [1, 16])
def test_the_eager_kernel_runs_the_eager_ops_bit_for_bit(monkeypatch, block_size, weights, option, chunks):
    """optim.kernel=eager on a CPU with a C compiler runs the C kernel around torch's own sqrt: over 40
    steps with 3 topology updates (weight decay 0.1) its losses, weights and moments are the eager torch
    ops' bit for bit, with the state in one chunk or in several (torch's sqrt sees the eager step's arrays)."""
    if chunks == "several":
        monkeypatch.setattr("smet_lab.optim.sparse_state.STEP_CHUNK", 2000)
        native = train("eager", block_size, weights, option, weight_decay=0.1)
    else:
        native = eager_reference(block_size, weights, option)
    assert native[2]._fused is not None and native[2].kernel == "eager"
    assert (len(native[2].sparse.chunks) > 2) == (chunks == "several")
    monkeypatch.setattr(smet_adam, "exact_step", lambda device: None)
    ops = train("eager", block_size, weights, option, weight_decay=0.1)
    assert ops[2]._fused is None
    assert torch.equal(native[0], ops[0]) and torch.equal(native[1], ops[1])
    assert torch.equal(native[2].sparse.exp_avg, ops[2].sparse.exp_avg)
    assert torch.equal(native[2].sparse.exp_avg_sq, ops[2].sparse.exp_avg_sq)


def synced_pair(block_size: int, weights: str, option: str):
    """An eager and a native-kernel optimizer 12 steps into training (a topology update at step 10),
    the native one put into the eager one's state, both given the same new sparse gradients."""
    eager = train("eager", block_size, weights, option, weight_decay=0.1, steps=12)[2]
    native = train("compiled", block_size, weights, option, weight_decay=0.1, steps=12)[2]
    native.sparse.load_state_dict(eager.sparse.state_dict())
    for a, b in zip(native.topology.layers, eager.topology.layers):
        a.param.data.copy_(b.param.data)
    for opt in (eager, native):  # (after zero_grad: the dense parameters have no gradient and keep still)
        opt._settle_sparse_grads()
        opt.sparse.grad.copy_(torch.randn(opt.sparse.grad.shape, generator=torch.Generator().manual_seed(3)))
    native.global_step, native.last_regrow_step = eager.global_step, eager.last_regrow_step
    return eager, native


@needs_c
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("weights", ["dense", "compact"])
@pytest.mark.parametrize("block_size", [1, 16])
def test_one_native_step_is_eagers_but_for_the_sqrt(block_size, weights, option):
    """From the same state (after a topology update: two cohorts and a running warm-up where the option
    has them), one step of the C kernel gives the eager step's m and v bit for bit (torch's lerp and
    addcmul, fused multiply-adds included) and its weights bit for bit wherever torch's float32 sqrt of
    v / bc2 is the correctly rounded one (numpy's); the kernel's sqrt always is, torch's is one ulp off in
    ~0.7 % of values on an AVX-512 CPU and ~20 % on an AVX2 one, and only there may a weight differ."""
    eager, native = synced_pair(block_size, weights, option)
    assert eager._warming_now() == (option != "no_cohorts")
    w_before = torch.cat([layer.gather() for layer in eager.topology.layers])
    eager.step()
    native.step()
    assert native.kernel == "compiled"
    assert torch.equal(native.sparse.exp_avg, eager.sparse.exp_avg)
    assert torch.equal(native.sparse.exp_avg_sq, eager.sparse.exp_avg_sq)
    w_eager = torch.cat([layer.gather() for layer in eager.topology.layers])
    w_native = torch.cat([layer.gather() for layer in native.topology.layers])
    assert bool((w_eager != w_before).any())
    s = eager.sparse
    v_hat = s.exp_avg_sq / s.coefficients(slice(0, s.exp_avg_sq.shape[0]))[1]  # as this step formed it
    rounded = torch.from_numpy(np.sqrt(v_hat.numpy())) == v_hat.sqrt()
    assert int(rounded.sum()) > 0.5 * rounded.numel()  # the equality below covers most entries on any CPU
    assert torch.equal(w_native[rounded], w_eager[rounded])


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("weights", ["dense", "compact"])
@pytest.mark.parametrize("block_size", [1, 16])
def test_torch_compile_path_uncompiled_equals_the_eager_step(monkeypatch, block_size, weights, option):
    torch_compile_path(monkeypatch)  # (the eager step does not read what it patches)
    eager = eager_reference(block_size, weights, option)
    fused_run = train("compiled", block_size, weights, option, weight_decay=0.1)
    assert fused_run[2].kernel == "compiled" and eager[2].kernel == "eager"
    assert_same_training(eager, fused_run)


def compiled_run(monkeypatch, *args, **kwargs):
    # Dynamo compiles one graph per configuration and gives up after 8 per function and process; a
    # run has one or two, this file has more: start each from an empty in-memory cache (the on-disk
    # cache still makes a repeated configuration cheap).
    torch.compiler.reset()
    torch_compile_path(monkeypatch, torch.compile(adam_rows, dynamic=True, fullgraph=True))
    run = train("compiled", *args, **kwargs)
    assert run[2].kernel == "compiled", "the compiled kernel fell back to eager"
    return run


@needs_cxx
@pytest.mark.parametrize("block_size,weights,option", [(16, "dense", "cohorts-moment_damping")])
def test_torch_compiled_step_equals_the_eager_step(monkeypatch, block_size, weights, option):
    assert_same_training(train("eager", block_size, weights, option), compiled_run(monkeypatch, block_size, weights, option))


@needs_cxx
@pytest.mark.slow
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("weights", ["dense", "compact"])
@pytest.mark.parametrize("block_size", [1, 16])
def test_torch_compiled_step_equals_the_eager_step_everywhere(monkeypatch, block_size, weights, option):
    assert_same_training(train("eager", block_size, weights, option, weight_decay=0.1),
                         compiled_run(monkeypatch, block_size, weights, option, weight_decay=0.1))


@needs_c
@pytest.mark.parametrize("option", ["cohorts-linear_lr", "no_cohorts"])
def test_regrow_probes_agree_under_the_fused_step(option):
    """The probes of the regrown entries (update ratio, Adam outlier share) read weights and the
    optimizer's state from outside, so the fused step serves the steps right after an update too and
    the metrics agree with the eager step's (the moments to one float32 ulp: the outlier counts exactly)."""
    eager, fused_run = {}, {}
    train("eager", 1, "compact", option, steps=36, probed=eager)
    train("compiled", 1, "compact", option, steps=36, probed=fused_run)
    keys = {(u, k) for u in (10, 20, 30) for k in ("stability/regrow_update_ratio", "stability/adam_outlier_frac_regrown")}
    assert set(eager) == set(fused_run) == keys
    for u in (10, 20, 30):
        # A regrown entry's first step from zeroed moments is (1-b1)g/(1-b1^t) / sqrt((1-b2)g^2/(1-b2^t)) x
        # warm-up, for any g >> eps: t = 1 and warm-up 1/5 with cohorts, t = u + 1 and none without.
        t, warm = (1, 1 / 5) if option == "cohorts-linear_lr" else (u + 1, 1.0)
        expected = warm * (0.1 / (1 - 0.9 ** t)) / math.sqrt(0.001 / (1 - 0.999 ** t))
        assert eager[u, "stability/regrow_update_ratio"] == pytest.approx(expected, rel=2e-3)
    for k in keys:
        assert fused_run[k] == pytest.approx(eager[k], rel=1e-5)


def fallback_run(expected_warning: str):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        losses, weights, opt = train("compiled", 1, "compact", "no_cohorts", steps=12)
    assert opt.kernel == "eager"
    assert [str(w.message) for w in seen if "could not be built" in str(w.message)] == [
        f"optim.kernel=compiled: the fused kernel could not be built ({expected_warning}); the optimizer runs the eager step"]
    ref_losses, ref_weights, _ = train("eager", 1, "compact", "no_cohorts", steps=12)
    assert torch.equal(losses, ref_losses) and torch.equal(weights, ref_weights)


def test_a_failed_native_build_falls_back_to_eager_with_one_warning(monkeypatch):
    """A C compiler that fails (here `false`, a real program exiting 1 for every flag set)."""
    monkeypatch.setenv("CC", shutil.which("false"))
    monkeypatch.setattr(NativeStep, "_lib", None)
    monkeypatch.setattr(NativeStep, "_error", None)
    fallback_run(f"RuntimeError: {shutil.which('false')} failed: 1")


def test_a_failed_torch_compile_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken(*args):
        raise RuntimeError("no compiler here")

    torch_compile_path(monkeypatch, broken)
    fallback_run("RuntimeError: no compiler here")


@needs_c
def test_cohort_ids_wider_than_a_byte_take_the_eager_step():
    """Past 255 live cohorts the ids widen to int16; the C kernel reads bytes, so such a step is the
    eager one, bit for bit, and the kernel stays chosen for later steps."""
    eager, native = synced_pair(1, "compact", "cohorts-linear_lr")
    for opt in (eager, native):
        opt.sparse.cohort = opt.sparse.cohort.to(torch.int16)
        opt.step()
    assert native.kernel == "compiled"
    assert torch.equal(native.sparse.exp_avg, eager.sparse.exp_avg)
    assert torch.equal(native.sparse.values, eager.sparse.values)


@needs_c
@pytest.mark.parametrize("block_size", [1, 16])
def test_native_index_helpers_decode_and_gather_as_the_position_store_says(block_size):
    """The C kernel's helpers of the dense-weights layout: decode_rows gives a run of layers' ids as
    padded_ids + base does, and gather_rows copies (or adds) each layer's active blocks of a dense
    gradient, read with its part of those rows and its shift, against indexing by block_ids()."""
    topo = SparseTopology.build(LLaMA(MODEL), 0.3, distribution="erk", block_size=block_size)
    native, gen = NativeStep(), torch.Generator().manual_seed(0)
    first, last = 3, 11
    base = 256 * topo.chunk_start[first] + 5
    rows = native.decode_rows(*topo.store(first, last), base)
    assert rows.dtype == torch.int32 and torch.equal(rows, topo.padded_ids(first, last) + base)
    for i in range(first, last):
        layer = topo.layers[i]
        part = rows[topo.slot_start[i] - topo.slot_start[first]:topo.slot_start[i + 1] - topo.slot_start[first]]
        grad = torch.randn(layer.shape, generator=gen)
        picked = grad.view(-1, block_size)[layer.block_ids().long()]
        out = torch.randn(layer.n_active, block_size, generator=gen)
        start = out.clone()
        shift = 256 * topo.chunk_start[i] + 5
        view = (lambda t: t.view(-1)) if block_size == 1 else (lambda t: t)
        assert native.gather_rows(view(grad.view(-1, block_size)), part, shift, view(out), fresh=False)
        assert torch.equal(out, start + picked)
        assert native.gather_rows(view(grad.view(-1, block_size)), part, shift, view(out), fresh=True)
        assert torch.equal(out, picked)
    assert not native.gather_rows(torch.zeros(4, dtype=torch.float64), rows[:2], 0, torch.zeros(2), True)


def test_auto_picks_compiled_only_for_large_states_with_a_compiler(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(fused, "compiler_present", lambda device: True)
    assert resolve_kernel("auto", AUTO_MIN_ENTRIES, cpu) == "compiled"
    assert resolve_kernel("auto", AUTO_MIN_ENTRIES - 1, cpu) == "eager"
    assert resolve_kernel("eager", 10 * AUTO_MIN_ENTRIES, cpu) == "eager"
    monkeypatch.setattr(fused, "compiler_present", lambda device: False)
    assert resolve_kernel("auto", 10 * AUTO_MIN_ENTRIES, cpu) == "eager"
    assert resolve_kernel("compiled", 1, cpu) == "compiled"  # asked for: tried, and falls back if it fails


@needs_c
def test_a_compiled_run_resumes_bitwise(tmp_path):
    """The trainer with optim.kernel=compiled and compact weights: a checkpoint inside the regrow
    measurement window resumes to the same per-step losses (the kernel is deterministic)."""
    from helpers import Died, die_after
    from smet_lab.config import RunConfig
    from smet_lab.methods import apply_method
    from smet_lab.train import QUIET, Callbacks
    from smet_lab.train import train as train_run

    cfg = apply_method(RunConfig(), "smet")
    cfg.model = MODEL
    cfg.train.max_steps, cfg.train.batch_size, cfg.train.eval_every, cfg.train.eval_batches = 40, 4, 100, 2
    cfg.train.probe_batch_size, cfg.train.checkpoint_every = 8, 13
    cfg.optim.kernel, cfg.sparsity.weights, cfg.sparsity.update_every = "compiled", "compact", 10
    corpus = load_corpus(DataConfig(name="synthetic", max_tokens=60_000))
    full = train_run(cfg, corpus=corpus, callbacks=QUIET)
    assert full.summary["summary/optimizer_kernel_compiled"] == 1.0
    with pytest.raises(Died):
        train_run(cfg, output_dir=tmp_path, corpus=corpus, callbacks=Callbacks(progress=None, should_stop=die_after(20)))
    cfg.train.resume_from = str(tmp_path / "checkpoints" / "step_13")
    resumed = train_run(cfg, output_dir=tmp_path / "b", corpus=corpus, callbacks=QUIET)
    loss = [r["train/loss"] for r in full.history if "train/loss" in r]
    assert [r["train/loss"] for r in resumed.history if "train/loss" in r] == loss
    assert len(loss) == 40


@needs_c
def test_the_kernel_is_built_once_per_source_compiler_and_cpu(tmp_path, monkeypatch):
    """The C library is compiled once and then loaded from the cache: a real compiler behind wrappers
    that count their calls, on a one-function source (a build of adam_rows.c takes seconds). Another
    compiler path, the same compiler changed (its mtime) or a changed source builds anew; a cache that
    cannot be written leaves a private build and no file."""
    from smet_lab.optim import cbuild

    source = tmp_path / "probe.c"
    source.write_text("int smet_probe(void) { return 7; }\n")
    monkeypatch.setattr(cbuild, "C_SOURCE", source)

    def wrapper(name: str):
        path = tmp_path / name
        path.write_text(f'#!/bin/sh\necho x >> "{tmp_path}/{name}.calls"\nexec {cbuild.c_compiler()} "$@"\n')
        path.chmod(0o755)

    def builds(cc: str) -> int:  # how many compiles one load ran (one per flag set tried)
        log = tmp_path / f"{cc}.calls"
        before = len(log.read_text().splitlines()) if log.exists() else 0
        monkeypatch.setenv("CC", str(tmp_path / cc))
        assert cbuild.load_library().smet_probe() == 7
        return len(log.read_text().splitlines()) - before

    cache = tmp_path / "cache"
    monkeypatch.setenv("SMET_LAB_CACHE", str(cache))
    wrapper("cc1"), wrapper("cc2")
    assert builds("cc1") >= 1
    assert [p.name for p in cache.iterdir()] == [cbuild.library_name(str(tmp_path / "cc1"))]
    assert builds("cc1") == 0  # loaded, not compiled
    assert builds("cc2") >= 1 and builds("cc2") == 0
    os.utime(tmp_path / "cc2", ns=(1, 1))  # "upgraded"
    assert builds("cc2") >= 1 and builds("cc2") == 0
    source.write_text("int smet_probe(void) { return 3 + 4; }\n")
    assert builds("cc2") >= 1 and builds("cc2") == 0
    assert len(list(cache.iterdir())) == 4
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("SMET_LAB_CACHE", str(tmp_path / "a_file" / "cache"))  # cannot be created
    assert builds("cc2") >= 1 and builds("cc2") >= 1
