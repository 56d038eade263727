"""The Hydra command line: config composition, end-to-end runs tracked in MLflow, bad inputs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from smet_lab.cli import CONF_DIR, compose, to_run_config
from smet_lab.config import ConfigError
from smet_lab.model import PRESETS
from smet_lab.optim import METHODS
from smet_lab.train import check_config

GROUPS = ["model", "data", "method", "sparsity", "optim", "train", "tracking", "ray"]
FAST = ["data=synthetic", "train.max_steps=40", "train.eval_every=20", "train.log_every=5",
        "sparsity.update_every=10", "train.probe_window=5", "train.batch_size=4", "train.eval_batches=2",
        "train.probe_batch_size=8"]


def options(group):
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_defaults_list_and_sweep_not_in_it():
    from omegaconf import OmegaConf

    defaults = OmegaConf.load(CONF_DIR / "config.yaml").defaults
    groups = [next(iter(d)) for d in defaults if not isinstance(d, str) and not next(iter(d)).startswith("override ")]
    assert groups == GROUPS[:2] + ["sparsity", "optim", "train", "tracking", "ray", "method"]
    assert "sweep" not in groups  # appended by +sweep=NAME
    cfg = compose([])
    assert cfg.method == "smet" and cfg.model.name == "tiny" and cfg.data.name == "pysource"
    assert cfg.sweep is None


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_of_every_group_composes(group):
    assert options(group), group
    for option in options(group):
        extra = ["data.path=/tmp"] if option == "text_files" else []
        cfg = compose([f"{group}={option}", *extra])
        if group == "model":
            dim, ffn, layers, heads, seq = PRESETS[option]
            assert (cfg.model.dim, cfg.model.ffn_dim, cfg.model.n_layers, cfg.model.n_heads, cfg.model.seq_len) == \
                (dim, ffn, layers, heads, seq)
        if group == "data":
            assert cfg.data.name == option
        run = to_run_config(cfg)
        if group not in ("data", "tracking", "ray", "train"):
            check_config(run)


def test_method_presets_set_exactly_the_python_presets():
    for method, keys in METHODS.items():
        run = to_run_config(compose([f"method={method}"]))
        assert run.method == method
        for dotted, value in keys.items():
            node = run
            for part in dotted.split("."):
                node = getattr(node, part)
            assert node == value, (method, dotted)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("density", [0.1, 0.25, 0.5, 1.0])
def test_every_method_with_every_density(method, density):
    run = to_run_config(compose([f"method={method}", f"sparsity.density={density}"]))
    assert run.sparsity.density == density
    if method == "dense" and density != 1.0:
        with pytest.raises(ConfigError, match="sparsity.density"):
            check_config(run)
    else:
        check_config(run)


def cli(args, cwd, timeout=300, env_extra=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "smet_lab", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def mlflow_runs(db: Path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{db}")
    return mlflow.search_runs(search_all_experiments=True)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    proc = cli([*FAST, f"hydra.run.dir={tmp}/run", f"tracking.uri=sqlite:///{tmp}/mlflow.db",
                "train.checkpoint_every=20"], cwd=tmp)
    return tmp, proc


def test_end_to_end_run_is_tracked_in_mlflow(finished_run):
    import mlflow
    import pandas as pd
    from mlflow.tracking import MlflowClient

    tmp, proc = finished_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 40/40" in proc.stdout and "results in" in proc.stdout and "mlflow ui" in proc.stdout
    runs = mlflow_runs(tmp / "mlflow.db")
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["status"] == "FINISHED"
    assert run["params.sparsity.density"] == "0.25" and run["params.method"] == "smet"
    assert run["params.train.max_steps"] == "40" and run["params.optim.betas"] == "[0.9, 0.999]"
    assert run["tags.smet.method"] == "smet" and len(run["tags.smet.data_sha256"]) == 64
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    loss = client.get_metric_history(run["run_id"], "train/loss")
    assert [m.step for m in loss] == list(range(5, 41, 5))
    jumps = client.get_metric_history(run["run_id"], "stability/probe_jump")
    assert [m.step for m in jumps] == [10, 20, 30]
    for key in ["val/loss", "val/ppl", "train/lr", "train/grad_norm", "topo/density", "topo/regrown_fraction",
                "stability/regrow_update_ratio", "summary/final_val_loss", "summary/memory/state_bytes",
                "summary/memory/state_ratio_vs_dense_adam", "summary/tokens_per_s", "summary/mean_probe_jump"]:
        assert client.get_metric_history(run["run_id"], key), key
    names = {a.path for a in client.list_artifacts(run["run_id"])}
    assert {"config.yaml", "metrics.parquet", "loss_curve.png"} <= names
    local = Path(mlflow.artifacts.download_artifacts(run_id=run["run_id"], artifact_path="metrics.parquet",
                                                     tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}"))
    frame = pd.read_parquet(local)
    assert len(frame) == 40 and list(frame["step"]) == list(range(1, 41))
    # The full history has every step's loss; MLflow has every 5th: the values agree.
    by_step = dict(zip(frame["step"], frame["train/loss"]))
    for m in loss:
        assert by_step[m.step] == pytest.approx(m.value, rel=1e-6)
    assert (tmp / "run" / "checkpoints" / "step_20" / "state.pt").is_file()
    assert (tmp / "run" / "checkpoints" / "step_40" / "state.pt").is_file()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BAD_INPUTS = [
    (["sparsity.density=0"], "sparsity.density"),
    (["sparsity.density=1.5"], "sparsity.density"),
    (["train.max_steps=-5"], "train.max_steps"),
    (["train.max_steps=2.5"], "train.max_steps"),
    (["optim.regrow.warmup_steps=-1"], "optim.regrow.warmup_steps"),
    (["method=foo"], "method=foo"),
    (["model=llama_3m"], "model=llama_3m"),
    (["sparsity=banana"], "sparsity=banana"),
    (["train.maxsteps=5"], "train.maxsteps"),
    (["data=text_files"], "data.path"),
    (["data=text_files", "data.path=/nonexistent/*.jsonl"], "data.path"),
    (["data=text_files", "data.path="], "data.path"),
    (["data.tokenizer=hf:t5-base"], "data.tokenizer"),
    (["train.resume_from=/nonexistent/step_5"], "train.resume_from"),
    (["method=dense", "sparsity.density=0.5"], "sparsity.density"),
]


@pytest.mark.parametrize("args,key", BAD_INPUTS)
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, args, key):
    proc = cli([*args, f"hydra.run.dir={tmp_path}/run", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("smet_lab: error: ") and key in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run at all, so none left RUNNING


def test_unreachable_tracking_server(tmp_path):
    port = free_port()
    proc = cli([f"tracking.uri=http://127.0.0.1:{port}", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    assert proc.returncode == 2 and "tracking.uri" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_resume_from_a_checkpoint_of_another_model(finished_run, tmp_path):
    tmp, proc = finished_run
    assert proc.returncode == 0
    ckpt = tmp / "run" / "checkpoints" / "step_20"
    bad = cli([*FAST, "model=small", f"train.resume_from={ckpt}", f"hydra.run.dir={tmp_path}/run",
               f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"], cwd=tmp_path)
    assert bad.returncode == 2 and "train.resume_from" in bad.stderr and "model.dim" in bad.stderr
    assert not (tmp_path / "run").exists()
    good = cli([*FAST, f"train.resume_from={ckpt}", f"hydra.run.dir={tmp_path}/run2", "tracking=none"], cwd=tmp_path)
    assert good.returncode == 0, good.stderr[-2000:]


def test_ctrl_c_marks_the_run_killed(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "smet_lab", *FAST, "train.max_steps=100000",
                             f"hydra.run.dir={tmp_path}/run", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    line = ""
    while time.time() < deadline and "tracking to MLflow run" not in line:  # printed when training starts
        line = proc.stdout.readline()
    assert "tracking to MLflow run" in line
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "resume with train.resume_from=" in err
    runs = mlflow_runs(tmp_path / "mlflow.db")
    assert list(runs["status"]) == ["KILLED"]
    # The run stopped at a step boundary and left a checkpoint there to resume from.
    assert list((tmp_path / "run" / "checkpoints").glob("step_*/state.pt"))


def test_sigterm_also_marks_the_run_killed(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "smet_lab", *FAST, "train.max_steps=100000",
                             f"hydra.run.dir={tmp_path}/run", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = ""
    deadline = time.time() + 120
    while time.time() < deadline and "tracking to MLflow run" not in line:
        line = proc.stdout.readline()
    time.sleep(1)
    proc.terminate()
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert list(mlflow_runs(tmp_path / "mlflow.db")["status"]) == ["KILLED"]


def test_help_and_cfg_are_fast(tmp_path):
    tic = time.time()
    proc = cli(["--cfg", "job", "method=naive_dst"], cwd=tmp_path)
    elapsed = time.time() - tic
    assert proc.returncode == 0 and "method: naive_dst" in proc.stdout and "reset_step: false" in proc.stdout
    proc = cli(["--help"], cwd=tmp_path)
    assert proc.returncode == 0 and "method" in proc.stdout
    print(f"--cfg job took {elapsed:.2f}s")
    modules = subprocess.run([sys.executable, "-c", "import smet_lab.cli, sys; print(sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules))"],
                             capture_output=True, text=True, cwd=tmp_path)
    assert modules.stdout.strip() == "[]"
