"""Ray Tune sweeps: grids, precedence, end-to-end MLflow layout, failing trials, interrupt + resume."""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf
import torch

from helpers import all_runs as runs_of, run_cli, start_cli
from smet_lab.compose import compose, group_composer
from smet_lab.preflight import CONF_DIR
from smet_lab.config import ConfigError
from smet_lab.grid import expand, trial_configs
from smet_lab.sweep.folder import GRID_FILE, write_grid
from smet_lab.sweep.runner import plan, sweep_config

SWEEPS = sorted(p.stem for p in (CONF_DIR / "sweep").glob("*.yaml"))


def expected_trials(name: str) -> int:
    """Trials per seed of a sweep file, counted from the YAML itself: the grid's product plus the extra
    trials that are not already grid points."""
    from omegaconf import OmegaConf

    spec = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "sweep" / f"{name}.yaml"))["sweep"]

    def flat(node, prefix=""):
        return {k: v for key, sub in node.items() for k, v in (flat(sub, f"{prefix}{key}.") if isinstance(sub, dict)
                                                                  else {f"{prefix}{key}": sub}).items()}

    axes = flat(spec.get("params") or {})
    points = {frozenset(zip(axes, combo)) for combo in itertools.product(*axes.values())}
    points |= {frozenset((k, v) for k, v in flat(extra).items()) for extra in spec.get("extra_trials") or []}
    return len(points)


@pytest.mark.parametrize("name", SWEEPS)
def test_every_sweep_composes_and_expands(name):
    from omegaconf import OmegaConf

    seeds = OmegaConf.load(CONF_DIR / "sweep" / f"{name}.yaml").sweep.get("seeds", [0])
    count = expected_trials(name) * len(seeds)
    overrides = [f"+sweep={name}"]
    cfg = compose(overrides)
    sweep, trials, configs = plan(cfg, group_composer(overrides))
    assert sweep.name == name and len(trials) == count == len(configs)
    assert len({t.key for t in trials}) == count
    three = plan(compose([*overrides, "sweep.seeds=[0,1,2]"]), group_composer([*overrides, "sweep.seeds=[0,1,2]"]))[1]
    assert len(three) == 3 * count // len(seeds)
    assert sorted({t.values["train.seed"] for t in three}) == [0, 1, 2]


def test_the_trial_counts_of_the_documented_sweeps():
    assert {n: expected_trials(n) for n in SWEEPS if n != "grid"} == {
        "density": 7, "warmup": 8, "lr_scaling": 9, "update_every": 8, "ablation": 6, "smoke": 2, "lr_transfer": 35}


def test_density_sweep_grid_and_dense_reference():
    overrides = ["+sweep=density"]
    _, trials, configs = plan(compose(overrides), group_composer(overrides))
    cells = sorted((c["method"], c["sparsity"]["density"]) for c in configs.values())
    assert cells == sorted([(m, d) for m in ("naive_dst", "smet") for d in (0.1, 0.25, 0.5)] + [("dense", 1.0)])
    smet = next(c for c in configs.values() if c["method"] == "smet")
    naive = next(c for c in configs.values() if c["method"] == "naive_dst")
    assert smet["optim"]["regrow"]["reset_step"] is True and smet["optim"]["lr_scaling"]["rule"] == "inverse"
    assert naive["optim"]["regrow"]["reset_step"] is False and naive["optim"]["regrow"]["warmup_steps"] == 0


def test_precedence_preset_then_sweep_file_then_command_line():
    # smoke.yaml sets train.max_steps=60, which wins over the default; each trial keeps its preset ...
    overrides = ["+sweep=smoke"]
    configs = plan(compose(overrides), group_composer(overrides))[2]
    assert configs["method=smet,seed=0"]["optim"]["regrow"]["warmup_steps"] == 100
    assert configs["method=naive_dst,seed=0"]["optim"]["regrow"]["warmup_steps"] == 0
    assert configs["method=smet,seed=0"]["train"]["max_steps"] == 60
    # ... and the command line wins over both; grid values win over everything.
    overrides = ["+sweep=smoke", "optim.regrow.warmup_steps=7", "+sweep.params.optim.lr=[0.002]"]
    configs = plan(compose(overrides), group_composer(overrides))[2]
    smet = configs["method=smet,optim.lr=0.002,seed=0"]
    assert smet["optim"]["regrow"]["warmup_steps"] == 7 and smet["optim"]["lr"] == 0.002


@pytest.mark.parametrize("bundle", [f"+sweep={p.stem}" for p in sorted((CONF_DIR / "sweep").glob("*.yaml"))]
                         + [f"experiment={p.stem}" for p in sorted((CONF_DIR / "experiment").glob("*.yaml"))])
def test_a_group_typed_on_the_command_line_wins_over_every_sweep_and_experiment_file(bundle):
    """A file that set data.name itself (smoke.yaml did) silently beat a typed data=text_files, leaving a
    mix of both options; files choose groups in their defaults list, which the command line overrides."""
    cfg = compose([bundle, "data=text_files", "data.path=corpus.txt", "model=small", "train=default"])
    options = {group: OmegaConf.load(CONF_DIR / group / f"{name}.yaml") for group, name in
               (("data", "text_files"), ("model", "small"))}
    assert cfg.data.name == "text_files" and cfg.model.name == "small"
    assert cfg.data.tokenizer == options["data"].tokenizer and cfg.model.dim == options["model"].dim


def test_bad_grid_values_are_caught_before_anything_runs():
    overrides = ["+sweep=density", "sweep.params.sparsity.density=[0.5,1.5]"]
    with pytest.raises(ConfigError, match=r"sparsity.density.*in trial"):
        plan(compose(overrides), group_composer(overrides))
    sweep = sweep_config(compose(["+sweep=smoke", "sweep.seeds=[]"]))
    with pytest.raises(ConfigError, match="sweep.seeds"):
        expand(sweep)
    with pytest.raises(ConfigError, match=r"sweep.seeds=\[0, 1, 0\] is not allowed: distinct seeds"):
        expand(sweep_config(compose(["+sweep=smoke", "sweep.seeds=[0,1,0]"])))
    with pytest.raises(ConfigError, match=r"sweep.params.sparsity.density=\[0.1, 0.1\] is not allowed: distinct values"):
        expand(sweep_config(compose(["+sweep=smoke", "+sweep.params.sparsity.density=[0.1,0.1]"])))
    for name in ("", "..", "a/b"):
        with pytest.raises(ConfigError, match=f"sweep.name='{re.escape(name)}' is not allowed: a folder name"):
            expand(sweep_config(compose(["+sweep=smoke", f"sweep.name={name}"])))
    with pytest.raises(ConfigError, match="sweep.asha_grace_steps=0 is not allowed: a positive number of steps"):
        expand(sweep_config(compose(["+sweep=smoke", "sweep.scheduler=asha", "sweep.asha_grace_steps=0"])))
    with pytest.raises(ConfigError, match="unknown key"):
        trial_configs(expand(sweep_config(compose(["+sweep=smoke", "+sweep.params.optim.lrr=[1]"]))),
                      group_composer(["+sweep=smoke"]))


