"""Data-parallel runs (smet_lab.train.distributed): 2 gloo processes started by torchrun, as a user
types it, against a 1-process run of the same global batch computed here in-process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from helpers import cli_env, e2e, free_port, run_cli
from smet_lab.compose import compose, to_run_config
from smet_lab.config import ConfigError
from smet_lab.data import TokenBatcher
from smet_lab.sparse import SparseTopology
from smet_lab.train import QUIET, train
from smet_lab.train.distributed import World, check_world, topology_checksum

TOL = 1e-5  # the bound on |loss(2 processes) - loss(1 process)|
LOSSES = ("train/loss", "val/loss", "stability/probe_loss")


def torchrun(args: list[str], cwd, nproc: int = 2, timeout: float = 300, env_extra: dict | None = None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "smet_lab", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=cli_env(env_extra))


def overrides(method: str = "smet") -> list[str]:
    """200 steps, a topology update and a checkpoint every 50, one thread per process."""
    return ["tracking=none", f"method={method}", "train.max_steps=200", "sparsity.update_every=50",
            "train.checkpoint_every=50", "train.threads=1"]


def reference(args: list[str], out: Path, resume_from: Path | None = None) -> dict:
    """The same config as the command line composes, trained here in one process."""
    cfg = to_run_config(compose(args))
    cfg.train.resume_from = str(resume_from) if resume_from else None
    threads = torch.get_num_threads()
    try:
        result = train(cfg, output_dir=out, callbacks=QUIET)
    finally:
        torch.set_num_threads(threads)  # train.threads=1 must not slow the tests that follow
    assert result.status == "FINISHED"
    return curves(result.history)


def curves(history_or_parquet) -> dict[str, pd.Series]:
    df = pd.read_parquet(history_or_parquet) if isinstance(history_or_parquet, Path) else pd.DataFrame(history_or_parquet)
    df = df.set_index("step")
    return {k: df[k].dropna() for k in LOSSES}


def assert_close(mine: dict, ref: dict, steps=None) -> None:
    for key in LOSSES:
        a, b = mine[key], ref[key]
        if steps is not None:
            a, b = a[a.index.isin(steps)], b[b.index.isin(steps)]
        assert list(a.index) == list(b.index) and len(a), key
        assert (a - b).abs().max() <= TOL, (key, (a - b).abs().max())


def topology(ckpt_dir: Path) -> dict:
    return torch.load(ckpt_dir / "state.pt", weights_only=False)["topology"]


def assert_same_topology(a: dict, b: dict) -> None:
    assert a["layers"].keys() == b["layers"].keys() and len(a["layers"]) == 14
    for name, ids in a["layers"].items():
        assert torch.equal(ids, b["layers"][name]), name


# ----------------------------------------------------------------------------------- units
def test_batch_shares_of_the_processes_make_the_global_batch():
    tokens = torch.arange(5000) % 97
    whole = TokenBatcher(tokens, 8, 16, seed=3)
    parts = [TokenBatcher(tokens, 8, 16, seed=3, rank=r, world=2) for r in range(2)]
    for _ in range(40):  # crosses an epoch boundary (312 windows / 8)
        x, y = whole.next_batch()
        shares = [p.next_batch() for p in parts]
        assert torch.equal(torch.cat([s[0] for s in shares]), x) and torch.equal(torch.cat([s[1] for s in shares]), y)
        assert [p.state_dict() for p in parts] == [whole.state_dict()] * 2  # the position is global


def test_world_checks_name_the_key():
    check_world(16, 2, "auto", "auto")
    with pytest.raises(ConfigError, match=r"train.batch_size=15 is not allowed: a multiple of 2"):
        check_world(15, 2, "auto", "auto")
    check_world(15, 1, "auto", "auto")
    with pytest.raises(ConfigError, match="train.dist_backend"):
        check_world(16, 2, "mpi", "auto")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="NCCL needs CUDA"):
            check_world(16, 2, "nccl", "auto")


def test_single_process_world_changes_nothing():
    t = torch.tensor([1.0, 2.0])
    assert World().average([t]) == 0 and torch.equal(t, torch.tensor([1.0, 2.0]))
    assert World().any(True) and not World().any(False)


def test_topology_checksum_sees_one_moved_block():
    lin = torch.nn.Linear(16, 16, bias=False)
    model = torch.nn.Sequential(lin)
    topo = SparseTopology.build(model, 0.25, "uniform", 1, [], seed=0)
    before = topology_checksum(topo)
    layer = topo.layers[0]
    ids = layer.block_ids().long()
    free = next(i for i in range(layer.n_blocks) if i not in set(ids.tolist()))
    layer.replace(ids[:1], torch.tensor([free]))
    after = topology_checksum(topo)
    assert after[0] == before[0] and not torch.equal(before, after)
    assert int(after[1]) == int(before[1]) - int(ids[0]) + free  # the id sum, by hand


# --------------------------------------------------------------------- 2 processes vs 1
@pytest.mark.e2e  # real processes, ~10-30 s: in CI's set, not in the quick `pytest -q`
def test_two_processes_equal_one_and_resume_across_world_sizes(tmp_path):
    """smet, 200 steps, an update every 50: 2 processes == 1 process to 1e-5, the same topology after
    every update (the checkpoints at steps 50, 100 and 150 follow one; 200 is the end), and a checkpoint
    of either resumes on the other world size."""
    args = overrides("smet")
    ref = reference(args, tmp_path / "one")
    proc = torchrun(args + [f"hydra.run.dir={tmp_path}/two"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "smet_lab: done" in proc.stdout and proc.stdout.count("smet_lab: done") == 1  # the first process reports
    two = curves(tmp_path / "two" / "metrics.parquet")
    assert_close(two, ref)
    assert len(two["train/loss"]) == 200
    for step in (50, 100, 150, 200):
        assert_same_topology(topology(tmp_path / "two" / "checkpoints" / f"step_{step}"),
                             topology(tmp_path / "one" / "checkpoints" / f"step_{step}"))
    # 2 -> 1: the 2-process checkpoint at step 100, continued here in one process
    resumed = reference(args, tmp_path / "resumed_one", tmp_path / "two" / "checkpoints" / "step_100")
    assert_close(resumed, ref, steps=range(101, 201))
    # 1 -> 2: the 1-process checkpoint at step 100, continued by 2 processes; they tokenize the corpus
    # into a cache (one writes it, the other waits and reads it) and train on it as on the corpus in memory.
    proc = torchrun(args + [f"hydra.run.dir={tmp_path}/resumed_two", f"data.cache_dir={tmp_path}/cache",
                            f"train.resume_from={tmp_path / 'one' / 'checkpoints' / 'step_100'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_close(curves(tmp_path / "resumed_two" / "metrics.parquet"), ref, steps=range(101, 201))
    assert len(list((tmp_path / "cache").glob("*/meta.json"))) == 1


@pytest.mark.slow
@pytest.mark.parametrize("method,extra", [("naive_dst", []), ("smet", ["sparsity.growth=gradient"]),
                                          ("smet", ["sparsity.weights=compact"])])
def test_two_processes_equal_one_for_naive_dst_gradient_growth_and_compact_weights(tmp_path, method, extra):
    args = overrides(method) + extra
    ref = reference(args, tmp_path / "one")
    proc = torchrun(args + [f"hydra.run.dir={tmp_path}/two"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_close(curves(tmp_path / "two" / "metrics.parquet"), ref)
    for step in (50, 100, 150, 200):
        assert_same_topology(topology(tmp_path / "two" / "checkpoints" / f"step_{step}"),
                             topology(tmp_path / "one" / "checkpoints" / f"step_{step}"))


# ------------------------------------------------------------------------- failures
RULES = '''
import torch, torch.distributed as dist
from smet_lab.extend import register_growth

@register_growth("per_process")
def per_process(ctx):  # a bug: each process draws its own blocks
    free = torch.ones(ctx.n_blocks, dtype=torch.bool)
    free[ctx.active] = False
    free[ctx.excluded] = False
    ids = free.nonzero().squeeze(1)
    return ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(dist.get_rank()))[:ctx.n]]

@register_growth("fails_on_rank_1")
def fails_on_rank_1(ctx):
    if dist.get_rank() == 1:
        raise MemoryError("rank 1 ran out of memory")
    free = torch.ones(ctx.n_blocks, dtype=torch.bool)
    free[ctx.active] = False
    free[ctx.excluded] = False
    return free.nonzero().squeeze(1)[:ctx.n]
'''


@pytest.fixture
def rules(tmp_path) -> Path:
    path = tmp_path / "dist_rules.py"
    path.write_text(RULES)
    return path


@pytest.mark.e2e  # 2 processes, ~15 s: the dying process below is the developer's loop's multi-process case
def test_diverging_topologies_stop_the_run_with_one_line(tmp_path, rules):
    proc = torchrun([f"extensions=[{rules}]", "sparsity.growth=per_process", "train.max_steps=20",
                     "sparsity.update_every=5", "train.probe_window=5", "train.threads=1", f"hydra.run.dir={tmp_path}/run",
                     f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"], tmp_path, timeout=180)
    assert proc.returncode != 0
    assert "the topology after the update at step 5 differs between the 2 processes" in proc.stderr
    from helpers import all_runs

    _, runs = all_runs(tmp_path / "mlflow.db")
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "differs between the 2 processes" in runs[0].data.tags["smet.error"]


def test_a_dying_process_fails_the_run_without_a_hang(tmp_path, rules):
    proc = torchrun([f"extensions=[{rules}]", "sparsity.growth=fails_on_rank_1", "train.max_steps=20",
                     "sparsity.update_every=5", "train.probe_window=5", "train.threads=1", f"hydra.run.dir={tmp_path}/run",
                     f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"], tmp_path, timeout=180)
    assert proc.returncode != 0
    assert "rank 1 ran out of memory" in proc.stderr and "rank      : 1" in proc.stderr  # torchrun's summary
    from helpers import all_runs

    _, runs = all_runs(tmp_path / "mlflow.db")
    assert [r.info.status for r in runs] == ["FAILED"]


# Three cases in the developer's loop, every case with -m "not slow" (CI): each is a process.
BAD = [
    (["train.batch_size=15"], {"WORLD_SIZE": "2"}, "train.batch_size=15 is not allowed: a multiple of 2"),
    (["+sweep=smoke"], {"WORLD_SIZE": "2"}, "+sweep cannot run under torchrun"),
    e2e(["train.dist_backend=mpi"], {}, "train.dist_backend"),
    e2e(["+sweep=smoke", "ray.workers_per_trial=0"], {}, "ray.workers_per_trial=0 is not allowed: a positive integer"),
    e2e(["+sweep=smoke", "ray.workers_per_trial=2", "ray.cpus_per_trial=1", "train.batch_size=7"], {},
        "train.batch_size=7 is not allowed: a multiple of 2, the number of processes (ray.workers_per_trial)"),
    (["+sweep=smoke", "ray.workers_per_trial=3", "ray.cpus_per_trial=1", "ray.num_cpus=2"], {},
     "ray.workers_per_trial=3 is not allowed: at most 2: 3 processes x ray.cpus_per_trial=1 CPUs do not fit"),
    e2e(["train.dist_backend=gloo"], {}, "train.dist_backend=gloo is not allowed: ignored with one process"),
]
if not torch.cuda.is_available():
    BAD.append(e2e(["train.dist_backend=nccl"], {"WORLD_SIZE": "2"}, "NCCL needs CUDA"))


@pytest.mark.parametrize("args,env,message", BAD)
def test_bad_distributed_input_one_line_exit_2(tmp_path, args, env, message):
    proc = run_cli([*args, f"hydra.run.dir={tmp_path}/run", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                    f"ray.storage={tmp_path}/sweeps" if "+sweep=smoke" in args else "tracking.enabled=true"],
                   cwd=tmp_path, timeout=120, env_extra={"RANK": "0", **env})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("smet_lab: error: ") and message in lines[0], proc.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "sweeps").exists()


# ------------------------------------------------------------------- Ray Train in sweeps
@pytest.mark.e2e
def test_a_sweep_of_two_process_trials_matches_one_process_and_resumes_after_ctrl_c(tmp_path):
    """+sweep=smoke ray.workers_per_trial=2: each trial a Ray Train run of 2 gloo processes. Ctrl-C
    once the second trial has a checkpoint; the same command resumes it from there. Every trial ends
    with the losses of the same config trained here in one process (to 1e-5)."""
    import signal
    import time

    from helpers import all_runs, start_cli
    from smet_lab.compose import group_composer
    from smet_lab.config import run_config_from
    from smet_lab.sweep.runner import plan

    args = ["+sweep=smoke", "ray.workers_per_trial=2", "ray.cpus_per_trial=1", "train.max_steps=300",
            "train.checkpoint_every=50", f"ray.storage={tmp_path}/sw", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    proc = start_cli(args, tmp_path, stderr=subprocess.STDOUT)
    second = tmp_path / "sw" / "smoke" / "train"
    deadline = time.time() + 400
    while time.time() < deadline and not list(second.glob("*_00001/checkpoint_*")) and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 130 and "interrupted: run the same command again" in out, out[-3000:]
    _, runs = all_runs(tmp_path / "mlflow.db")
    stopped = [r.data.tags["smet.method"] for r in runs
               if r.data.tags.get("smet.kind") == "trial" and r.info.status != "FINISHED"]
    assert len(stopped) == 1, out[-3000:]
    again = run_cli(args, cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "2/2 trials ended (2 finished" in again.stdout

    client, runs = all_runs(tmp_path / "mlflow.db")
    children = {r.data.tags["smet.method"]: r for r in runs if r.data.tags.get("smet.kind") == "trial"}
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}
    assert int(children[stopped[0]].data.tags["smet.resumed_from_step"]) >= 50  # from its checkpoint, not step 0
    cfg = compose(args)
    configs = plan(cfg, group_composer(args))[2]
    for key, config in configs.items():
        run = children[config["method"]]
        assert run.data.metrics["summary/world_size"] == 2 and run.data.metrics["summary/steps"] == 300
        assert run.data.metrics["summary/comm_bytes_per_step"] > 0
        logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
        assert sorted(logged) == list(range(5, 301, 5))
        result = train(run_config_from(config), callbacks=QUIET)
        ref = {r["step"]: r["train/loss"] for r in result.history}
        assert max(abs(logged[s] - ref[s]) for s in logged) <= TOL
        assert abs(run.data.metrics["summary/final_val_loss"] - result.summary["summary/final_val_loss"]) <= TOL
    assert (tmp_path / "sw" / "smoke" / "report" / "report.html").is_file()


@pytest.mark.slow
def test_a_failing_two_process_trial_does_not_take_the_others_and_is_retried(tmp_path):
    from helpers import all_runs

    args = ["+sweep=smoke", "ray.workers_per_trial=2", "ray.cpus_per_trial=1", f"ray.storage={tmp_path}/sw",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    proc = run_cli(args, cwd=tmp_path, timeout=600,
                   env_extra={"SMET_LAB_INJECT_FAILURE": "naive_dst", "SMET_LAB_INJECT_AT_STEP": "25"})
    assert proc.returncode == 1 and "injected failure" in proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]
    _, runs = all_runs(tmp_path / "mlflow.db")
    status = {r.data.tags["smet.method"]: r.info.status for r in runs if r.data.tags.get("smet.kind") == "trial"}
    assert status == {"naive_dst": "FAILED", "smet": "FINISHED"}
    retry = run_cli([*args, "sweep.retry_failed=true"], cwd=tmp_path, timeout=600)
    assert retry.returncode == 0, retry.stdout[-3000:] + retry.stderr[-3000:]
    _, runs = all_runs(tmp_path / "mlflow.db")
    naive = next(r for r in runs if r.data.tags.get("smet.method") == "naive_dst")
    assert naive.info.status == "FINISHED" and naive.data.tags["smet.resumed_from_step"] == "20"
    assert naive.data.metrics["summary/steps"] == 60 and naive.data.metrics["summary/world_size"] == 2
