"""The training loop: metrics, the cold-start effect measured in real runs, resume, divergence."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from helpers import Died, die_after
from smet_lab.config import ConfigError, DataConfig, ModelConfig, RunConfig
from smet_lab.data import load_corpus
from smet_lab.methods import METHODS, apply_method
from smet_lab.train import QUIET, Callbacks, checkpoint, lr_factor, train
from smet_lab.train.memory import DENSE_ADAM_BYTES_PER_PARAM

CORPUS = load_corpus(DataConfig(name="synthetic", max_tokens=60_000))


def small_cfg(method="smet", steps=60, **train_kw) -> RunConfig:
    cfg = RunConfig()
    cfg.model = ModelConfig(name="test", dim=32, n_layers=1, n_heads=2, ffn_dim=64, seq_len=16)
    cfg.train.max_steps = steps
    cfg.train.batch_size = 4
    cfg.train.eval_every = 20
    cfg.train.eval_batches = 2
    cfg.train.probe_window = 5
    cfg.train.probe_batch_size = 8
    cfg.train.log_every = 5
    cfg.sparsity.update_every = 10
    cfg.optim.warmup_steps = 10
    cfg = apply_method(cfg, method)  # the preset wins over the test's sizes (static: no updates)
    cfg.optim.regrow.warmup_steps = 10 if cfg.optim.regrow.warmup_steps else 0
    for k, v in train_kw.items():
        setattr(cfg.train, k, v)
    return cfg


def losses(result):
    return [r["train/loss"] for r in result.history]


def test_lr_schedule_warmup_then_cosine_to_min():
    cfg = small_cfg(steps=110)
    assert lr_factor(1, cfg) == pytest.approx(0.1)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert lr_factor(110, cfg) == pytest.approx(0.1)


@pytest.mark.parametrize("method,scale", [("smet", 4.0), ("naive_dst", 1.0), ("dense", None)])
def test_train_lr_is_the_base_rate_and_lr_sparse_the_scaled_one(method, scale):
    """train/lr = alpha_0 x schedule (the same for every method); train/lr_sparse = that x 1/d for smet's
    inverse rule at d = 0.25, x 1 for naive_dst, and absent where no layer is sparse."""
    cfg = small_cfg(method, steps=30)
    res = train(cfg, corpus=CORPUS, callbacks=QUIET)
    for row in res.history:
        step = row["step"]
        # The schedule by hand: linear warm-up over 10 steps, then cosine from 1 to 0.1 over 20 steps.
        factor = step / 10 if step <= 10 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 10) / 20))
        assert row["train/lr"] == pytest.approx(1e-3 * factor, rel=1e-12)
        if scale is None:
            assert "train/lr_sparse" not in row
        else:
            assert row["train/lr_sparse"] == pytest.approx(1e-3 * factor * scale, rel=1e-6)


def test_run_logs_the_public_metrics_and_summary():
    logged = []
    res = train(small_cfg(), corpus=CORPUS, callbacks=Callbacks(log=lambda m, s: logged.append((s, dict(m))), progress=None))
    assert res.status == "FINISHED" and len(res.history) == 60
    names = set().union(*(m for _, m in logged))
    # Late metrics reach the sink at the step they belong to (the update step).
    assert sorted(s for s, m in logged if "stability/probe_jump" in m) == [10, 20, 30, 40, 50]
    assert sorted(s for s, m in logged if "stability/regrow_update_ratio" in m) == [10, 20, 30, 40, 50]
    for key in ("stability/update_rms_regrown", "stability/update_rms_surviving", "stability/mask_flip_rate"):
        assert sorted(s for s, m in logged if key in m) == [10, 20, 30, 40, 50], key
    for key in ["train/loss", "train/lr", "train/grad_norm", "val/loss", "val/ppl", "topo/regrown_fraction",
                "topo/density", "train/tokens_per_s", "summary/final_val_loss", "summary/mean_probe_jump",
                "summary/memory/state_bytes", "summary/memory/state_ratio_vs_dense_adam", "summary/tokens_per_s",
                "summary/peak_rss_bytes"]:
        assert key in names, key
    rows = {r["step"]: r for r in res.history}
    update_steps = [s for s, r in rows.items() if "topo/density" in r]
    assert update_steps == [10, 20, 30, 40, 50]
    for s in update_steps:
        r = rows[s]
        assert r["topo/density"] == pytest.approx(0.25, abs=0.01)
        assert "stability/probe_jump" in r and "stability/regrow_update_ratio" in r
        # The probe jump is the max probe loss over the next 5 steps minus the probe loss before.
        after = [rows[s + k]["stability/probe_loss"] for k in range(1, 6)]
        assert r["stability/probe_jump"] == pytest.approx(max(after) - r["stability/probe_loss"])
    s = res.summary
    assert s["summary/final_val_loss"] == rows[60]["val/loss"]
    assert s["summary/mean_probe_jump"] == pytest.approx(sum(rows[u]["stability/probe_jump"] for u in update_steps) / 5)
    n_params = 32 * 256 * 2 + 2 * 32 + 32 + 4 * 32 * 32 + 3 * 32 * 64  # embeddings+head, norms, projections
    assert s["summary/memory/state_ratio_vs_dense_adam"] == pytest.approx(
        s["summary/memory/state_bytes"] / (DENSE_ADAM_BYTES_PER_PARAM * n_params))
    assert s["summary/parameters"] == n_params  # the dense model's size, sparse layers in full
    assert math.exp(rows[60]["val/loss"]) == pytest.approx(rows[60]["val/ppl"])


def test_regrow_update_ratio_in_a_real_run_shows_the_cold_start():
    """A topology update after global step 1000: naive DST's regrown entries step by
    (1-b1)/(1-b1^s) / sqrt((1-b2)/(1-b2^s)) x lr at s = 1001; SMET's by lr / W.

    eps is made negligible so that entries with tiny gradients do not damp the mean (with eps=1e-8
    a regrown entry with |g| ~ 1e-7 takes a visibly smaller step)."""
    s = 1001
    expected_naive = (0.1 / (1 - 0.9 ** s)) / math.sqrt(0.001 / (1 - 0.999 ** s))
    results = {}
    for method in ("naive_dst", "smet"):
        cfg = small_cfg(method, steps=1005)
        cfg.sparsity.update_every = 1000
        cfg.train.eval_every = 0
        cfg.optim.eps = 1e-30
        cfg.optim.regrow.warmup_steps = 20 if method == "smet" else 0
        res = train(cfg, corpus=CORPUS, callbacks=QUIET)
        results[method] = next(r for r in res.history if r["step"] == 1000)["stability/regrow_update_ratio"]
    assert results["naive_dst"] == pytest.approx(expected_naive, rel=2e-3)
    assert results["smet"] == pytest.approx(1 / 20, rel=2e-3)


def test_same_seed_same_losses_other_seed_differs():
    a = train(small_cfg(steps=25), corpus=CORPUS, callbacks=QUIET)
    b = train(small_cfg(steps=25), corpus=CORPUS, callbacks=QUIET)
    c = train(small_cfg(steps=25, seed=1), corpus=CORPUS, callbacks=QUIET)
    assert losses(a) == losses(b)
    assert losses(a) != losses(c)


@pytest.mark.parametrize("method,state", [("smet", "compact"), ("naive_dst", "dense_masked")])
def test_interrupted_and_resumed_run_is_bitwise_identical(tmp_path, method, state):
    cfg = small_cfg(method, steps=50, checkpoint_every=23)  # checkpoint inside a probe window
    cfg.optim.state = state
    cfg.sparsity.growth = "gradient" if method == "smet" else "random"
    full = train(cfg, corpus=CORPUS, callbacks=QUIET)
    with pytest.raises(Died):  # the process "dies" after step 30
        train(cfg, output_dir=tmp_path, corpus=CORPUS, callbacks=Callbacks(progress=None, should_stop=die_after(30)))
    ckpt = tmp_path / "checkpoints" / "step_23"
    assert (ckpt / "state.pt").is_file()
    # the run's folder means its newest checkpoint: step_23, not step_3 (after it by name) nor a
    # half-written step_40 without its state file
    shutil.copytree(ckpt, tmp_path / "checkpoints" / "step_3")
    (tmp_path / "checkpoints" / "step_40").mkdir()
    assert checkpoint.resolve(tmp_path) == checkpoint.resolve(tmp_path / "checkpoints") == ckpt
    cfg2 = small_cfg(method, steps=50, checkpoint_every=23, resume_from=str(tmp_path))
    cfg2.optim.state = state
    cfg2.sparsity.growth = cfg.sparsity.growth
    resumed = train(cfg2, output_dir=tmp_path / "b", corpus=CORPUS, callbacks=QUIET)
    assert losses(resumed) == losses(full)  # exact float equality, every step
    assert resumed.summary["summary/final_val_loss"] == full.summary["summary/final_val_loss"]
    for key in ("stability/probe_jump", "stability/update_rms_regrown", "stability/update_rms_surviving",
                "stability/adam_outlier_frac_regrown"):  # the checkpoint at 23 is inside their windows
        assert [r.get(key) for r in resumed.history] == [r.get(key) for r in full.history], key
        assert sum(r.get(key) is not None for r in full.history) == 4, key  # updates at 10, 20, 30, 40


def test_resume_refuses_missing_or_foreign_checkpoints(tmp_path):
    with pytest.raises(ConfigError, match="train.resume_from"):
        train(small_cfg(resume_from=str(tmp_path / "nope")), corpus=CORPUS, callbacks=QUIET)
    with pytest.raises(ConfigError, match=r"not allowed: a run's output folder, or a checkpoints/step_<N> folder "
                                          r"with state.pt \(there is none there\)"):
        train(small_cfg(resume_from=str(tmp_path)), corpus=CORPUS, callbacks=QUIET)  # a folder with none
    (tmp_path / "run-a").mkdir()
    with pytest.raises(ConfigError, match=f"not allowed: no such file or folder; did you mean {tmp_path}/run-a\\?"):
        train(small_cfg(resume_from=str(tmp_path / "run_a")), corpus=CORPUS, callbacks=QUIET)
    train(small_cfg(steps=10), output_dir=tmp_path, corpus=CORPUS, callbacks=QUIET)
    other = small_cfg(steps=20, resume_from=str(tmp_path / "checkpoints" / "step_10"))
    other.model.dim = 64
    with pytest.raises(ConfigError, match="model.dim"):
        train(other, corpus=CORPUS, callbacks=QUIET)
    state = tmp_path / "checkpoints" / "step_10" / "state.pt"
    assert {p.name for p in state.parent.iterdir()} == {"state.pt", "config.json"}  # no temporary files left
    state.write_bytes(state.read_bytes()[:1000])  # truncated, e.g. copied from a full disk
    with pytest.raises(ConfigError, match=r"train.resume_from=.*/state.pt is not a readable checkpoint"):
        train(small_cfg(steps=20, resume_from=str(state.parent)), corpus=CORPUS, callbacks=QUIET)


def test_divergence_stops_the_run_and_marks_it():
    cfg = small_cfg("naive_dst", steps=200)
    cfg.optim.lr = 1e35  # weights overflow float32 within a few steps: a genuine NaN loss
    cfg.optim.grad_clip = 0.0
    cfg.optim.warmup_steps = 0
    res = train(cfg, corpus=CORPUS, callbacks=QUIET)
    assert res.status == "DIVERGED"
    assert "diverged" in res.error and "step" in res.error
    assert res.summary["summary/diverged"] == 1.0
    assert res.history[-1]["train/diverged"] == 1.0
    assert not math.isfinite(res.history[-1]["train/loss"])
    assert len(res.history) < 200


def test_every_method_preset_trains_and_sets_its_keys():
    for method, keys in METHODS.items():
        cfg = small_cfg(method, steps=12)
        res = train(cfg, corpus=CORPUS, callbacks=QUIET)
        assert res.status == "FINISHED"
        density = res.summary["summary/density"]
        assert density == (1.0 if method == "dense" else pytest.approx(0.25, abs=0.01))
        has_updates = any("topo/density" in r for r in res.history)
        assert has_updates == (keys.get("sparsity.update_every", 10) > 0)
        # The preset's LR rule is what the sparse layers train at: 1/d for inverse, 1 for none.
        rule = keys["optim.lr_scaling.rule"]
        for row in res.history:
            if "train/lr_sparse" in row:
                assert row["train/lr_sparse"] / row["train/lr"] == pytest.approx(1 / density if rule == "inverse" else 1.0)
        if method == "dense":
            assert res.summary["summary/memory/state_ratio_vs_dense_adam"] == pytest.approx(1.0)


def test_bfloat16_autocast_follows_the_float32_run():
    """bf16 autocast (8-bit mantissa) changes every matmul a little, so the trajectory is close to the
    float32 one but not equal: within 1 % per step over 12 steps, and not bit-identical."""
    runs = {dtype: train(small_cfg(steps=12, dtype=dtype, grad_accum=2), corpus=CORPUS, callbacks=QUIET)
            for dtype in ("float32", "bfloat16")}
    f32, bf16 = (losses(runs[d]) for d in ("float32", "bfloat16"))
    assert bf16 == pytest.approx(f32, rel=1e-2) and bf16 != f32


def test_grad_accumulation_equals_bigger_batch():
    """Two micro-batches of 4 give the same step as one batch of 8 (the same 8 windows)."""
    from smet_lab.train import Run

    runs = [Run(small_cfg("smet", grad_accum=2), CORPUS), Run(small_cfg("smet", batch_size=8), CORPUS)]
    step_losses = [[r.train_step()[0] for _ in range(3)] for r in runs]
    assert step_losses[0] == pytest.approx(step_losses[1], rel=1e-5)
    for p, q in zip(runs[0].model.parameters(), runs[1].model.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


@pytest.mark.parametrize("key,value", [("max_steps", 0), ("max_steps", 2.5), ("batch_size", -1), ("device", "tpu"),
                                       ("dtype", "float16"), ("threads", -2)])
def test_bad_train_values(key, value):
    cfg = small_cfg()
    setattr(cfg.train, key, value)
    with pytest.raises(ConfigError, match=f"train.{key}"):
        train(cfg, corpus=CORPUS, callbacks=QUIET)


def test_progress_lines():
    lines = []
    train(small_cfg(steps=40), corpus=CORPUS, callbacks=Callbacks(progress=lines.append))
    assert len(lines) == 20 and lines[-1].startswith("step 40/40 loss")
    assert "tok/s" in lines[0] and "ETA" in lines[0]


@pytest.mark.parametrize("section,key,values", [
    ("sparsity", "distribution", ["uniform", "erk"]),
    ("sparsity", "growth", ["random", "gradient"]),
    ("sparsity", "prune_schedule", ["cosine", "constant", "linear", "wsd"]),
    ("sparsity", "block_size", [1, 16]),
    ("sparsity", "weights", ["dense", "compact"]),
    ("optim", "state", ["compact", "dense_masked"]),
    ("optim", "schedule", ["cosine", "constant"]),
    ("regrow", "warmup_kind", ["linear_lr", "moment_damping", "released"]),
    ("lr_scaling", "rule", ["none", "inverse", "inverse_sqrt", "power"]),
    ("lr_scaling", "scope", ["sparse", "all"]),
])
def test_every_option_trains_and_takes_effect(section, key, values):
    """Every option trains, and changes the run (13 steps, an update at step 10: a regrown weight first
    moves at step 11, which shows in the loss of step 12) against the first
    value (the default), except where it is the same math: dense_masked is the compact state's
    arithmetic on masked dense tensors; rule=power with power 1 is the inverse rule; compact weights
    are the dense weights' values without the zeros."""
    same_as = {("optim", "state", "dense_masked"): "compact", ("lr_scaling", "rule", "power"): "inverse",
               ("sparsity", "weights", "compact"): "dense"}
    trajectories = {}
    for value in values:
        cfg = small_cfg(steps=13)
        node = {"sparsity": cfg.sparsity, "optim": cfg.optim, "regrow": cfg.optim.regrow,
                "lr_scaling": cfg.optim.lr_scaling}[section]
        setattr(node, key, value)
        res = train(cfg, corpus=CORPUS, callbacks=QUIET)
        assert res.status == "FINISHED", (key, value)
        assert res.summary["summary/density"] == pytest.approx(0.25, abs=0.01)
        trajectories[value] = losses(res)
    for value in values[1:]:
        twin = same_as.get((section, key, value))
        if twin is not None:
            assert trajectories[value] == pytest.approx(trajectories[twin], rel=1e-5), (key, value)
        else:
            assert trajectories[value] != trajectories[values[0]], (key, value)


