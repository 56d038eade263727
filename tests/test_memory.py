"""Byte accounting of the optimizer layouts against hand-computed sizes, and the memory benchmark's
measurement of one configuration (fast: tiny layers and a tiny model)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from smet_lab.config import ModelConfig
from smet_lab.model import LLaMA
from smet_lab.optim import SMETAdam
from smet_lab.sparse import SparseTopology
from smet_lab.sparse.ids import moved_from
from smet_lab.sparse.layer import SparseLayer
from smet_lab.train.memory import (analytic_state_bytes, float32_floor, memory_summary, optimizer_layout_bytes,
                                   peak_rss_bytes, position_bytes, torch_adam_state_bytes)

ROOT = Path(__file__).resolve().parents[1]


class Odd(nn.Module):
    """A 10 x 30 weight: 300 entries, i.e. two chunks of 256 blocks at B = 1 (one partly filled)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(10, 30))


def test_position_store_round_trip_and_bytes():
    layer = SparseLayer("w", nn.Parameter(torch.zeros(10, 30)), 1, torch.tensor([299, 0, 256, 255], dtype=torch.int32))
    assert layer.block_ids().tolist() == [0, 255, 256, 299] and layer.block_ids().dtype == torch.int32
    assert layer.offsets.tolist() == [0, 255, 0, 43] and layer.offsets.dtype == torch.uint8
    assert layer.counts.tolist() == [2, 2] and layer.counts.dtype == torch.int16
    assert layer.index_bytes() == 4 * 1 + 2 * 2  # a uint8 per active block + an int16 per chunk
    layer.set_block_ids(torch.arange(256))  # a full chunk: its count, 256, needs the int16
    assert layer.counts.tolist() == [256, 0] and torch.equal(layer.block_ids(), torch.arange(256, dtype=torch.int32))
    slots, old_slots = layer.replace(torch.tensor([3, 7]), torch.tensor([280, 257]))
    assert layer.block_ids()[slots].tolist() == [280, 257] and old_slots.tolist() == [3, 7]
    assert slots.dtype == old_slots.dtype == torch.int32
    # every survivor's new slot comes from its old one; -1 marks the two new blocks (slots 254, 255)
    assert moved_from(256, old_slots, slots).tolist() == list(range(3)) + list(range(4, 7)) + list(range(8, 256)) + [-1, -1]
    with pytest.raises(ValueError):
        layer.replace(torch.tensor([3]), torch.tensor([1]))  # block 3 is not active any more


def test_moved_from_matches_a_brute_force_walk():
    gen = torch.Generator().manual_seed(0)
    for k, n in [(1000, 300), (10, 0), (10, 10), (7, 1)]:
        old_slots = torch.randperm(k, generator=gen)[:n]
        new_slots = torch.randperm(k, generator=gen)[:n]
        survivors_old = [i for i in range(k) if i not in set(old_slots.tolist())]
        survivors_new = [i for i in range(k) if i not in set(new_slots.tolist())]
        expected = [-1] * k
        for a, b in zip(survivors_old, survivors_new):
            expected[b] = a
        assert moved_from(k, old_slots, new_slots).tolist() == expected


