"""smet_lab.tracking against a real MLflow: a sqlite store in tmp and a real `mlflow server` on loopback."""

import json
import math
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import mlflow
from mlflow.tracking import MlflowClient

from helpers import free_port
from smet_lab.config import ConfigError
from smet_lab.tracking import (NullTracker, TrackingConfig, check_tracking, continue_run, find_or_start_run,
                               flatten, resolve_uri, start_run, write_run_artifacts)

CONFIG = {
    "model": {"name": "tiny", "dim": 64},
    "optim": {"lr": 0.001, "betas": [0.9, 0.999], "regrow": {"warmup_steps": 10, "reset_step": True}},
    "data": {"name": "pysource", "path": None},
    "sparsity": {"dense_patterns": ["embed", "head"]},
}
FLAT = {  # written by hand
    "model.name": "tiny", "model.dim": "64",
    "optim.lr": "0.001", "optim.betas": "[0.9, 0.999]",
    "optim.regrow.warmup_steps": "10", "optim.regrow.reset_step": "True",
    "data.name": "pysource", "data.path": "None",
    "sparsity.dense_patterns": "[embed, head]",
}


def make_history(n=30, eval_every=5, update_every=10):
    """Shaped like RunResult.history: val/loss every eval, topo/* only at topology updates."""
    rows = []
    for s in range(1, n + 1):
        row = {"step": s, "train/loss": 5.0 - 0.1 * s + 0.05 * (s % 3), "train/lr": 1e-3 * min(1, s / 5)}
        if eval_every and s % eval_every == 0:
            row["val/loss"] = 5.2 - 0.1 * s
        if update_every and s % update_every == 0:
            row.update({"topo/density": 0.1, "stability/probe_jump": 0.01 * s})
        rows.append(row)
    return rows


def log_history(tracker, history):
    for row in history:
        tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, row["step"])


def git_head(cwd):
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    """One sqlite store for the module (creating its tables costs ~4 s)."""
    return tmp_path_factory.mktemp("store") / "mlflow.db"


@pytest.fixture
def runs_of(monkeypatch):
    """mlflow.search_runs as a user would call it; the global URI it needs is undone afterwards."""
    def search(uri, experiment):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        return mlflow.search_runs(experiment_names=[experiment]).set_index("run_id")
    yield search
    mlflow.set_tracking_uri(None)


def test_flatten():
    assert flatten(CONFIG) == FLAT
    assert flatten({"a": {"b": (1, 2)}, "c": {}}, prefix="x.") == {"x.a.b": "[1, 2]", "x.c": "{}"}
    long = flatten({"s": "y" * 10_000})["s"]
    assert len(long) == 6000 and long.endswith("...")