def test_update_rms_by_hand():
    """Block 1 regrown, blocks 0, 2, 3 survived. Step 1 at lr 0.1 moves them by 0.3 | 0.1, 0.2, -0.2;
    step 2 at lr 0.05 moves block 1 by -0.05 only. RMS of delta/lr: regrown sqrt((3^2 + 1^2) / 2) = sqrt(5),
    surviving sqrt((1 + 4 + 4 + 0 + 0 + 0) / 6) = sqrt(1.5)."""
    import torch.nn as nn

    from smet_lab.sparse import RegrowEvent, SparseTopology
    from smet_lab.train.probe import UpdateRMS

    model = nn.Linear(4, 2, bias=False)
    topo = SparseTopology.build(model, 0.5, dense_patterns=[])
    topo.layers[0].set_block_ids(torch.tensor([0, 1, 2, 3]))
    event = RegrowEvent(0, slots=torch.tensor([1]), old_blocks=torch.tensor([5]), new_blocks=torch.tensor([1]))
    rms = UpdateRMS.start(topo, [event])
    w = model.weight.detach().view(-1)
    w[torch.tensor([1, 0, 2, 3])] += torch.tensor([0.3, 0.1, 0.2, -0.2])
    rms.observe(topo, 0.1)
    w[1] -= 0.05
    rms.observe(topo, 0.05)
    out = rms.result(topo)
    assert out["stability/update_rms_regrown"] == pytest.approx(math.sqrt(5), rel=1e-6)
    assert out["stability/update_rms_surviving"] == pytest.approx(math.sqrt(1.5), rel=1e-6)
    assert out["stability/regrown_update_share/weight"] == pytest.approx(1.0)  # the only changed layer