@pytest.mark.parametrize("block_size", [1, 2])
def test_layout_bytes_of_a_small_layer_by_hand(block_size):
    model = Odd()
    topo = SparseTopology.build(model, 0.5, block_size=block_size, dense_patterns=[])
    n_blocks, k = 300 // block_size, 150 // block_size  # 150 active weights
    chunks = {1: 2, 2: 1}[block_size]  # ceil(300 / 256) = 2; ceil(150 / 256) = 1
    assert position_bytes(topo) == k + 2 * chunks == topo.index_bytes()
    assert float32_floor(topo) == 150 * 12 == 1800
    smet = SMETAdam(model, topo, lr=1e-3, reset_step=True, warmup_steps=10)
    # grad, m, v + positions + cohort id per active block + one int64 birth step (cohort 0)
    expected = 1800 + (k + 2 * chunks) + k + 8  # B=1: 1800+154+150+8 = 2112; B=2: 1800+77+75+8 = 1960
    assert expected == {1: 2112, 2: 1960}[block_size]
    assert smet.state_bytes() == expected == optimizer_layout_bytes(smet)
    smet.remove_hooks()
    naive = SMETAdam(model, topo, lr=1e-3, reset_step=False, warmup_steps=0)
    assert naive.state_bytes() == 1800 + k + 2 * chunks == analytic_state_bytes(topo, "compact", needs_step=False)
    naive.remove_hooks()
    masked = SMETAdam(model, topo, lr=1e-3, reset_step=True, warmup_steps=10, state="dense_masked")
    # dense grad, m, v of all 300 weights + bool mask and int16 age per block + the positions
    assert masked.state_bytes() == 300 * 12 + n_blocks * (1 + 2) + k + 2 * chunks == optimizer_layout_bytes(masked)
    masked.remove_hooks()
    # The released SMET layout: int32 index + int16 step per active block.
    assert analytic_state_bytes(topo, "released", True) == 1800 + 6 * k


def test_torch_adam_bytes_counted_from_its_tensors():
    model = nn.Linear(8, 4)  # 32 + 4 = 36 parameters in 2 tensors
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    counted = torch_adam_state_bytes(model, opt)
    assert counted["grad"] == 36 * 4
    assert counted["state"] == 36 * 4 * 2 + 2 * 4  # exp_avg + exp_avg_sq, and a float32 step per tensor


@pytest.mark.parametrize("block_size", [1, 16, 128])
def test_llama_sparse_state_under_the_goal(block_size):
    cfg = ModelConfig(dim=128, n_layers=2, n_heads=4, ffn_dim=384, vocab_size=256, seq_len=32)
    model = LLaMA(cfg)
    topo = SparseTopology.build(model, 0.25, block_size=block_size)
    opt = SMETAdam(model, topo, lr=1e-3, warmup_steps=100)
    ratio = opt.state_bytes("sparse") / (12 * topo.numel)
    assert ratio <= 0.30  # goal; the released layout's 18 B per active weight gives 0.375 at B=1
    assert opt.state_bytes("sparse") == optimizer_layout_bytes(opt)
    summary = memory_summary(model, opt)
    assert summary["summary/memory/sparse_state_ratio_vs_dense_adam"] == pytest.approx(ratio)


def kib_field(path: str, key: str) -> int:
    """A "Key:   123 kB" line of a /proc file, in bytes."""
    line = next(line for line in Path(path).read_text().splitlines() if line.startswith(key + ":"))
    return int(line.split()[1]) * 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc only")
def test_peak_rss_is_the_kernels_high_water_mark_in_bytes():
    """getrusage's peak (KiB on Linux) in bytes, against the high-water mark /proc/self/status reports
    (VmHWM, read before it). Not equal: getrusage sums the per-CPU RSS counters approximately (a few
    hundred KiB low here) and may count the pre-exec image; a KiB/bytes mix-up would be off 1024x."""
    before = kib_field("/proc/self/status", "VmHWM")
    assert 0.9 * before <= peak_rss_bytes() <= kib_field("/proc/meminfo", "MemTotal")