def test_import_is_cheap():
    code = ("import sys, smet_lab.tracking; "
            "print(sorted(m for m in ('mlflow', 'pandas', 'matplotlib', 'omegaconf', 'torch', 'ray', 'hydra')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_run_roundtrip(db, tmp_path, runs_of):
    uri = f"sqlite:///{db}"
    cfg = TrackingConfig(uri=uri, experiment="roundtrip")
    history = make_history()
    with start_run(cfg, "r1", CONFIG, {"smet.method": "smet"}) as tracker:
        log_history(tracker, history)
        paths = write_run_artifacts(history, CONFIG, tmp_path / "art", title="roundtrip")
        tracker.log_artifacts(paths)
    assert [p.name for p in paths] == ["config.yaml", "metrics.parquet", "loss_curve.png"]

    runs = runs_of(uri, "roundtrip")
    assert list(runs.index) == [tracker.run_id]
    run = runs.loc[tracker.run_id]
    assert run["status"] == "FINISHED"
    assert {c[7:]: v for c, v in run.items() if c.startswith("params.")} == FLAT
    assert run["tags.smet.method"] == "smet" and run["tags.smet.status"] == "FINISHED"
    assert run["tags.mlflow.runName"] == "r1"
    sha = git_head(os.getcwd())  # the test's cwd: the repo checkout, or no tag at all
    if sha:
        assert run["tags.smet.git_sha"] == sha
    else:
        assert "tags.smet.git_sha" not in runs

    client = MlflowClient(uri)
    for key in ("train/loss", "train/lr", "val/loss", "topo/density", "stability/probe_jump"):
        got = sorted((m.step, m.value) for m in client.get_metric_history(tracker.run_id, key))
        assert got == [(r["step"], r[key]) for r in history if key in r], key

    # Artifacts sit next to the DB (not in ./mlruns) and are byte-identical to the written files.
    assert client.get_experiment_by_name("roundtrip").artifact_location == str(db.parent / "mlartifacts" / "roundtrip")
    assert sorted(f.path for f in client.list_artifacts(tracker.run_id)) == sorted(p.name for p in paths)
    stored = Path(client.get_run(tracker.run_id).info.artifact_uri)
    assert stored.is_relative_to(db.parent / "mlartifacts")
    for p in paths:
        assert (stored / p.name).read_bytes() == p.read_bytes()


def test_artifact_files(tmp_path):
    import pandas as pd
    import yaml
    from matplotlib.image import imread

    history = make_history(40)
    history[7]["train/loss"] = float("nan")
    config_path, parquet, png = write_run_artifacts(history, CONFIG, tmp_path, title="t")
    assert yaml.safe_load(config_path.read_text()) == CONFIG

    df = pd.read_parquet(parquet)
    keys = {k for r in history for k in r}
    assert set(df.columns) == keys and df.columns[0] == "step"
    assert df["step"].tolist() == [r["step"] for r in history]
    for i, row in enumerate(history):
        for k in keys - {"step"}:
            v = df.at[i, k]
            if k not in row or math.isnan(row[k]):
                assert math.isnan(v), (i, k)
            else:
                assert v == row[k], (i, k)

    img = imread(png)
    assert img.shape == (450, 800, 4) and img[..., :3].std() > 0.05  # 8x4.5 in at 100 dpi, not blank

    # No eval and no topology update at all: still three files.
    bare = write_run_artifacts(make_history(5, eval_every=0, update_every=0), {}, tmp_path / "bare")
    assert all(p.stat().st_size > 0 for p in bare)
    assert list(pd.read_parquet(bare[1]).columns) == ["step", "train/loss", "train/lr"]


def test_buffering_and_non_finite(db):
    uri = f"sqlite:///{db}"
    client = MlflowClient(uri)
    with start_run(TrackingConfig(uri=uri, experiment="buffer"), "b", {}, {}) as tracker:
        for s in range(250):
            tracker.log_metrics({"x": float(s)}, s)
        assert len(client.get_metric_history(tracker.run_id, "x")) == 200  # one flush so far
        tracker.log_metrics({"nan": math.nan}, 1)
        tracker.log_metrics({"nan": math.inf}, 2)
        tracker.log_metrics({"nan": -math.inf}, 3)
    assert [m.value for m in client.get_metric_history(tracker.run_id, "x")] == [float(s) for s in range(250)]
    # MLflow 3.17 accepts non-finite values: NaN is kept, +-inf is clamped to the largest double.
    got = sorted((m.step, m.value) for m in client.get_metric_history(tracker.run_id, "nan"))
    assert math.isnan(got[0][1]) and got[1:] == [(2, sys.float_info.max), (3, -sys.float_info.max)]


def test_statuses_never_left_running(db, runs_of):
    uri = f"sqlite:///{db}"
    cfg = TrackingConfig(uri=uri, experiment="statuses")
    with pytest.raises(RuntimeError):
        with start_run(cfg, "boom", {}, {}) as failed:
            raise RuntimeError("boom " + "x" * 1000)
    with pytest.raises(KeyboardInterrupt):
        with start_run(cfg, "ctrl-c", {}, {}) as killed:
            raise KeyboardInterrupt
    with start_run(cfg, "diverged", {}, {}) as diverged:
        diverged.finish("DIVERGED")
        diverged.finish("FINISHED")  # idempotent: the first call wins
    # A sweep holds a parent and children at once (no global active run).
    parent = start_run(cfg, "sweep", {}, {"smet.kind": "sweep"})
    children = [start_run(cfg, f"trial{i}", {"seed": i}, {}, parent_run_id=parent.run_id) for i in range(2)]
    for c in children:
        c.finish()
    parent.finish()
    with pytest.raises(ValueError):
        parent.finish("DONE")

    runs = runs_of(uri, "statuses")
    assert len(runs) == 6 and not (runs["status"] == "RUNNING").any()
    status = runs["status"].to_dict()
    tag = lambda run, key: runs.at[run.run_id, f"tags.{key}"]  # noqa: E731
    assert status[failed.run_id] == "FAILED" and tag(failed, "smet.status") == "FAILED"
    assert tag(failed, "smet.error") == ("RuntimeError: boom " + "x" * 1000)[:500]
    assert status[killed.run_id] == "KILLED" and tag(killed, "smet.status") == "KILLED"
    assert status[diverged.run_id] == "FAILED" and tag(diverged, "smet.diverged") == "true"
    assert tag(diverged, "smet.status") == "DIVERGED"
    for c in children:
        assert status[c.run_id] == "FINISHED" and tag(c, "mlflow.parentRunId") == parent.run_id
    assert runs.at[children[1].run_id, "params.seed"] == "1"


def test_own_tags_reach_every_kind_of_run(db, runs_of):
    uri = f"sqlite:///{db}"
    cfg = TrackingConfig(uri=uri, experiment="own_tags", tags={"owner": "alice", "study/id": "T-1"})
    run = start_run(cfg, "run", {}, {"smet.method": "smet"})
    run.finish()
    parent = find_or_start_run(cfg, "sweep", {}, {"smet.kind": "sweep"}, match={"smet.sweep_dir": "/s"})
    child = find_or_start_run(cfg, "trial", {}, {"smet.kind": "trial"}, match={"smet.trial_key": "k"},
                              parent_run_id=parent.run_id)
    child.finish()
    parent.finish()
    # A resumed sweep (the same runs found again) and a resumed run, both with one more tag.
    later = TrackingConfig(uri=uri, experiment="own_tags", tags={"owner": "alice", "round": "2"})
    again = find_or_start_run(later, "sweep", {}, {"smet.kind": "sweep"}, match={"smet.sweep_dir": "/s"})
    assert again.run_id == parent.run_id
    again.finish()
    continue_run(later, run.run_id, {"smet.resumed": "true"}).finish()

    runs = runs_of(uri, "own_tags")
    assert set(runs.index) == {run.run_id, parent.run_id, child.run_id}
    assert runs["tags.owner"].eq("alice").all()
    assert runs["tags.study/id"].eq("T-1").all()
    assert runs["tags.round"].fillna("-").to_dict() == {run.run_id: "2", parent.run_id: "2", child.run_id: "-"}
    assert runs.at[run.run_id, "tags.smet.method"] == "smet" and runs.at[child.run_id, "tags.smet.kind"] == "trial"


@pytest.mark.parametrize("name, allowed", [("smet.method", "outside smet_lab's and MLflow's own tags"),
                                           ("mlflow.runName", "outside smet_lab's and MLflow's own tags"),
                                           ("a:b", "a tag name of letters"), ("../x", "a tag name of letters")])
def test_a_bad_tag_name_is_refused_before_any_run(tmp_path, name, allowed):
    with pytest.raises(ConfigError) as e:
        check_tracking(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", tags={name: "v"}))
    assert str(e.value).startswith(f"tracking.tags.{name}='v' is not allowed: ") and allowed in str(e.value)
    assert not (tmp_path / "mlflow.db").exists()


def test_relative_uri_and_no_git(db, monkeypatch, runs_of):
    monkeypatch.chdir(db.parent)  # a tmp dir: relative to it, and (normally) outside any git checkout
    assert resolve_uri("sqlite:///mlflow.db") == f"sqlite:///{db}"
    tracker = start_run(TrackingConfig(uri="sqlite:///mlflow.db", experiment="relative"), "rel", {}, {})
    tracker.finish()
    runs = runs_of(f"sqlite:///{db}", "relative")  # the same absolute DB
    assert list(runs.index) == [tracker.run_id]
    if git_head(db.parent) is None:
        assert "tags.smet.git_sha" not in runs


OPEN_AT_ONCE = """
import sys, time
from pathlib import Path
import mlflow.store.tracking.sqlalchemy_store  # imported before the start signal, so the opens coincide
from smet_lab.tracking import TrackingConfig, start_run
print("ready", flush=True)
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.001)
start_run(TrackingConfig(uri=sys.argv[1], experiment="at_once"), "r", {"a": 1}, {}).finish()
"""


def test_processes_opening_a_new_database_at_once_all_get_their_run(tmp_path, runs_of):
    # MLflow creates a new SQLite database's tables on first open; two processes doing it at once used
    # to fail ("table alembic_version already exists"): two runs started in one folder at the same time.
    uri, go = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_AT_ONCE, uri, str(go)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for p in procs:
        assert p.stdout.readline() == "ready\n"
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    runs = runs_of(uri, "at_once")
    assert len(runs) == 3 and set(runs["status"]) == {"FINISHED"}


def test_disabled(tmp_path):
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path}/missing/mlflow.db", enabled=False)
    check_tracking(cfg)  # nothing to check
    with start_run(cfg, "off", CONFIG, {}) as tracker:
        assert isinstance(tracker, NullTracker) and tracker.run_id is None
        tracker.log_metrics({"x": 1.0}, 1)
        tracker.log_artifacts([tmp_path])
    assert list(tmp_path.iterdir()) == []


def test_check_tracking_sqlite(tmp_path, monkeypatch):
    check_tracking(TrackingConfig(uri=f"sqlite:///{tmp_path}/new.db"))
    assert not (tmp_path / "new.db").exists()  # a check only
    monkeypatch.chdir(tmp_path)
    check_tracking(TrackingConfig(uri="sqlite:///mlflow.db"))
    for uri in (f"sqlite:///{tmp_path}/missing/mlflow.db", "sqlite:///missing/mlflow.db"):
        with pytest.raises(ConfigError, match="is not an existing directory") as e:
            check_tracking(TrackingConfig(uri=uri))
        assert e.value.key == "tracking.uri" and str(tmp_path / "missing") in str(e.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_check_tracking_read_only_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    with pytest.raises(ConfigError, match="not writable"):
        check_tracking(TrackingConfig(uri=f"sqlite:///{ro}/mlflow.db"))


@pytest.mark.parametrize("uri", ["file:///tmp/mlruns", "./mlruns", "postgresql://u@h/db", "databricks",
                                 "sqlite://", "http://", "http://localhost:port", "ftp://h:1"])
def test_check_tracking_bad_scheme(uri):
    with pytest.raises(ConfigError) as e:
        check_tracking(TrackingConfig(uri=uri))
    assert e.value.key == "tracking.uri" and str(e.value).startswith(f"tracking.uri={uri!r}")


def test_check_tracking_no_server():
    uri = f"http://127.0.0.1:{free_port()}"  # bound then released: nothing listens there
    with pytest.raises(ConfigError, match="no MLflow server answers at") as e:
        check_tracking(TrackingConfig(uri=uri))
    assert e.value.key == "tracking.uri" and "\n" not in str(e.value)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A lean `mlflow server` (1 worker, no job runner) on a free loopback port; always stopped."""
    home = tmp_path_factory.mktemp("server")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{home}/server.db",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = open(home / "server.log", "wb")
    # cwd=home: the server's artifact store (./mlartifacts) lands in tmp.
    proc = subprocess.Popen(cmd, cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (home / "server.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(url + "/health", timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "mlflow server not ready in 60 s"
                time.sleep(0.25)
        yield url
    finally:
        proc.terminate()  # SIGTERM to the CLI stops its uvicorn worker too
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def rest(url, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


@pytest.mark.e2e
def test_http_server(server, tmp_path):
    cfg = TrackingConfig(uri=server + "/", experiment="remote")
    check_tracking(cfg)
    history = make_history(12)
    with start_run(cfg, "remote-run", CONFIG, {"smet.method": "naive_dst"}) as tracker:
        log_history(tracker, history)
        tracker.log_artifacts(write_run_artifacts(history, CONFIG, tmp_path, "remote"))

    exp = rest(server, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=remote")["experiment"]
    runs = rest(server, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
    assert len(runs) == 1
    info, data = runs[0]["info"], runs[0]["data"]
    assert info["run_id"] == tracker.run_id and info["status"] == "FINISHED" and info["run_name"] == "remote-run"
    assert {p["key"]: p["value"] for p in data["params"]} == FLAT
    tags = {t["key"]: t["value"] for t in data["tags"]}
    assert tags["smet.method"] == "naive_dst" and tags["smet.status"] == "FINISHED"
    for key in ("train/loss", "val/loss", "topo/density"):
        got = rest(server, f"/api/2.0/mlflow/metrics/get-history?run_id={tracker.run_id}&metric_key={key}")
        got = sorted((m["step"], m["value"]) for m in got["metrics"])
        assert got == [(r["step"], r[key]) for r in history if key in r], key
    files = rest(server, f"/api/2.0/mlflow/artifacts/list?run_id={tracker.run_id}")["files"]
    assert sorted(f["path"] for f in files) == ["config.yaml", "loss_curve.png", "metrics.parquet"]


@pytest.mark.e2e
def test_a_sweep_a_run_and_their_reports_on_a_tracking_server(server, tmp_path):
    """The cluster set-up's tracking (`tracking.uri=http://...`): a sweep's parent and children and a single
    run land on the server, the run's last line points at the server's own UI, and the reports read it back."""
    from helpers import run_cli

    uri = f"tracking.uri={server}"
    sweep = run_cli(["+sweep=smoke", uri, "tracking.experiment=served", f"ray.storage={tmp_path}/sw"],
                    cwd=tmp_path, timeout=400)
    assert sweep.returncode == 0, sweep.stdout[-2000:] + sweep.stderr[-2000:]
    single = run_cli(["train.max_steps=20", "data=synthetic", uri, "tracking.experiment=served",
                      f"hydra.run.dir={tmp_path}/o2"], cwd=tmp_path, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    assert single.stdout.rstrip().endswith(f"in experiment 'served' at {server}; dashboards: {server}")
    exp = rest(server, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=served")["experiment"]
    runs = rest(server, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
    kinds = sorted({t["key"]: t["value"] for t in r["data"]["tags"]}["smet.kind"] for r in runs)
    assert kinds == ["run", "sweep", "trial", "trial"] and {r["info"]["status"] for r in runs} == {"FINISHED"}
    for target, rows in (("smoke", 2), ("served", 1)):  # the sweep; the experiment's single run
        proc = subprocess.run([sys.executable, "-m", "smet_lab.report", target, "--tracking-uri", server,
                               "--out", str(tmp_path / target)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        trials = (tmp_path / target / "trials.csv").read_text().strip().splitlines()
        assert len(trials) == 1 + rows, trials


def test_a_folder_is_writable_only_where_one_can_be_made(tmp_path):
    from smet_lab.config import check_writable_dir

    check_writable_dir("--out", tmp_path / "a" / "b")
    assert list(tmp_path.iterdir()) == []  # the probe folder is gone again
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        check_writable_dir("--out", tmp_path / "file" / "sub")
    if Path("/proc/self").is_dir():  # access() says yes to root there, mkdir says no
        with pytest.raises(ConfigError, match=r"making one in /proc failed"):
            check_writable_dir("--out", "/proc/smet_lab_out")