def test_regrown_update_share_per_layer_by_hand(monkeypatch):
    """Two layers, a sample of 1 block per layer and kind (the first). Layer a regrows blocks 0 and 1;
    block 0 moves by 0.2 at lr 0.1: (0.2/0.1)^2 = 4, scaled by 2 regrown / 1 sampled = 8. Layer b
    regrows blocks 0, 1, 2; block 0 moves by 0.1: 1, scaled by 3 / 1 = 3. Shares 8/11 and 3/11 (the
    unsampled blocks' moves do not count)."""
    import torch.nn as nn

    from smet_lab.sparse import RegrowEvent, SparseTopology
    from smet_lab.train import probe

    model = nn.Sequential(nn.Linear(4, 2, bias=False), nn.Linear(4, 2, bias=False))
    topo = SparseTopology.build(model, 0.5, dense_patterns=[])
    for layer in topo.layers:
        layer.set_block_ids(torch.tensor([0, 1, 2, 3]))
    events = [RegrowEvent(0, slots=torch.tensor([0, 1]), old_blocks=torch.tensor([6, 7]), new_blocks=torch.tensor([1, 0])),
              RegrowEvent(1, slots=torch.tensor([0, 1, 2]), old_blocks=torch.tensor([5, 6, 7]),
                          new_blocks=torch.tensor([2, 0, 1]))]
    monkeypatch.setattr(probe._spread, "__defaults__", (1,))
    rms = probe.UpdateRMS.start(topo, events)
    model[0].weight.detach().view(-1)[:2] += torch.tensor([0.2, 0.7])
    model[1].weight.detach().view(-1)[:3] += torch.tensor([0.1, 0.5, 0.5])
    rms.observe(topo, 0.1)
    out = rms.result(topo)
    assert out["stability/regrown_update_share/0.weight"] == pytest.approx(8 / 11, rel=1e-6)
    assert out["stability/regrown_update_share/1.weight"] == pytest.approx(3 / 11, rel=1e-6)
    # resumed from a checkpoint mid-window: the same shares
    again = probe.UpdateRMS.from_state(rms.state_dict(), "cpu")
    assert again.result(topo) == out