def load_benchmark():
    spec = importlib.util.spec_from_file_location("memory_benchmark", ROOT / "benchmarks" / "memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("method", ["dense", "naive_dst", "smet", "smet_compact"])
def test_memory_benchmark_measures_one_configuration(method):
    bench = load_benchmark()
    cfg = {"model": "tiny", "method": method, "density": 0.25 if method != "dense" else 1.0, "block_size": 1,
           "vocab": 256, "batch": 2, "seq_len": 16, "steps": 2, "device": "cpu", "threads": 0}
    r = bench.measure_one(cfg)
    n = r["params"]
    assert n == 2 * (4 * 64 * 64 + 3 * 64 * 176 + 2 * 64) + 2 * 256 * 64 + 64  # the dense model's count
    sparse_weights = r["sparse_params"] // 4 if method == "smet_compact" else r["sparse_params"]
    assert r["weights"] == 4 * (n - r["sparse_params"] + sparse_weights) and r["dense_adam"] == 12 * n
    assert r["persistent"] == r["weights"] + r["grads"] + r["state"] and r["dense_adam_persistent"] == 16 * n
    if method == "dense":
        assert r["grads"] == 4 * n and r["analytic_min"] == 12 * n
        assert r["state"] == 8 * n + 4 * len(list(LLaMA(ModelConfig(dim=64, n_layers=2, n_heads=4, ffn_dim=176,
                                                                          vocab_size=256, seq_len=16)).parameters()))
    else:
        assert r["sparse_params"] > 0
        if method.startswith("smet"):  # the update after step 1 added a cohort; the state is exactly the formula
            assert r["cohorts"] == 2 and r["sparse_state"] <= 0.30 * r["sparse_dense_adam"]
            assert r["grads"] == 4 * (n - r["sparse_params"]) + 4 * r["sparse_params"] // 4  # compact sparse grads
            assert r["grads"] + r["state"] == r["analytic_min"]
        else:  # dense-size sparse gradients and moments + mask
            assert r["grads"] == 4 * n and r["sparse_state"] > r["sparse_dense_adam"]
    # Peak RSS cannot be below the RSS /proc/self/statm gave at the start of the same measurement, up
    # to the kernel's RSS counters, which are per-CPU and approximate (188 KiB apart seen in a test run).
    assert r["peak_bytes"] >= r["rss_after_import"] - 2**20
    header, _, row = bench.table([r]).splitlines()
    cells = dict(zip(header.strip("| ").split(" | "), row.strip("| ").split(" | ")))
    gs = r["grads"] + r["state"]
    assert cells["method"] == {"dense": "dense Adam", "naive_dst": "naive_dst (dense_masked)",
                               "smet": "smet (compact state)", "smet_compact": "smet (compact state + weights)"}[method]
    assert cells["weights MiB"] == f"{r['weights'] / 2**20:,.1f}"
    assert cells["grad+state x dense Adam"] == f"{gs / (12 * n):.3f}"
    assert cells["x analytic min"] == ("1.000" if method.startswith("smet") else f"{gs / r['analytic_min']:.3f}")
    assert cells["persistent x dense Adam"] == f"{(r['weights'] + gs) / (16 * n):.3f}"
    if method == "dense":
        assert cells["sparse layers x dense Adam"] == "-"


def test_every_memory_role_is_a_declared_metric():
    """summary/memory/bytes/<role> for every role either layout reports is in the metric registry."""
    from smet_lab.metrics import METRICS
    from smet_lab.train.memory import training_bytes_by_role

    for state, weights in (("compact", "compact"), ("dense_masked", "dense")):
        model = LLaMA(ModelConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64, vocab_size=64, seq_len=8))
        topo = SparseTopology.build(model, 0.5, weights=weights)
        roles = training_bytes_by_role(model, SMETAdam(model, topo, warmup_steps=5, state=state))
        assert all(f"summary/memory/bytes/{role}" in METRICS for role in roles), roles
        assert roles["weights/sparse"] == 4 * topo.n_active_weights if weights == "compact" else 4 * topo.numel


RELEASED_RUN = """
import json, platform
from smet_lab.config import ModelConfig, RunConfig, DataConfig
from smet_lab.train import QUIET, train
from smet_lab.train.memory import release_freed_memory
cfg = RunConfig()
cfg.model = ModelConfig(name="t", dim=32, n_layers=1, n_heads=2, ffn_dim=64, seq_len=16)
cfg.data = DataConfig(name="synthetic", max_tokens=20_000)
cfg.train.max_steps, cfg.train.batch_size, cfg.sparsity.update_every = 25, 4, 10
cfg.train.eval_every, cfg.train.probe_batch_size, cfg.train.release_memory = 0, 4, {release}
r = train(cfg, callbacks=QUIET)
print(json.dumps({{"losses": [h["train/loss"] for h in r.history], "applies": release_freed_memory(),
                   "glibc": platform.libc_ver()[0] == "glibc"}}))
"""