def test_the_sweep_metric_must_be_a_registered_metric():
    from smet_lab.metrics import METRICS
    from smet_lab.preflight import group_options

    assert all(sweep_config(compose([f"+sweep={name}"])).metric in METRICS for name in group_options("sweep"))
    with pytest.raises(ConfigError) as e:
        expand(sweep_config(compose(["+sweep=smoke", "sweep.metric=summary/final_val_los"])))
    assert str(e.value).startswith("sweep.metric='summary/final_val_los' is not allowed: a registered run-level metric")
    assert str(e.value).endswith("; did you mean summary/final_val_loss?")


@pytest.mark.parametrize("override, message", [
    ("ray.cpus_per_trial=0", "ray.cpus_per_trial=0 is not allowed: a positive integer"),
    ("ray.gpus_per_trial=-1", "ray.gpus_per_trial=-1.0 is not allowed: a non-negative number"),
    ("ray.num_cpus=-2", "ray.num_cpus=-2 is not allowed: a non-negative integer"),
    ("ray.max_concurrent=-1", "ray.max_concurrent=-1 is not allowed: a non-negative integer"),
    ("ray.workers_per_trial=0", "ray.workers_per_trial=0 is not allowed: a positive integer"),
    ("ray.cpus_per_trial=3", "ray.cpus_per_trial=3 is not allowed: at most 2, the CPUs Ray has here"),
    ("ray.cpus_per_trial=1 ray.workers_per_trial=3", "ray.workers_per_trial=3 is not allowed: at most 2: 3 processes x "
                                                     "ray.cpus_per_trial=1 CPUs do not fit in the 2 CPUs"),
    ("ray.num_cpus=3", None),  # fine: 1 process x 2 CPUs fit in 3
])
def test_ray_settings_a_sweep_cannot_start_with_are_refused(override, message):
    from smet_lab.schema import check_ray

    ray = compose(["+sweep=smoke", *override.split()]).ray
    if message is None:
        check_ray(ray, cores=2)
        return
    with pytest.raises(ConfigError) as e:
        check_ray(ray, cores=2)
    assert str(e.value).startswith(message)


def test_a_storage_that_cannot_hold_the_sweep_is_refused_without_writing(tmp_path):
    (tmp_path / "a_file").write_text("x")
    for storage, says in ((tmp_path / "a_file" / "sweeps", "is a file"), ("s3://bucket/sweeps", "URIs such as s3://")):
        overrides = ["+sweep=smoke", f"ray.storage={storage}"]
        with pytest.raises(ConfigError, match=f"ray.storage=.* is not allowed: .*{says}"):
            plan(compose(overrides), group_composer(overrides))
    fresh = tmp_path / "new" / "deeper"
    plan(compose(["+sweep=smoke", f"ray.storage={fresh}"]), group_composer(["+sweep=smoke"]))
    assert not (tmp_path / "new").exists()  # a good storage is only created when the sweep starts


def test_a_cluster_address_where_nothing_listens_fails_in_seconds():
    """ray.init would retry an unanswered GCS address for minutes; the check answers at once."""
    from helpers import free_port
    from smet_lab.sweep.runner import check_cluster_address

    port = free_port()
    with pytest.raises(ConfigError, match=f"ray.address='127.0.0.1:{port}' is not allowed: nothing answers"):
        check_cluster_address(f"127.0.0.1:{port}")
    check_cluster_address("auto")  # Ray's own lookup, which fails fast by itself


def test_a_cluster_that_cannot_hold_a_trial_is_refused():
    """Tune would wait for such a trial forever without a word (on a fixed cluster): one line instead,
    naming the setting that asks too much."""
    from smet_lab.schema import check_cluster_fits

    def node(cpus, gpus=0, alive=True):
        return {"Alive": alive, "Resources": {"CPU": float(cpus), **({"GPU": float(gpus)} if gpus else {})}}

    def ray(**kw):
        return compose(["+sweep=smoke", "ray=cluster", *(f"ray.{k}={v}" for k, v in kw.items())]).ray

    for cfg, nodes, short in [
        (ray(), [node(2)], "ray.gpus_per_trial=1.0"),  # ray=cluster's default: 4 CPUs + 1 GPU per trial
        (ray(), [node(2, gpus=1), node(8)], "ray.cpus_per_trial=4"),  # the GPU node lacks the CPUs
        (ray(), [node(8, gpus=1, alive=False)], "ray.gpus_per_trial=1.0"),  # a dead node holds nothing
        (ray(gpus_per_trial=0, cpus_per_trial=2, workers_per_trial=3), [node(4), node(1)], "ray.workers_per_trial=3"),
    ]:
        with pytest.raises(ConfigError) as e:
            check_cluster_fits(cfg, nodes)
        assert str(e.value).startswith(f"{short} is not allowed: what the cluster at auto can hold"), str(e.value)
        assert "the sweep would wait forever" in str(e.value)
    check_cluster_fits(ray(), [node(2), node(4, gpus=1)])  # one node holds a trial
    check_cluster_fits(ray(gpus_per_trial=0, cpus_per_trial=2, workers_per_trial=3), [node(4), node(2)])  # 2 + 1
    check_cluster_fits(ray(gpus_per_trial=0.5, workers_per_trial=2), [node(8, gpus=1)])  # two half-GPU processes