@pytest.mark.parametrize("weights", ["dense", "compact"])
def test_activation_checkpointing_changes_no_number(weights):
    """Recomputing each block in backward gives the same gradients, so the same losses bit for bit (RigL's
    dense gradient included); the eval path (no grad) is unaffected."""
    runs = []
    for on in (False, True):
        cfg = small_cfg("smet", steps=25, activation_checkpointing=on)
        cfg.sparsity.weights, cfg.sparsity.growth = weights, "gradient"
        result = train(cfg, corpus=CORPUS, callbacks=QUIET)
        runs.append((losses(result), result.summary["summary/final_val_loss"]))
    assert len(runs[0][0]) == 25 and runs[0] == runs[1]


def test_more_threads_than_cores_are_refused():
    from smet_lab.train.checks import check_threads

    check_threads(0, 2)  # torch's default
    check_threads(2, 2)
    check_threads(1, 2, processes=4)  # one thread per process is never refused
    with pytest.raises(ConfigError, match=r"^train.threads=3 is not allowed: at most 2: 3 threads exceed the 2 cores"):
        check_threads(3, 2)
    with pytest.raises(ConfigError, match=r"^train.threads=2 is not allowed: at most 1: 2 processes x 2 threads exceed "
                                          r"the 2 cores"):
        check_threads(2, 2, processes=2)


@pytest.mark.parametrize("method,steps", [("smet", 10), ("smet", 11), ("naive_dst", 9), ("static", 30), ("dense", 5)])
def test_the_no_update_note_says_exactly_when_a_run_makes_no_topology_update(method, steps):
    import dataclasses

    from smet_lab.train.checks import no_update_note

    cfg = small_cfg(method, steps=steps)  # an update every 10 steps
    result = train(cfg, corpus=CORPUS, callbacks=QUIET)
    updates = [r["step"] for r in result.history if r.get("topo/density") is not None]
    dynamic = method in ("smet", "naive_dst")
    assert bool(no_update_note(dataclasses.asdict(cfg))) == (dynamic and not updates), updates
    assert updates == ([10] if (method, steps) == ("smet", 11) else [])