@pytest.mark.e2e  # two fresh processes, ~10 s: in CI's set, not in the quick `pytest -q`
def test_release_memory_changes_no_number():
    """train.release_memory only changes where freed memory goes (in fresh processes: it is process-wide)."""
    import json
    import subprocess
    import sys

    out = [json.loads(subprocess.run([sys.executable, "-c", RELEASED_RUN.format(release=flag)], capture_output=True,
                                     text=True, check=True, timeout=300).stdout.splitlines()[-1]) for flag in (True, False)]
    assert len(out[0]["losses"]) == 25 and out[0]["losses"] == out[1]["losses"]
    assert out[0]["applies"] == out[0]["glibc"]  # mallopt exists exactly on glibc


def test_preflight_refuses_a_run_whose_memory_floor_exceeds_the_machine(monkeypatch):
    """check_config's floor: float32 weights (the model is built dense first) + gradient and Adam moments of
    the dense parameters and of the active sparse entries, counted here from the real model and topology;
    a machine with exactly that much passes, one byte less is refused, naming the model."""
    from smet_lab.config import ConfigError, RunConfig
    from smet_lab.methods import apply_method
    from smet_lab.train import checks

    cfg = apply_method(RunConfig(), "smet")
    model = LLaMA(cfg.model)
    topo = SparseTopology.build(model, cfg.sparsity.density)
    n_all = sum(p.numel() for p in model.parameters())
    n_dense, active = n_all - topo.numel, topo.n_active_weights
    floors = {"dense": 4 * n_all + 12 * (n_dense + active),
              "compact": max(4 * n_all, 4 * (n_dense + active) + 12 * (n_dense + active))}
    for weights, floor in floors.items():
        cfg.sparsity.weights = weights
        monkeypatch.setattr(checks, "memory_bytes", lambda device, floor=floor: floor)
        checks.check_config(cfg)
        monkeypatch.setattr(checks, "memory_bytes", lambda device, floor=floor: floor - 1)
        with pytest.raises(ConfigError, match=f"model='tiny' is not allowed: its weights, gradients and Adam state "
                                              f"need >= .* {weights} weights"):
            checks.check_config(cfg)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two torchrun processes on this host: two replicas
    monkeypatch.setattr(checks, "memory_bytes", lambda device: 2 * floors["compact"] - 1)
    with pytest.raises(ConfigError, match="2 processes"):
        checks.check_config(cfg)


def test_machine_memory_is_at_most_the_kernels_total():
    from smet_lab.train.checks import memory_bytes

    total_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                     if line.startswith("MemTotal:"))
    assert 0 < memory_bytes(torch.device("cpu")) <= total_kib * 1024


@pytest.mark.parametrize("key,value,says", [
    ("block_size", 7, "sparsity.block_size=7 is not allowed: must divide the size of layers.0.attention.wq.weight (4096)"),
    ("dense_patterns", ["("], "sparsity.dense_patterns='(' is not allowed: a regular expression"),
    ("dense_patterns", [".*"], "is not allowed: match every weight matrix: nothing would be sparse"),
])
def test_preflight_checks_what_depends_on_the_layer_shapes(key, value, says):
    """Refused before anything is built (the model's shapes come from the meta device)."""
    from smet_lab.config import ConfigError, RunConfig
    from smet_lab.methods import apply_method
    from smet_lab.train.checks import check_config

    cfg = apply_method(RunConfig(), "smet")
    setattr(cfg.sparsity, key, value)
    with pytest.raises(ConfigError) as e:
        check_config(cfg)
    assert says in str(e.value)