# ------------------------------------------------------------------------------- end to end
@pytest.mark.e2e
def test_an_unreachable_cluster_stops_the_sweep_before_it_touches_its_folder(tmp_path):
    """ray=cluster with no cluster at the address: one line, exit 2; an existing sweep folder (here with
    sweep.resume=false, which would replace it) is left as it was, and no output folder is made."""
    from helpers import free_port

    kept = tmp_path / "st" / "smoke" / "keep.txt"
    kept.parent.mkdir(parents=True)
    kept.write_text("earlier results")
    proc = run_cli(["+sweep=smoke", "ray=cluster", f"ray.address=127.0.0.1:{free_port()}", f"ray.storage={tmp_path}/st",
                    "sweep.resume=false", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"],
                   cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "ray.address" in proc.stderr and "nothing answers" in proc.stderr and "Traceback" not in proc.stderr
    assert kept.read_text() == "earlier results" and not (tmp_path / "outputs").exists()


@pytest.mark.e2e
def test_a_sweep_on_an_existing_ray_cluster(tmp_path):
    """`ray start --head` (2 CPUs, no GPU), then `ray=cluster`: its default request per trial (4 CPUs and a GPU)
    is refused at once instead of waiting forever; asked for what the cluster holds, the trials train on it,
    to the losses of the same configs trained here, and the cluster outlives the driver."""
    import shutil
    import tempfile

    from helpers import free_port
    from smet_lab.config import run_config_from
    from smet_lab.train import Callbacks, train

    ray_bin, port = str(Path(sys.executable).parent / "ray"), free_port()
    temp = tempfile.mkdtemp(prefix="smetray_")  # short: Ray's socket paths must fit in 107 bytes
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--num-gpus=0",
                             "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    status = [ray_bin, "status", f"--address=127.0.0.1:{port}"]
    try:
        deadline = time.time() + 120
        while subprocess.run(status, env=env, capture_output=True).returncode != 0:
            assert time.time() < deadline and head.poll() is None, "the Ray head did not start"
            time.sleep(0.5)
        args = ["+sweep=smoke", "ray=cluster", f"ray.address=127.0.0.1:{port}", "tracking=none",
                f"ray.storage={tmp_path}/sw"]
        refused = run_cli(args, cwd=tmp_path, timeout=120)
        assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0, refused.stderr
        assert refused.stderr.startswith("smet_lab: error: ray.gpus_per_trial=1.0 is not allowed: what the cluster")
        assert "(the largest: 2 CPUs, 0 GPUs)" in refused.stderr and not (tmp_path / "sw" / "smoke").exists()
        # A cluster that adds nodes on demand: the trials wait for them (here for ever), and Ctrl-C stops that.
        waiting = start_cli([*args, "ray.autoscaling=true", "sweep.name=waits"], tmp_path, stderr=subprocess.STDOUT)
        line = ""
        while "0/2 done, 0 running" not in line:
            line = waiting.stdout.readline()
            assert line, "the sweep ended instead of waiting"
        waiting.send_signal(signal.SIGINT)
        assert waiting.wait(timeout=120) == 130
        fits = [*args, "ray.gpus_per_trial=0", "ray.cpus_per_trial=1"]
        ran = run_cli(fits, cwd=tmp_path, timeout=300)
        assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
        assert subprocess.run(status, env=env, capture_output=True).returncode == 0  # still up: not the driver's
        rows = {r["trial"]: r for r in csv.DictReader(open(tmp_path / "sw" / "smoke" / "trials.csv"))}
        _, trials, configs = plan(compose(fits), group_composer(fits))
        assert sorted(rows) == sorted(t.key for t in trials)
        for key, config in configs.items():
            here = train(run_config_from(config), callbacks=Callbacks(progress=None)).summary["summary/final_val_loss"]
            assert float(rows[key]["summary/final_val_loss"]) == pytest.approx(here, rel=1e-5), key
    finally:
        head.terminate()  # `ray start --block` drains (<= 30 s) and stops what it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def test_the_trial_table_has_a_number_or_nan_for_every_trial(tmp_path, capsys):
    """trials.csv reads each trial's final checkpoint (summary.json); a training checkpoint has no summary."""
    from smet_lab.grid import Trial
    from smet_lab.sweep.runner import write_trial_table

    keys = ["method=smet,seed=0", "method=dense,seed=0", "method=naive_dst,seed=0"]
    trials = [Trial(k, {"method": k.split(",")[0][7:], "train.seed": 0}) for k in keys]

    def checkpoint(folder: str, key: str, step: int, summary: dict | None = None) -> None:
        path = tmp_path / "tune" / folder / f"checkpoint_{step:06d}"
        path.mkdir(parents=True)
        (path / "trial.json").write_text(json.dumps({"trial": key, "step": step}))
        if summary is not None:
            (path / "summary.json").write_text(json.dumps({"status": "FINISHED", "error": None, "summary": summary}))

    checkpoint("t0", keys[0], 50)
    checkpoint("t0", keys[0], 100, {"summary/final_val_loss": 1.5, "summary/mean_probe_jump": 0.01})
    checkpoint("t1", keys[1], 100, {"summary/final_val_loss": 1.4, "summary/mean_probe_jump": None})  # dense: no jump
    checkpoint("t2", keys[2], 50)  # the third was interrupted after its first checkpoint
    statuses = {keys[0]: {"status": "FINISHED"}, keys[1]: {"status": "FINISHED"}}
    path = write_trial_table(tmp_path, trials, statuses, "summary/final_val_loss")
    rows = list(csv.DictReader(open(path)))
    assert [r["trial"] for r in rows] == keys and [r["method"] for r in rows] == ["smet", "dense", "naive_dst"]
    assert [r["status"] for r in rows] == ["FINISHED", "FINISHED", "UNFINISHED"]
    assert [r["summary/final_val_loss"] for r in rows] == ["1.5", "1.4", ""]
    assert [r["summary/mean_probe_jump"] for r in rows] == ["0.01", "", ""]
    printed = capsys.readouterr().out
    assert "None" not in printed and printed.count("NaN") == 3  # a numeric column: NaN where there is no value


def test_progress_shows_how_far_running_trials_are_and_an_eta_before_any_trial_ends(capsys, monkeypatch):
    """The progress line's ETA comes from the steps trained in this session (all trials together), so it
    shows while the first trial runs; a trial that ended in an earlier session counts as done."""
    from types import SimpleNamespace

    from smet_lab.sweep import callbacks

    clock = [1000.0]  # the callback's clock, so the printed seconds do not depend on this machine's speed
    monkeypatch.setattr(callbacks, "time", SimpleNamespace(time=lambda: clock[0]))
    progress = callbacks.SweepProgress("s", "summary/final_val_loss", "min", {"a": 100, "b": 100, "c": 100, "old": 100})
    progress.setup()
    trials = [SimpleNamespace(config={"key": k}, status=s, last_result={})
              for k, s in (("a", "RUNNING"), ("b", "PENDING"), ("old", "TERMINATED"))]  # c: not created yet
    for step in range(10, 51, 10):
        progress.on_trial_result(0, trials, trials[0], {"step": step})
    clock[0] += 50  # 40 steps trained (10 -> 50) in 50 s: 0.8 steps/s
    progress.line(trials, force=True)
    # left: 50 of a, 100 of b and of c; 250 / 0.8 = 312.5 s
    assert capsys.readouterr().out.splitlines()[-1] == "[sweep s] 1/4 done, 1 running (50 %), 0 failed, 50s, ETA ~5.2 min"
    progress.on_trial_result(0, trials, trials[0], {"step": 100})
    trials[0].status, trials[0].last_result = "TERMINATED", {"summary/final_val_loss": 1.5, "step": 100}
    trials[1].status = "RUNNING"
    progress.on_trial_complete(0, trials, trials[0])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "[sweep s] done a: FINISHED, summary/final_val_loss=1.5000"
    # 90 steps in 50 s; left: b and c, 200 steps: 111 s. b has reported nothing yet: no share shown.
    assert out[1] == "[sweep s] 2/4 done, 1 running, 0 failed, 50s, ETA ~1.9 min, best summary/final_val_loss=1.5000 (a)"


def test_the_eta_weighs_each_trials_steps_by_its_cost(capsys, monkeypatch, tmp_path):
    """A grid over model sizes: the large model's steps cost more, and the ETA counts them so."""
    from types import SimpleNamespace

    from smet_lab.config import ModelConfig, from_dict
    from smet_lab.model import LLaMA
    from smet_lab.sweep import callbacks
    from smet_lab.sweep.runner import step_work

    clock = [0.0]
    monkeypatch.setattr(callbacks, "time", SimpleNamespace(time=lambda: clock[0]))
    progress = callbacks.SweepProgress("s", "summary/final_val_loss", "min", {"small": 100, "large": 100},
                                       {"small": 1.0, "large": 4.0})
    progress.setup()
    trials = [SimpleNamespace(config={"key": k}, status=s, last_result={}) for k, s in (("small", "RUNNING"),
                                                                                        ("large", "PENDING"))]
    progress.on_trial_result(0, trials, trials[0], {"step": 0})
    progress.on_trial_result(0, trials, trials[0], {"step": 50})
    clock[0] = 60.0  # 50 small steps in 60 s; left: 50 small steps (60 s) and 100 large ones of 4x the cost (480 s)
    progress.line(trials, force=True)
    assert capsys.readouterr().out.splitlines()[-1].endswith(", 60s, ETA ~9.0 min")
    # A progress callback pickled by a smet_lab without step_work (Tune restores it on resume) counts steps alike.
    import pickle

    old = pickle.loads(pickle.dumps(progress))
    del old.__dict__["work"]
    restored = pickle.loads(pickle.dumps(old))
    assert restored.work == {"small": 1.0, "large": 1.0}
    # The cost per step: parameters (of the model itself) x tokens per step.
    args = ["+sweep=smoke", "train.batch_size=3", "train.grad_accum=2", f"ray.storage={tmp_path}"]
    _, trials, configs = plan(compose(args), group_composer(args))
    cfg = configs[trials[0].key]
    params = LLaMA(from_dict(ModelConfig, cfg["model"])).num_parameters()
    tokens = cfg["model"]["seq_len"] * cfg["train"]["batch_size"] * cfg["train"]["grad_accum"]
    assert step_work(cfg) == params * tokens


def test_resuming_with_another_grid_or_setting_is_refused(tmp_path):
    """Tune restores the trials it stored: a changed grid or training key would silently not apply."""
    base = ["+sweep=smoke", f"ray.storage={tmp_path}"]

    def plan_of(extra):
        return plan(compose([*base, *extra]), group_composer([*base, *extra]))

    _, trials, configs = plan_of([])
    write_grid(tmp_path / "smoke", trials, configs)  # what run_sweep records when the sweep starts
    assert plan_of(["tracking.enabled=false", "ray.cpus_per_trial=1"])[1] == trials  # may change between sessions
    with pytest.raises(ConfigError, match=r"sweep='4 trials'.*grid of 2 trials; e.g. method=naive_dst,seed=1 is new"):
        plan_of(["sweep.seeds=[0,1]"])
    with pytest.raises(ConfigError, match=r"train.max_steps=300 is not allowed: resuming .* needs 60, .*sweep.resume=false"):
        plan_of(["train.max_steps=300"])
    with pytest.raises(ConfigError, match=r"optim.lr=0.002 .* needs 0.001"):
        plan_of(["optim.lr=0.002"])
    assert len(plan_of(["sweep.seeds=[0,1]", "sweep.resume=false"])[1]) == 4  # starting afresh is allowed
    assert (tmp_path / "smoke" / GRID_FILE).is_file()


HOLD_LOCK = """
import sys, time
from pathlib import Path
from smet_lab.sweep.folder import sweep_lock
with sweep_lock(Path(sys.argv[1]), "smoke"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_driver_of_a_running_sweep_is_refused(tmp_path):
    """The same sweep started twice (two terminals) would resume it while it runs and train its trials
    twice into one folder: the second driver gets one line naming the first, and touches nothing."""
    import sys

    from smet_lab.sweep.folder import sweep_lock

    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "sw")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        proc = run_cli(["+sweep=smoke", *common(tmp_path)], cwd=tmp_path, timeout=120)
        assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
        assert proc.stderr.startswith("smet_lab: error: sweep.name='smoke' is not allowed: the name of a sweep that is "
                                      f"not running already (pid {holder.pid} on ")
        assert [p.name for p in (tmp_path / "sw").iterdir()] == [".smoke.lock"]
        assert not (tmp_path / "outputs").exists() and not (tmp_path / "mlflow.db").exists()
    finally:
        holder.kill()
        holder.wait()
    with sweep_lock(tmp_path / "sw", "smoke"):  # the OS released the killed driver's lock
        assert (tmp_path / "sw" / ".smoke.lock").read_text() == f"pid {os.getpid()} on {os.uname().nodename}"


def test_plan_shows_what_a_sweep_would_run_and_writes_nothing(tmp_path):
    proc = run_cli(["+sweep=smoke", "sweep.seeds=[0,1]", "--plan", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                    f"ray.storage={tmp_path}/sw", "ray.cpus_per_trial=1"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    # smoke: naive_dst and smet, 60 steps of 4 x 64 tokens each (conf/sweep/smoke.yaml, tiny), here with 2 seeds
    assert lines[0] == "sweep smoke: 4 trials, 60 steps each (61,440 training tokens in all)"
    assert lines[1] == "  grid:     method [naive_dst, smet] x seed [0, 1]"
    assert lines[2] == f"  folder:   {tmp_path / 'sw' / 'smoke'} (new)"
    cpus = os.cpu_count()
    assert lines[3] == f"  runs on:  a local Ray with {cpus} CPU{'s' * (cpus != 1)}, 1 CPU per trial: {cpus} trial{'s' * (cpus != 1)} at a time"
    assert [line.split() for line in lines[6:10]] == [[f"method={m},seed={s}", "to", "run"]
                                                      for m in ("naive_dst", "smet") for s in (0, 1)]
    assert lines[-1] == "smet_lab: plan only (--plan): nothing was started or written"
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    short = run_cli(["+sweep=smoke", "--plan", "sparsity.update_every=60", "tracking=none", f"ray.storage={tmp_path}/sw"],
                    cwd=tmp_path)  # 60 steps, the first update at step 60: none happens
    trials = [line for line in short.stdout.splitlines() if line.startswith("    method=")]
    assert len(trials) == 2 and all(t.endswith("to run (ends before its first topology update: static)") for t in trials)


def test_plan_of_a_sweep_to_resume_names_what_it_keeps_and_what_it_runs(tmp_path):
    from smet_lab.preview import describe_sweep
    from smet_lab.sweep.folder import record_status

    base = ["+sweep=smoke", "sweep.seeds=[0,1]", f"ray.storage={tmp_path}"]

    def described(extra=()):
        overrides = [*base, *extra]
        return dict(line.split(None, 1) for line in describe_sweep(compose(overrides), group_composer(overrides))
                    .split("  trials:\n")[1].splitlines())

    _, trials, configs = plan(compose(base), group_composer(base))
    write_grid(tmp_path / "smoke", trials, configs)
    (tmp_path / "smoke" / "tune").mkdir()
    record_status(str(tmp_path / "smoke"), "method=smet,seed=0", "FINISHED", None)
    record_status(str(tmp_path / "smoke"), "method=smet,seed=1", "DIVERGED", "loss is nan")
    record_status(str(tmp_path / "smoke"), "method=naive_dst,seed=0", "FAILED", "boom")
    # The failed trial left training checkpoints at steps 20 and 40; the unfinished one only a folder
    # without state.pt (nothing to resume from).
    for trial, step, files in (("naive_dst,seed=0", 20, ["state.pt"]), ("naive_dst,seed=0", 40, ["state.pt"]),
                               ("naive_dst,seed=1", 10, ["config.json"])):
        checkpoint = tmp_path / "smoke" / "tune" / f"trial_{trial}" / f"checkpoint_{step:06d}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "trial.json").write_text(json.dumps({"trial": f"method={trial}", "step": step}))
        for name in files:
            (checkpoint / name).write_bytes(b"")
    assert described() == {"method=naive_dst,seed=0": "failed: kept (sweep.retry_failed=true runs it again)",
                           "method=smet,seed=0": "finished: kept", "method=smet,seed=1": "diverged: kept",
                           "method=naive_dst,seed=1": "to run from the start"}
    assert described(["sweep.retry_failed=true"])["method=naive_dst,seed=0"] == "failed: runs again from its step-40 checkpoint"
    assert set(described(["sweep.resume=false"]).values()) == {"to run"}
    overrides = [*base, "sweep.resume=false"]
    assert f"(starts afresh: sweep.resume=false deletes {tmp_path / 'smoke'} first)" in describe_sweep(
        compose(overrides), group_composer(overrides))
    with pytest.raises(ConfigError, match="resuming .* needs 60"):  # the resume check runs as for the sweep itself
        describe_sweep(compose([*base, "train.max_steps=61"]), group_composer([*base, "train.max_steps=61"]))


SMOKE = ["+sweep=smoke", "train.max_steps=40"]


def common(tmp):
    return [f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"ray.storage={tmp}/sw"]


@pytest.mark.e2e
def test_a_sweep_over_models_a_users_own_among_them(tmp_path):
    """`-m model=wide,tiny` with `wide` the user's own file: each trial trains its model, and the report has the
    model column in order of size and the perplexity-vs-model plot."""
    (tmp_path / "conf" / "model").mkdir(parents=True)
    tiny = (CONF_DIR / "model" / "tiny.yaml").read_text()
    (tmp_path / "conf" / "model" / "wide.yaml").write_text(tiny.replace("name: tiny", "name: wide").replace("dim: 64", "dim: 96"))
    proc = run_cli(["-m", "+sweep=smoke", "model=wide,tiny", "sweep.params.method=[smet]", "train.max_steps=20",
                    f"hydra.searchpath=[file://{tmp_path / 'conf'}]", *common(tmp_path)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, runs = runs_of(tmp_path / "mlflow.db")
    children = {r.data.params["model.name"]: r for r in runs if r.data.tags.get("smet.kind") == "trial"}
    assert sorted(children) == ["tiny", "wide"] and children["wide"].data.params["model.dim"] == "96"
    for run in children.values():  # the run's size is the model's own parameter count
        from smet_lab.config import ModelConfig, from_dict
        from smet_lab.model import LLaMA

        model = {k.removeprefix("model."): yaml.safe_load(v) for k, v in run.data.params.items() if k.startswith("model.")}
        assert run.data.metrics["summary/parameters"] == LLaMA(from_dict(ModelConfig, model)).num_parameters()
    report = tmp_path / "sw" / "multirun-model" / "report"  # (a -m names the sweep after its swept keys)
    assert [r["model"] for r in csv.DictReader(open(report / "trials.csv"))] == ["tiny", "wide"]  # by size
    assert (report / "val_ppl_vs_model.png").is_file()


@pytest.mark.e2e
def test_smoke_sweep_parent_and_children_in_mlflow(tmp_path):
    proc = run_cli([*SMOKE, *common(tmp_path), "+tracking.tags.owner=alice"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[sweep smoke] 2/2 done" in proc.stdout
    client, runs = runs_of(tmp_path / "mlflow.db")
    assert [r.data.tags["owner"] for r in runs] == ["alice"] * 3  # the user's tag on the parent and both trials
    parents = [r for r in runs if r.data.tags.get("smet.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("smet.kind") == "trial"]
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["smet.sweep"] == "smoke"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(c.data.tags["smet.method"] for c in children) == ["naive_dst", "smet"]
    for c in children:
        assert c.info.status == "FINISHED"
        assert c.data.params["train.max_steps"] == "40"
        losses = client.get_metric_history(c.info.run_id, "train/loss")
        assert [m.step for m in losses] == list(range(5, 41, 5))
        assert [m.step for m in client.get_metric_history(c.info.run_id, "stability/probe_jump")] == [10, 20, 30]
        assert "summary/final_val_loss" in c.data.metrics and "summary/memory/state_bytes" in c.data.metrics
        assert {"config.yaml", "metrics.parquet", "loss_curve.png"} <= {a.path for a in client.list_artifacts(c.info.run_id)}
    assert "trials.csv" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    rows = list(csv.DictReader(open(tmp_path / "sw" / "smoke" / "trials.csv")))
    assert sorted(r["status"] for r in rows) == ["FINISHED", "FINISHED"]
    by_method = {c.data.tags["smet.method"]: c.data.metrics["summary/final_val_loss"] for c in children}
    for r in rows:
        assert float(r["summary/final_val_loss"]) == pytest.approx(by_method[r["method"]])
    # Each trial keeps its final weights: exported, they give the trial's final val loss.
    from smet_lab.export import evaluate_export, export, read_checkpoint

    finals = {}
    for state in (tmp_path / "sw" / "smoke" / "tune").glob("run_trial_*/checkpoint_*/state.pt"):
        cfg, saved, _ = read_checkpoint(state.parent)
        if saved["step"] == 40:
            finals[cfg.method] = (state.parent, cfg)
    assert sorted(finals) == ["naive_dst", "smet"]
    for method, (ckpt, cfg) in finals.items():
        out = export(ckpt, tmp_path / f"export_{method}")
        assert evaluate_export(out, cfg) == pytest.approx(by_method[method], abs=1e-6)


@pytest.mark.e2e
def test_a_users_own_sweep_file_outside_the_package(tmp_path):
    """conf/sweep/mine.yaml in the user's folder, found through hydra.searchpath, inheriting a shipped
    sweep through `defaults:`; the trials (composed again inside the Hydra job) see it too."""
    (tmp_path / "conf" / "sweep").mkdir(parents=True)
    (tmp_path / "conf" / "sweep" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - smoke\nsweep:\n  name: mine\n  params:\n    method: [smet]\n"
        "    sparsity.density: [0.1, 0.5]\ntrain:\n  max_steps: 20\n")
    own = "hydra.searchpath=[file://conf]"
    typo = run_cli(["+sweep=mien", own, *common(tmp_path)], cwd=tmp_path)
    assert typo.returncode == 2 and typo.stderr.endswith("did you mean mine?\n"), typo.stderr
    proc = run_cli(["+sweep=mine", own, *common(tmp_path)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, runs = runs_of(tmp_path / "mlflow.db")
    children = [r for r in runs if r.data.tags.get("smet.kind") == "trial"]
    assert sorted((c.data.params["method"], float(c.data.params["sparsity.density"]), c.data.params["train.max_steps"],
                   c.data.params["data.name"]) for c in children) == [("smet", 0.1, "20", "synthetic"),
                                                                     ("smet", 0.5, "20", "synthetic")]
    assert (tmp_path / "sw" / "mine" / "report" / "report.md").is_file()


@pytest.mark.e2e
def test_a_failing_trial_does_not_take_the_others_and_is_retried(tmp_path):
    # naive_dst fails at step 25, after its checkpoint at step 20 (smoke checkpoints every 20 steps).
    proc = run_cli([*SMOKE, *common(tmp_path)], cwd=tmp_path,
                   env_extra={"SMET_LAB_INJECT_FAILURE": "naive_dst", "SMET_LAB_INJECT_AT_STEP": "25"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "FAILED method=naive_dst" in proc.stdout and "1 failed" in proc.stdout
    assert "sweep.retry_failed=true" in proc.stderr
    _, runs = runs_of(tmp_path / "mlflow.db")
    children = {r.data.tags["smet.method"]: r for r in runs if r.data.tags.get("smet.kind") == "trial"}
    assert children["naive_dst"].info.status == "FAILED"
    assert "injected failure" in children["naive_dst"].data.tags["smet.error"]
    assert children["smet"].info.status == "FINISHED"
    # The parent tells the truth: FAILED, with the counts and the best finished trial.
    (parent,) = [r for r in runs if r.data.tags.get("smet.kind") == "sweep"]
    assert parent.info.status == "FAILED" and parent.data.tags["smet.error"] == "1 trial(s) failed"
    assert parent.data.metrics["sweep/trials_failed"] == 1 and parent.data.metrics["sweep/trials_finished"] == 1
    assert parent.data.metrics["best/summary/final_val_loss"] == children["smet"].data.metrics["summary/final_val_loss"]
    assert parent.data.tags["smet.best_trial"] == "method=smet,seed=0"
    # Trials carry the corpus fingerprint, as single runs do (computed here independently).
    from smet_lab.config import DataConfig
    from smet_lab.data import load_corpus

    sha = load_corpus(DataConfig(name="synthetic", max_tokens=60000)).sha256
    assert {c.data.tags["smet.data_sha256"] for c in children.values()} == {sha}
    rows = {r["method"]: r["status"] for r in csv.DictReader(open(tmp_path / "sw" / "smoke" / "trials.csv"))}
    assert rows == {"naive_dst": "FAILED", "smet": "FINISHED"}

    retry = run_cli([*SMOKE, *common(tmp_path), "sweep.retry_failed=true"], cwd=tmp_path)
    assert retry.returncode == 0, retry.stdout[-3000:] + retry.stderr[-3000:]
    assert " (retrying 1 failed): 1 of 2 trials kept, 1 to run\n" in retry.stdout
    client, runs = runs_of(tmp_path / "mlflow.db")
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}  # the same runs, all green now
    naive = next(r for r in runs if r.data.tags.get("smet.method") == "naive_dst")
    assert naive.info.run_id == children["naive_dst"].info.run_id
    assert naive.data.tags["smet.resumed_from_step"] == "20" and naive.data.metrics["summary/steps"] == 40
    smet = next(r for r in runs if r.data.tags.get("smet.method") == "smet")  # the finished trial did not re-run
    assert len(client.get_metric_history(smet.info.run_id, "train/loss")) == 8
    rows = {r["method"]: r["status"] for r in csv.DictReader(open(tmp_path / "sw" / "smoke" / "trials.csv"))}
    assert rows == {"naive_dst": "FINISHED", "smet": "FINISHED"}


@pytest.mark.e2e
def test_a_sweep_started_afresh_gets_new_mlflow_runs(tmp_path):
    """sweep.resume=false in the same folder starts a new parent with new children (the old ones were
    reused: a child kept the first start's params and held both starts' losses in one history), and
    a later start without tracking is reported from its folder, not from the first start's runs."""
    args = ["+sweep=smoke", "sweep.params.method=[smet]", *common(tmp_path)]
    first = run_cli([*args, "train.max_steps=20"], cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    again = run_cli([*args, "train.max_steps=30", "sweep.resume=false"], cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    client, runs = runs_of(tmp_path / "mlflow.db")
    parents = sorted((r for r in runs if r.data.tags.get("smet.kind") == "sweep"), key=lambda r: r.info.start_time)
    children = {r.data.tags["mlflow.parentRunId"]: r for r in runs if r.data.tags.get("smet.kind") == "trial"}
    assert len(parents) == 2 and set(children) == {p.info.run_id for p in parents}
    old, new = (children[p.info.run_id] for p in parents)
    for child, steps in ((old, 20), (new, 30)):
        assert child.data.params["train.max_steps"] == str(steps) and child.data.metrics["summary/steps"] == steps
        assert [m.step for m in client.get_metric_history(child.info.run_id, "train/loss")] == list(range(5, steps + 1, 5))
    rows = list(csv.DictReader(open(tmp_path / "sw" / "smoke" / "report" / "trials.csv")))
    assert [r["run_id"] for r in rows] == [new.info.run_id]
    third = run_cli(["+sweep=smoke", "sweep.params.method=[smet]", f"ray.storage={tmp_path}/sw", "train.max_steps=10",
                     "sweep.resume=false", "tracking=none"], cwd=tmp_path)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    proc = run_cli_module("smet_lab.report", str(tmp_path / "sw" / "smoke"), "--tracking-uri",
                          f"sqlite:///{tmp_path}/mlflow.db", "--out", str(tmp_path / "rep"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(tmp_path / "rep" / "trials.csv")))
    assert [(r["run_id"], float(r["summary/final_val_loss"]) > 0) for r in rows] == [("", True)]
    assert "sweep status: FINISHED" in (tmp_path / "rep" / "report.md").read_text()


def run_cli_module(module: str, *args, cwd):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.e2e
def test_a_sweep_without_tracking_still_knows_how_its_trials_ended(tmp_path):
    """tracking=none: no MLflow at all, and the statuses, trials.csv and exit code are as with it (the
    statuses were written by the MLflow logger alone: every trial read as unfinished, the sweep as
    interrupted); the report is read from the folder, the failed trial's numbers from its checkpoint."""
    folder = tmp_path / "sw" / "smoke"
    args = [*SMOKE, "tracking=none", f"ray.storage={tmp_path}/sw"]
    proc = run_cli(args, cwd=tmp_path, env_extra={"SMET_LAB_INJECT_FAILURE": "naive_dst", "SMET_LAB_INJECT_AT_STEP": "25"})
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2/2 trials ended (1 finished, 0 diverged, 1 failed)" in proc.stdout and "interrupted" not in proc.stderr
    assert f"report: {folder / 'report' / 'report.html'}" in proc.stdout
    rows = {r["method"]: r for r in csv.DictReader(open(folder / "trials.csv"))}
    assert {m: r["status"] for m, r in rows.items()} == {"naive_dst": "FAILED", "smet": "FINISHED"}
    report = {r["method"]: r for r in csv.DictReader(open(folder / "report" / "trials.csv"))}
    assert {m: r["status"] for m, r in report.items()} == {"naive_dst": "FAILED", "smet": "FINISHED"}
    # The finished trial: its summary as Tune's last result has it (trials.csv), read from its final checkpoint.
    assert float(report["smet"]["summary/final_val_loss"]) == float(rows["smet"]["summary/final_val_loss"])
    # The failed trial (failed at step 25, checkpoint of step 20): its probe jumps from its own checkpoint.
    state = next(folder.glob("tune/*naive_dst*/checkpoint_*/state.pt"))
    jumps = [r["stability/probe_jump"] for r in torch.load(state, weights_only=False)["history"] if "stability/probe_jump" in r]
    assert len(jumps) == 1  # the update at step 10 (step 20's jump is measured probe_window=5 steps later)
    assert float(report["naive_dst"]["summary/mean_probe_jump"]) == pytest.approx(jumps[0], rel=1e-12)
    assert report["naive_dst"]["summary/final_val_loss"] == "" and "InjectedFailure" in report["naive_dst"]["error"]
    retry = run_cli([*args, "sweep.retry_failed=true"], cwd=tmp_path)
    assert retry.returncode == 0, retry.stdout[-3000:] + retry.stderr[-3000:]
    rows = {r["method"]: r["status"] for r in csv.DictReader(open(folder / "trials.csv"))}
    assert rows == {"naive_dst": "FINISHED", "smet": "FINISHED"}
    report = {r["method"]: r["status"] for r in csv.DictReader(open(folder / "report" / "trials.csv"))}
    assert report == {"naive_dst": "FINISHED", "smet": "FINISHED"}
    assert not list(tmp_path.glob("**/mlflow.db"))
    # The best trial's model out of the folder: its val loss as the trial's own last evaluation had it.
    rows = list(csv.DictReader(open(folder / "trials.csv")))
    best = min(rows, key=lambda r: float(r["summary/final_val_loss"]))
    export = subprocess.run([sys.executable, "-m", "smet_lab.export", str(folder), "--trial", "best", "--out",
                             str(tmp_path / "model"), "--eval"], capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr
    assert f"(trial {best['trial']}, best by summary/final_val_loss = " in export.stdout
    printed = float(export.stdout.split("val loss of the export: ")[1].split()[0])
    assert printed == pytest.approx(float(best["summary/final_val_loss"]), abs=1e-5)


@pytest.mark.e2e
def test_killed_driver_resumes_to_exactly_the_grid(tmp_path):
    """SIGKILL (no clean-up at all) while the second trial runs; SIGINT: the test below."""
    args = ["+sweep=smoke", "train.max_steps=200", "train.checkpoint_every=50", *common(tmp_path)]
    proc = start_cli(args, tmp_path, stderr=subprocess.STDOUT)
    deadline, seen = time.time() + 300, ""
    while time.time() < deadline:
        line = proc.stdout.readline()
        seen += line
        if "done method=naive_dst" in line or not line:
            break
    assert "done method=naive_dst" in seen, seen[-3000:]
    time.sleep(2)  # the second trial is running now
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=120)
    client, first = runs_of(tmp_path / "mlflow.db")
    naive_run = next(r for r in first if r.data.tags.get("smet.method") == "naive_dst")
    naive_points = len(client.get_metric_history(naive_run.info.run_id, "train/loss"))

    again = run_cli(args, cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "/tune: 1 of 2 trials kept, 1 to run\n" in again.stdout  # the finished one kept, the killed one to run
    client, runs = runs_of(tmp_path / "mlflow.db")
    assert len(runs) == 3  # one parent + the grid's 2 children: nothing duplicated
    assert {r.info.status for r in runs} == {"FINISHED"}
    # The finished trial was not re-run: its history has exactly the points it had.
    assert len(client.get_metric_history(naive_run.info.run_id, "train/loss")) == naive_points
    smet = next(r for r in runs if r.data.tags.get("smet.method") == "smet")
    assert smet.data.metrics["summary/steps"] == 200
    # A changed grid on resume: one line, exit 2, nothing touched.
    changed = run_cli([*args, "sweep.seeds=[0,1]"], cwd=tmp_path, timeout=120)
    assert changed.returncode == 2 and "Traceback" not in changed.stderr, changed.stderr[-2000:]
    assert changed.stderr.strip().count("\n") == 0 and "sweep.resume=false" in changed.stderr
    assert len(runs_of(tmp_path / "mlflow.db")[1]) == 3
    # Run once more when every trial has ended: it says so, nothing trains, nothing is duplicated, and Ray is
    # not started (nothing answers at this cluster address): the table and report come from the folder.
    (tmp_path / "sw" / "smoke" / "trials.csv").unlink()
    ended = run_cli([*args, "ray.address=127.0.0.1:1"], cwd=tmp_path, timeout=300)
    assert ended.returncode == 0 and ": 2 of 2 trials kept, 0 to run; every trial has ended, so only the report is " \
        "rebuilt" in ended.stdout, ended.stdout[-3000:] + ended.stderr[-3000:]
    assert len(runs_of(tmp_path / "mlflow.db")[1]) == 3
    table = {r["method"]: r for r in csv.DictReader(open(tmp_path / "sw" / "smoke" / "trials.csv"))}
    for run in runs:
        if run.data.tags.get("smet.kind") != "sweep":
            row = table[run.data.tags["smet.method"]]
            assert row["status"] == "FINISHED"
            assert float(row["summary/final_val_loss"]) == pytest.approx(run.data.metrics["summary/final_val_loss"])
    # A sweep folder without grid.json (written by an older smet_lab): Tune restores its own grid;
    # the trials it does not have are reported as an error, never a silent success.
    (tmp_path / "sw" / "smoke" / "grid.json").unlink()
    legacy = run_cli([*args, "sweep.seeds=[0,1]"], cwd=tmp_path, timeout=300)
    assert legacy.returncode == 1 and "2 trial(s) of this grid are not in the resumed experiment" in legacy.stderr


@pytest.mark.e2e
def test_a_closed_stdout_stops_a_sweep_like_ctrl_c(tmp_path):
    """`python -m smet_lab +sweep=smoke | head`: once the reader has gone, the next progress line stops the
    sweep as Ctrl-C does (parent KILLED, resumable), not with a BrokenPipeError that leaves it RUNNING."""
    proc = start_cli(["+sweep=smoke", "train.max_steps=3000", *common(tmp_path)], tmp_path)
    line = ""
    while "progress every" not in line:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
    proc.stdout.close()  # the next progress line (every 15 s) meets a closed pipe
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 130, err[-3000:]
    assert "Traceback" not in err and "BrokenPipeError" not in err, err[-3000:]
    assert "interrupted: run the same command again to resume" in err
    _, runs = runs_of(tmp_path / "mlflow.db")
    assert [r.info.status for r in runs if r.data.tags.get("smet.kind") == "sweep"] == ["KILLED"]
    assert "RUNNING" not in {r.info.status for r in runs}


def _run_until(args, cwd, marker_count, wait_s=0.0, timeout=300, signum=signal.SIGINT):
    """Start the CLI, Ctrl-C it (or send `signum`) `wait_s` after `marker_count` trials have printed their
    "done" line; returns (returncode, output)."""
    proc = start_cli(args, cwd, stderr=subprocess.STDOUT)
    deadline, seen, done = time.time() + timeout, "", 0
    while time.time() < deadline and done < marker_count:
        line = proc.stdout.readline()
        if not line:
            break
        seen += line
        done += "] done method=" in line
    assert done == marker_count, seen[-3000:]
    time.sleep(wait_s)
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, seen + out


@pytest.mark.e2e
def test_a_sweep_interrupted_twice_resumes_to_exactly_the_grid(tmp_path):
    """4 trials at concurrency 1: the trials Tune had not created yet when the driver stopped must run on
    resume (they used to FAIL with "'tuple' object has no attribute 'items'")."""
    args = ["+sweep=smoke", "sweep.seeds=[0,1]", "train.max_steps=40", "ray.max_concurrent=1", *common(tmp_path)]
    code, out = _run_until(args, tmp_path, 1)
    assert code == 130, out[-3000:]
    _, runs = runs_of(tmp_path / "mlflow.db")
    assert [r.info.status for r in runs if r.data.tags.get("smet.kind") == "sweep"] == ["KILLED"]
    assert not (tmp_path / "outputs").exists()  # the sweep writes into its sweep folder, no empty Hydra folder
    # The second session finishes one more trial and is stopped while the next one trains, by SIGTERM
    # (a scheduler's stop, `kill`), which Ray's driver would otherwise die of on the spot, its runs RUNNING.
    code, out = _run_until(args, tmp_path, 1, wait_s=3, signum=signal.SIGTERM)
    assert code == 130 and "resuming from" in out, out[-3000:]
    _, runs = runs_of(tmp_path / "mlflow.db")
    statuses = {r.info.run_name: r.info.status for r in runs}
    assert "RUNNING" not in statuses.values(), statuses  # the parent and the stopped trial are KILLED
    last = run_cli(args, cwd=tmp_path)
    assert last.returncode == 0, last.stdout[-3000:] + last.stderr[-3000:]
    assert "4/4 trials ended (4 finished" in last.stdout
    client, runs = runs_of(tmp_path / "mlflow.db")
    children = [r for r in runs if r.data.tags.get("smet.kind") == "trial"]
    assert len(runs) == 5 and len(children) == 4  # one parent, one child per trial, no duplicates
    assert sorted(r.info.run_name for r in children) == sorted(
        f"method={m},seed={s}" for m in ("naive_dst", "smet") for s in (0, 1))
    assert {r.info.status for r in runs} == {"FINISHED"}
    for c in children:  # each trial trained to the end (a trial stopped mid-run resumed from its checkpoint)
        assert {m.step for m in client.get_metric_history(c.info.run_id, "train/loss")} == set(range(5, 41, 5))
        assert c.data.metrics["summary/steps"] == 40
    rows = list(csv.DictReader(open(tmp_path / "sw" / "smoke" / "trials.csv")))
    assert sorted(r["status"] for r in rows) == ["FINISHED"] * 4


def test_a_retry_forgets_only_the_failed_statuses(tmp_path):
    """Trials about to be retried have not ended, so a retry stopped early reads as interrupted."""
    from smet_lab.sweep.folder import forget_failed, read_statuses, record_status

    record_status(str(tmp_path), "a", "FINISHED", None)
    record_status(str(tmp_path), "b", "FAILED", "boom")
    record_status(str(tmp_path), "c", "DIVERGED", "nan")
    forget_failed(str(tmp_path))
    assert read_statuses(tmp_path) == {"a": {"status": "FINISHED", "error": None},
                                       "c": {"status": "DIVERGED", "error": "nan"}}
