"""The Hydra command line: config composition, end-to-end runs tracked in MLflow, bad inputs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from helpers import e2e, free_port, run_cli as cli, start_cli
from smet_lab.compose import compose, resume_overrides, to_run_config
from smet_lab.preflight import CONF_DIR
from smet_lab.config import ConfigError
from smet_lab.model import PRESETS
from smet_lab.methods import METHODS
from smet_lab.train import check_config

GROUPS = ["model", "data", "method", "sparsity", "optim", "train", "tracking", "ray"]
FAST = ["data=synthetic", "train.max_steps=40", "train.eval_every=20", "train.log_every=5",
        "sparsity.update_every=10", "train.probe_window=5", "train.batch_size=4", "train.eval_batches=2",
        "train.probe_batch_size=8"]


def options(group):
    from smet_lab.preflight import group_options

    return group_options(group)


def test_defaults_list_and_sweep_not_in_it():
    defaults = OmegaConf.load(CONF_DIR / "config.yaml").defaults
    groups = [next(iter(d)) for d in defaults if not isinstance(d, str) and not next(iter(d)).startswith("override ")]
    assert groups == GROUPS[:2] + ["sparsity", "optim", "train", "tracking", "ray", "experiment", "method"]
    assert "sweep" not in groups  # appended by +sweep=NAME
    cfg = compose([])
    assert cfg.method == "smet" and cfg.model.name == "tiny" and cfg.data.name == "pysource"
    assert cfg.sweep is None


def test_presets_have_one_source():
    # Model presets: conf/model/*.yaml and smet_lab.model.PRESETS name the same sizes (values: below).
    assert options("model") == list(PRESETS)  # and listed by size, as PRESETS declares them
    # Method presets: the `method` options are built from smet_lab.methods.METHODS; no YAML copies.
    assert options("method") == sorted(METHODS) and not (CONF_DIR / "method").exists()


# The released SMET scripts (steps, global batch, density) and the paper's Figure 1 (LLaMA-240M, 1.3 B
# tokens at density 0.25), as tabulated from the released code and the paper, independently of the YAML.
RECIPES = {"released_130m": ("llama_130m", 20_000, 0.5), "released_350m": ("llama_350m", 60_000, 0.5),
           "paper_fig1": ("llama_240m", 10_000, 0.25)}


def test_every_experiment_is_the_recipe_it_names(tmp_path, hf_tok_dir):
    assert options("experiment") == sorted(RECIPES)
    shard = tmp_path / "c4-train.00000-of-01024.json"
    shard.write_text('{"text": "the cat sat on the mat"}\n' * 50)
    local = [f"data.path={shard}", f"data.tokenizer=hf:{hf_tok_dir}", "train.device=cpu"]  # no hub, no GPU here
    for name, (model, steps, density) in RECIPES.items():
        cfg = compose([f"experiment={name}", *local])
        assert cfg.tracking.tags == {"experiment": name}  # the MLflow tag that finds its runs
        run = to_run_config(cfg)
        check_config(run, fit_here=False)
        t, o = run.train, run.optim
        assert (run.model.name, run.data.name, t.max_steps, run.sparsity.density) == (model, "c4", steps, density)
        assert (run.model.dim, run.model.ffn_dim, run.model.n_layers, run.model.n_heads) == PRESETS[model][:4]
        assert t.batch_size * t.grad_accum == 512 and run.model.seq_len == 256 and t.dtype == "bfloat16"
        assert o.warmup_steps == steps // 20 and o.grad_clip == 0.0 and o.lr == 1e-3  # 5 % warm-up, no clipping
        assert o.lr_scaling.scope == "all" and run.sparsity.prune_rate == 0.2 and run.sparsity.update_every == 100
        # One pass: the corpus holds every training window of the run exactly once (windows of 257, stride 256).
        assert (run.data.max_tokens - 1) // 256 == steps * 512
        assert run.method == "smet" and o.regrow.warmup_steps == 100 and o.lr_scaling.rule == "inverse"
    # Precedence: group defaults < experiment < method preset < command line.
    assert to_run_config(compose(["experiment=released_130m", "method=dense"])).sparsity.density == 1.0
    run = to_run_config(compose(["experiment=released_130m", "method=naive_dst", "sparsity.density=0.1", "model=tiny"]))
    assert (run.sparsity.density, run.model.name, run.optim.lr_scaling.rule, run.train.max_steps) == \
        (0.1, "tiny", "none", 20_000)
    # A sweep on top: every trial is the recipe, with the grid's density and method.
    from smet_lab.compose import group_composer
    from smet_lab.sweep.runner import plan

    overrides = ["experiment=paper_fig1", "+sweep=density", *local, f"ray.storage={tmp_path}"]
    trials = plan(compose(overrides), group_composer(overrides))[2].values()
    assert {(c["model"]["name"], c["train"]["max_steps"], c["data"]["max_tokens"]) for c in trials} == \
        {("llama_240m", 10_000, 1_310_720_001)}
    assert sorted((c["sparsity"]["density"], c["method"]) for c in trials) == \
        [(0.1, "naive_dst"), (0.1, "smet"), (0.25, "naive_dst"), (0.25, "smet"), (0.5, "naive_dst"), (0.5, "smet"),
         (1.0, "dense")]


@pytest.mark.parametrize("override, message", [
    ("model=null", "model=null is not allowed: one of tiny, small, llama_9m, llama_20m, "),
    ("method=null", "method=null is not allowed: one of dense, naive_dst, smet, smet_no_reset, smet_no_scaling, "
                    "smet_no_warmup, static (leave method= out for the default)"),
    ("+sweep=null", "+sweep=null is not allowed: one of ablation, density, grid, "),
    ("experiment=NULL", "experiment=null is not allowed: one of paper_fig1, released_130m, released_350m "
                        "(leave experiment= out for none)"),
    ("data.max_tokens=null", "data.max_tokens=null is not allowed: a value of type int is required, not null"),
    ("tracking.uri=null", "tracking.uri=null is not allowed: a value of type str is required, not null"),
    ("optim.betas=null", "optim.betas=null is not allowed: a value of type List[float] is required, not null"),
    ("+sweep=smoke sweep.resume=maybe", "sweep.resume=maybe is not allowed: must be a bool: true or false"),
])
def test_null_or_a_value_of_the_wrong_kind_gets_one_line(override, message):
    from smet_lab.cli import BadInput, preflight

    with pytest.raises(BadInput) as e:
        preflight(override.split())
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize("override, message", [
    ("hydra/job_logging=disabeld", "hydra/job_logging=disabeld is not allowed: one of default, disabled, none, stdout; "
                                   "did you mean disabled?"),
    ("hydra/job_loging=none", "hydra/job_loging=none is not allowed: no such config group; did you mean hydra/job_logging?"),
    ("+hydra/job_logging=stdout", "+hydra/job_logging=stdout is not allowed: hydra/job_logging is in the defaults list; "
                                  "choose it without the plus: hydra/job_logging=stdout"),
    ("hydra.job.nme=x", "hydra.job.nme=x is not allowed: unknown key; did you mean hydra.job.name?; known keys of "
                        "hydra.job: name, chdir, "),
    ("hydra.job.env_set.OMP_NUM_THREADS=1", "hydra.job.env_set.OMP_NUM_THREADS=1 is not allowed: a new key of "
                                            "hydra.job.env_set takes a plus: +hydra.job.env_set.OMP_NUM_THREADS=1"),
    ("hydra.job.chdir=true", "hydra.job.chdir=true is not allowed: only false: smet_lab stays in the folder it is "
                             "started from, where relative paths are read"),
    ("hydra.mode=MULTIRUN", "hydra.mode=MULTIRUN is not allowed: -m (or --multirun) runs the values of KEY=A,B"),
    ("+hydra.launcher.n_jobs=2", "hydra.launcher.n_jobs=2 is not allowed: smet_lab runs a -m multirun as a Ray Tune sweep"),
    ("~hydra/sweeper", "~hydra/sweeper is not allowed: smet_lab runs a -m multirun"),
    ("hydra.sweep.dir=/tmp/x", "hydra.sweep.dir=/tmp/x is not allowed: not read: a sweep writes into sweeps/<sweep.name>, "
                               "or <ray.storage>/<sweep.name> with ray.storage=DIR"),
])
def test_hydra_settings_smet_lab_does_not_read_get_one_line(override, message):
    """Hydra would accept these and nothing would change (the run in the output folder's own MLflow
    database with chdir, a launcher that never launches), or answer with a traceback or a garbled line."""
    from smet_lab.cli import BadInput, preflight

    with pytest.raises(BadInput) as e:
        preflight([override])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_hydra_settings_it_reads_pass():
    from smet_lab.cli import preflight

    overrides = ["hydra.job.chdir=false", "+hydra.job.env_set.OMP_NUM_THREADS=1", "hydra/job_logging=stdout"]
    preflight(overrides)  # no BadInput
    hydra_cfg = compose(overrides, with_hydra=True).hydra
    assert (hydra_cfg.job.chdir, dict(hydra_cfg.job.env_set), hydra_cfg.runtime.choices["hydra/job_logging"]) == (
        False, {"OMP_NUM_THREADS": "1"}, "stdout")


@pytest.mark.e2e
def test_an_experiment_trains_at_toy_size_and_tags_its_run(tmp_path, hf_tok_dir):
    import pandas as pd

    shard = tmp_path / "c4-train.00000-of-01024.json"
    shard.write_text("".join(f'{{"text": "the cat sat on the mat {"a dog ate the bone " * (i % 7)}"}}\n'
                             for i in range(300)))
    toy = ["model=tiny", "train.device=cpu", "train.max_steps=20", "train.batch_size=4", "train.grad_accum=1",
           "model.seq_len=32", "data.max_tokens=6000", "data.val_fraction=0.1", f"data.cache_dir={tmp_path}/cache"]
    proc = cli(["experiment=paper_fig1", f"data.path={shard}", f"data.tokenizer=hf:{hf_tok_dir}", *toy,
                f"hydra.run.dir={tmp_path}/run", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = mlflow_runs(tmp_path / "mlflow.db").to_dict("records")
    assert run["tags.experiment"] == "paper_fig1" and run["params.train.dtype"] == "bfloat16"
    assert (run["params.sparsity.density"], run["params.sparsity.prune_rate"]) == ("0.25", "0.2")
    history = pd.read_parquet(tmp_path / "run" / "metrics.parquet").set_index("step")
    # The recipe's schedule at step 20: alpha_0 = 1e-3 in a 500-step linear warm-up; every layer's rate
    # scaled by 1/d = 4 (lr_scaling.scope=all).
    assert history.at[20, "train/lr"] == pytest.approx(1e-3 * 20 / 500)
    assert history.at[20, "train/lr_sparse"] == pytest.approx(4 * 1e-3 * 20 / 500)


def test_an_output_folder_that_cannot_be_made_is_refused_before_anything_runs(tmp_path):
    from smet_lab.cli import BadInput, preflight

    (tmp_path / "a_file").write_text("")
    with pytest.raises(BadInput) as e:
        preflight([f"hydra.run.dir={tmp_path}/a_file/run", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
    assert str(e.value) == (f"hydra.run.dir='{tmp_path}/a_file/run' is not allowed: a folder that can be written "
                            f"({tmp_path}/a_file is a file)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.parametrize("argv, message", [
    (["--dry-run"], "--dry-run is not an option; did you mean --plan? (smet_lab's: --plan, -m, --help;"),
    (["--multirn", "a=1"], "--multirn is not an option; did you mean --multirun?"),
    (["--plan=true"], "--plan=true is not an option: --plan takes no value"),
    (["-x"], "-x is not an option (smet_lab's"),
    (["--cfg", "jobb"], "--cfg jobb is not an option: --cfg takes job, hydra or all; did you mean job?"),
    (["--cfg=hydr"], "--cfg hydr is not an option: --cfg takes job, hydra or all; did you mean hydra?"),
    (["model=small", "-c"], "-c (nothing) is not an option: -c takes job, hydra or all"),
])
def test_a_flag_nobody_knows_is_one_line(argv, message):
    from smet_lab.preflight import unknown_flag

    assert unknown_flag(argv).startswith(message)


def test_known_flags_pass(tmp_path):
    from smet_lab.preflight import unknown_flag

    assert unknown_flag(["--cfg", "job", "--cfg=job", "-c", "job", "--plan", "-m", "--multirun", "--hydra-help",
                         "--resolve", "-cp", "/x", "--config-name=config", "a=1", "~b"]) is None
    proc = cli(["--dry-run", "train.max_steps=3"], cwd=tmp_path)  # Hydra's answer was its usage text
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "did you mean --plan?" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_claim_folder_never_hands_out_a_taken_folder(tmp_path):
    from smet_lab.config import claim_folder

    base = tmp_path / "day" / "12-00-00-smet"
    got = [claim_folder(base) for _ in range(3)]
    assert got == [base, tmp_path / "day" / "12-00-00-smet-2", tmp_path / "day" / "12-00-00-smet-3"]
    assert all(p.is_dir() for p in got)


def test_path_settings_are_anchored_at_the_folder_a_command_started_in(tmp_path):
    from smet_lab.config import anchor_config, anchored

    (tmp_path / "tok").mkdir()
    cases = [("data.path", "shards/*.json.gz", f"{tmp_path}/shards/*.json.gz"), ("data.path", "/abs.txt", "/abs.txt"),
             ("data.path", "~/c4", "~/c4"), ("data.cache_dir", "auto", "auto"), ("data.cache_dir", None, None),
             ("data.tokenizer", "byte", "byte"), ("data.tokenizer", "hf:t5-base", "hf:t5-base"),  # a hub name
             ("data.tokenizer", "hf:tok", f"hf:{tmp_path}/tok"), ("tracking.uri", "sqlite:///mlflow.db",
             f"sqlite:///{tmp_path}/mlflow.db"), ("tracking.uri", "http://host:5000", "http://host:5000"),
             ("train.resume_from", "outputs/x", f"{tmp_path}/outputs/x"), ("model.name", "tiny", "tiny")]
    for key, value, expected in cases:
        assert anchored(key, value, tmp_path) == expected, (key, value)
    config = {"data": {"path": "a.txt", "cache_dir": "cache"}, "train": {"resume_from": None}, "tracking": {}}
    assert anchor_config(config, tmp_path) == {"data": {"path": f"{tmp_path}/a.txt", "cache_dir": f"{tmp_path}/cache"},
                                               "train": {"resume_from": None}, "tracking": {}}


def test_a_config_error_survives_the_trip_from_a_ray_trial():
    """Ray pickles a trial's exception to the driver; rebuilt from its message alone, a ConfigError became
    "TypeError: ConfigError.__init__() missing 2 required positional arguments"."""
    import pickle

    error = pickle.loads(pickle.dumps(ConfigError("data.path", "corpus.txt", "no such file")))
    assert (error.key, error.value, error.allowed) == ("data.path", "corpus.txt", "no such file")
    assert str(error) == "data.path='corpus.txt' is not allowed: no such file"


def test_a_run_never_writes_into_another_runs_default_folder(tmp_path):
    # Hydra's default output folder is named by the second, so two runs started in the same second
    # shared it. Every name the default can take in the next minute and a half is taken here first.
    import re
    from datetime import datetime, timedelta

    now = datetime.now()
    taken = [tmp_path / "outputs" / t.strftime("%Y-%m-%d") / f"{t.strftime('%H-%M-%S')}-smet"
             for t in (now + timedelta(seconds=s) for s in range(-1, 90))]
    for d in taken:
        d.mkdir(parents=True)
        (d / "other_run.txt").write_text("not yours")
    proc = cli([*FAST, "train.max_steps=3", "tracking=none"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = Path(re.search(r"results in (\S+)", proc.stdout).group(1))
    assert out.name.endswith("-smet-2") and out.with_name(out.name[:-2]) in taken
    assert (out / "metrics.parquet").is_file()
    assert all([p.name for p in d.iterdir()] == ["other_run.txt"] for d in taken)


def test_plan_of_one_run_says_its_size_and_writes_nothing(tmp_path):
    proc = cli([*FAST, "model=llama_20m", "--plan", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    d, ffn, layers, _, seq = PRESETS["llama_20m"]
    n = 2 * 256 * d + layers * (4 * d * d + 3 * d * ffn + 2 * d) + d  # embedding and head, blocks, final norm
    assert proc.stdout.splitlines()[:2] == [
        f"one run: smet at density 0.25 (uniform, dense weights), model llama_20m ({n / 1e6:,.1f} M parameters, "
        "vocabulary 256)",
        f"  training: 40 steps x 4 sequences x {seq} tokens = {40 * 4 * seq:,} tokens of data=synthetic on cpu"]
    assert list(tmp_path.iterdir()) == [] and "note:" not in proc.stdout  # FAST updates every 10 of 40 steps
    short = cli([*FAST, "--plan", "train.max_steps=10", "tracking=none"], cwd=tmp_path)
    assert "  note:     no topology update in 10 steps (the first comes at sparsity.update_every=10)" in short.stdout
    bad = cli([*FAST, "--plan", "sparsity.density=2"], cwd=tmp_path)  # a plan checks everything a run checks
    assert bad.returncode == 2 and bad.stderr.startswith("smet_lab: error: sparsity.density=2")


def test_a_sweep_on_cuda_must_give_its_trials_gpus():
    from smet_lab.cli import BadInput, preflight

    with pytest.raises(BadInput, match=r"^ray.gpus_per_trial=0.0 is not allowed: > 0 when the trials train on CUDA"):
        preflight(["experiment=paper_fig1", "+sweep=ablation"])


def test_an_experiment_with_a_plus_gets_one_line():
    from smet_lab.cli import BadInput, preflight

    with pytest.raises(BadInput, match=r"^\+experiment=paper_fig1 is not allowed: experiment is in the defaults "
                                       r"list; choose it without the plus: experiment=paper_fig1$"):
        preflight(["+experiment=paper_fig1"])
    with pytest.raises(BadInput, match=r"^experiment=paper_fig is not allowed: one of paper_fig1, released_130m, "
                                       r"released_350m; did you mean paper_fig1\?$"):
        preflight(["experiment=paper_fig"])


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
            check_config(run, fit_here=False)  # valid everywhere; whether it fits this machine is another check


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


def mlflow_runs(db: Path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{db}")
    return mlflow.search_runs(search_all_experiments=True)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    proc = cli([*FAST, f"hydra.run.dir={tmp}/run", f"tracking.uri=sqlite:///{tmp}/mlflow.db",
                "train.checkpoint_every=20", "+tracking.tags.owner=alice"], cwd=tmp)
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
    assert run["tags.owner"] == "alice" and run["params.tracking.tags.owner"] == "alice"
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


# One case per mechanism in the developer's loop, every case with -m "not slow" (CI): each is a process.
BAD_INPUTS = [
    e2e(["sparsity.density=0"], "sparsity.density"),
    (["sparsity.density=1.5"], "sparsity.density"),
    e2e(["train.max_steps=-5"], "train.max_steps"),
    (["train.max_steps=2.5"], "train.max_steps"),
    e2e(["optim.regrow.warmup_steps=-1"], "optim.regrow.warmup_steps"),
    e2e(["method=foo"], "method=foo"),
    (["model=llama_3m"], "model=llama_3m"),
    e2e(["sparsity=banana"], "sparsity=banana"),
    e2e(["train.maxsteps=5"], "train.maxsteps"),
    (["data=text_files"], "data.path"),
    e2e(["data=text_files", "data.path=/nonexistent/*.jsonl"], "data.path"),
    e2e(["data=text_files", "data.path="], "data.path"),
    e2e(["data.tokenizer=hf:t5-base"], "data.tokenizer"),
    (["train.resume_from=/nonexistent/step_5"], "train.resume_from"),
    ([f"train.threads={len(os.sched_getaffinity(0)) + 1}"], "train.threads"),
    # 400 B parameters: more memory than any machine has, refused before anything is built
    (["model=llama_7b", "model.ffn_dim=1000000"], "model='llama_7b' is not allowed: its weights, gradients and Adam state"),
    # checked on the loaded corpus, before the output folder or an MLflow run is made
    (["data.max_tokens=100"], "train.batch_size=16 is not allowed: between 1 and 1 (the number of seq_len+1=65 token windows)"),
    e2e(["model.seq_len=100000000"], "model.seq_len=100000000 is not allowed: between 1 and"),
    e2e(["sparsity.block_size=7"], "sparsity.block_size=7 is not allowed: must divide the size of"),
    # probes of 20 steps after updates every 10: each window would be cut short, no probe jump measured
    e2e(["sparsity.update_every=10"], "train.probe_window=20 is not allowed: at most sparsity.update_every=10"),
    e2e(["sparsity.dense_patterns=['(']"], "sparsity.dense_patterns='(' is not allowed: a regular expression"),
    e2e(["method=dense", "sparsity.density=0.5"], "sparsity.density"),
    e2e(["sparsity.weights=sparse"], "sparsity.weights='sparse' is not allowed: one of dense, compact"),
    e2e(["sparsity.weights=compact", "optim.state=dense_masked"], "sparsity.weights='compact' is not allowed: needs optim.state=compact"),
    # Keys the schema does not know, at any level, with a "did you mean" for near misses.
    (["+notakey=1"], "notakey=1 is not allowed: unknown key"),
    e2e(["+train.notakey=1"], "train.notakey=1 is not allowed: unknown key"),
    (["train.maxsteps=5"], "did you mean train.max_steps?"),
    e2e(["+optim.lr_scalng.rule=none"], "did you mean optim.lr_scaling"),
    e2e(["model=tiyn"], "did you mean tiny?"),
    e2e(["model=null"], "model=null is not allowed: one of "),
    (["sweep=smoke"], "add it with a plus: +sweep=smoke"),
    e2e(["+sweep=mine"], "your own sweep is a file conf/sweep/mine.yaml added with hydra.searchpath=[file://conf]"),
    # Values that no run would read.
    (["data.path=/tmp"], "data.path=/tmp is not allowed: ignored with data=pysource"),
    e2e(["method=static", "sparsity.growth=gradient"], "sparsity.growth=gradient is not allowed: ignored with sparsity.update_every=0"),
    e2e(["optim.lr_scaling.power=0.5"], "read only with optim.lr_scaling.rule=power"),
    e2e(["method=naive_dst", "optim.regrow.warmup_kind=released"], "optim.regrow.warmup_kind=released is not allowed"),
    e2e(["method=dense", "sparsity.weights=compact"], "sparsity.weights=compact is not allowed: ignored with"),
    e2e(["model.vocab_size=1000"], "model.vocab_size=1000 is not allowed: ignored with the tokenizer's vocabulary"),
    e2e(["ray.cpus_per_trial=1"], "ray.* keys are read only by sweeps"),
    e2e(["+sweep=smoke", "ray.autoscaling=true"], "ray.autoscaling=true is not allowed: ignored with ray.address=local"),
    e2e(["tracking=none", "tracking.experiment=x"], "tracking.experiment=x is not allowed: ignored with tracking.enabled=false"),
    e2e(["tracking.tags.owner=alice"], "tracking.tags.owner=alice is not allowed: a new key of tracking.tags takes a plus: "
                                       "+tracking.tags.owner=alice"),
    e2e(["+tracking.tags.run.id=1"], "tracking.tags.run.id=1 is not allowed: tracking.tags.run must be a string, not a dict"),
    # Hydra's own settings that smet_lab does not read (one used to end in a traceback).
    (["-m", "hydra/launcher=joblib", "sparsity.density=0.1,0.25"], "hydra/launcher=joblib is not allowed: smet_lab runs"),
    e2e(["hydra.sweeper.params.x=1"], "hydra.sweeper.params.x=1 is not allowed: smet_lab runs a -m multirun as a Ray"),
    e2e(["+sweep=smoke"], "hydra.run.dir="),  # (the test adds it) a sweep writes into its sweep folder
    # A comma list outside a multirun; a multirun over the sweep's own settings or a group option not there.
    (["sparsity.density=0.1,0.25"], "add -m"),
    (["-m", "ray=local,cluster"], "ray='local,cluster' is not allowed: a multirun sweeps what trials train with"),
    e2e(["-m", "model=tiny,smal"], "sweep.params.model='smal' is not allowed: one of tiny, small, "),
    # A value every trial of the sweep sets itself (a grid axis, the seeds): it would be silently ignored.
    (["+sweep=smoke", "method=smet"], "method=smet is not allowed: every trial of this sweep sets method itself "
                                      "(naive_dst, smet); to run smet instead, give it as sweep.params.method=[smet]"),
    e2e(["+sweep=density", "sparsity.density=0.3"], "give it as sweep.params.sparsity.density=[0.3]"),
    e2e(["+sweep=smoke", "train.seed=3"], "give it as sweep.seeds=[3]"),
    # Two trials of a grid that would train the same run.
    e2e(["-m", "method=dense,smet", "sparsity.density=0.1,0.25"], "give it once, as sweep.extra_trials=[{method:dense}]"),
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


@pytest.mark.e2e  # real processes, ~10-30 s: in CI's set, not in the quick `pytest -q`
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


@pytest.mark.parametrize("signum", [signal.SIGINT, e2e(signal.SIGTERM)])  # SIGTERM: `kill`, a scheduler's stop
def test_ctrl_c_marks_the_run_killed(tmp_path, signum):
    proc = start_cli([*FAST, "train.max_steps=100000", f"hydra.run.dir={tmp_path}/run",
                      f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"], cwd=tmp_path)
    deadline = time.time() + 120
    line = ""
    while time.time() < deadline and "tracking to MLflow run" not in line:  # printed when training starts
        line = proc.stdout.readline()
    assert "tracking to MLflow run" in line
    time.sleep(1)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "resume with train.resume_from=" in err
    runs = mlflow_runs(tmp_path / "mlflow.db")
    assert list(runs["status"]) == ["KILLED"]
    # The run stopped at a step boundary and left a checkpoint there to resume from.
    assert list((tmp_path / "run" / "checkpoints").glob("step_*/state.pt"))


@pytest.mark.e2e  # real processes, ~10-30 s: in CI's set, not in the quick `pytest -q`
def test_sigterm_also_marks_the_run_killed(tmp_path):
    proc = start_cli([*FAST, "train.max_steps=100000", f"hydra.run.dir={tmp_path}/run",
                      f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"], cwd=tmp_path)
    line = ""
    deadline = time.time() + 120
    while time.time() < deadline and "tracking to MLflow run" not in line:
        line = proc.stdout.readline()
    time.sleep(1)
    proc.terminate()
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert list(mlflow_runs(tmp_path / "mlflow.db")["status"]) == ["KILLED"]


def test_help_and_cfg_import_no_heavy_library(tmp_path):
    proc = cli(["--cfg", "job", "method=naive_dst"], cwd=tmp_path)
    assert proc.returncode == 0 and "method: naive_dst" in proc.stdout and "reset_step: false" in proc.stdout
    proc = cli(["--help"], cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("smet_lab: dynamic sparse training")
    assert "python -m smet_lab +sweep=density" in proc.stdout and "python -m smet_lab -m " in proc.stdout
    sweeps = sorted(p.stem for p in (CONF_DIR / "sweep").glob("*.yaml"))
    assert f"+sweep:      {', '.join(sweeps)}" in proc.stdout  # the optional group is listed with its plus
    modules = subprocess.run([sys.executable, "-c", "import smet_lab.cli, sys; print(sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules))"],
                             capture_output=True, text=True, cwd=tmp_path)
    assert modules.stdout.strip() == "[]"


def test_multirun_overrides_become_a_sweep():
    from smet_lab.preflight import multirun_overrides

    assert multirun_overrides(["sparsity.density=0.1,0.25", "method=smet,naive_dst", "train.max_steps=5"]) == [
        "+sweep=grid", "sweep.name=multirun-density-method", "train.max_steps=5",
        "+sweep.params.sparsity.density=[0.1,0.25]", "+sweep.params.method=[smet,naive_dst]"]
    assert multirun_overrides(["+sweep=density", "train.seed=0,1", "sweep.name=mine"]) == [
        "+sweep=density", "sweep.name=mine", "sweep.seeds=[0,1]"]
    assert multirun_overrides(["train.max_steps=5"]) == ["train.max_steps=5"]  # nothing swept: one run
    overrides = multirun_overrides(["sparsity.density=0.1,0.25", "method=smet,naive_dst"])
    from smet_lab.sweep.runner import plan
    from smet_lab.compose import group_composer

    sweep, trials, configs = plan(compose(overrides), group_composer(overrides))
    assert sweep.name == "multirun-density-method"
    cells = sorted((c["method"], c["sparsity"]["density"]) for c in configs.values())
    assert cells == sorted((m, d) for m in ("smet", "naive_dst") for d in (0.1, 0.25))
    # Each trial is its method's preset with the grid value on top, exactly as `+sweep=` builds it.
    assert all(c["optim"]["lr_scaling"]["rule"] == METHODS[c["method"]]["optim.lr_scaling.rule"] for c in configs.values())


def test_a_grid_axis_over_a_config_group_composes_each_option(tmp_path):
    """`-m model=tiny,small` (or +sweep.params.model=[...]): each trial is composed with its option, under the
    sweep file and the command line, and a method typed once holds for every trial of a grid without a method axis."""
    import yaml

    from smet_lab.compose import group_composer
    from smet_lab.preflight import multirun_overrides
    from smet_lab.sweep.runner import plan

    overrides = multirun_overrides(["model=tiny,small", "method=naive_dst", "model.n_layers=3",
                                    f"ray.storage={tmp_path}"])
    assert "+sweep.params.model=[tiny,small]" in overrides
    sweep, trials, configs = plan(compose(overrides), group_composer(overrides))
    assert sweep.name == "multirun-model" and [t.key for t in trials] == ["model=tiny,seed=0", "model=small,seed=0"]
    for option in ("tiny", "small"):
        cfg, shipped = configs[f"model={option},seed=0"], yaml.safe_load((CONF_DIR / "model" / f"{option}.yaml").read_text())
        assert cfg["method"] == "naive_dst"
        assert cfg["optim"]["lr_scaling"]["rule"] == METHODS["naive_dst"]["optim.lr_scaling.rule"]
        assert cfg["model"]["n_layers"] == 3  # the command line over the group's option
        assert {k: cfg["model"][k] for k in ("dim", "ffn_dim", "seq_len")} == {k: shipped[k] for k in ("dim", "ffn_dim", "seq_len")}
    # Both a method axis and a group axis: one composition per combination, the sweep file's keys on top.
    overrides = ["+sweep=smoke", "+sweep.params.model=[tiny,small]", f"ray.storage={tmp_path}"]
    configs = plan(compose(overrides), group_composer(overrides))[2]
    assert {(c["method"], c["model"]["name"], c["train"]["max_steps"]) for c in configs.values()} == {
        (m, o, 60) for m in ("naive_dst", "smet") for o in ("tiny", "small")}
    data_axis = ["+sweep=smoke", "+sweep.params.data=[pysource,synthetic]", f"ray.storage={tmp_path}"]  # over smoke's own
    configs = plan(compose(data_axis), group_composer(data_axis))[2]
    assert {(c["data"]["name"], c["data"]["max_tokens"]) for c in configs.values()} == {("pysource", 60000),
                                                                                       ("synthetic", 60000)}
    for bad, says in ((["+sweep.params.tracking=[mlflow,none]"], "sweep.params.tracking='mlflow' is not allowed: "
                                                                  "a config group trials may differ in"),
                      (["+sweep.params.sparsity=[uniform,erk]", "sparsity.distribution=uniform"],  # what tells them apart
                       "these two would train the same run (a setting in the sweep file or on the command line")):
        with pytest.raises(ConfigError, match=re.escape(says)):
            plan(compose(overrides[:1] + bad + overrides[2:]), group_composer(overrides[:1] + bad + overrides[2:]))


def test_a_value_read_by_some_sweep_trials_is_accepted(tmp_path):
    from smet_lab.cli import BadInput, preflight

    base = ["+sweep=smoke", f"ray.storage={tmp_path}", "tracking=none"]
    cfg = preflight([*base, "optim.regrow.warmup_kind=released"])  # smet reads it, naive_dst does not
    assert cfg.optim.regrow.warmup_kind == "released"
    with pytest.raises(BadInput, match="optim.lr_scaling.power=0.5 is not allowed"):  # no trial reads it
        preflight([*base, "optim.lr_scaling.power=0.5"])


@pytest.mark.e2e  # real processes, ~10-30 s: in CI's set, not in the quick `pytest -q`
def test_a_multirun_without_swept_values_is_one_run(tmp_path):
    proc = cli(["-m", *FAST, "train.max_steps=3", f"hydra.run.dir={tmp_path}/run", "tracking=none"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "step 3/3" in proc.stdout and (tmp_path / "run" / "config.yaml").is_file()
    assert "mean probe jump n/a (no topology update)" in proc.stdout  # no update in 3 steps: no jump to show
    assert not (tmp_path / "run" / "cli.log").exists()  # no empty log file per run


def test_the_recorded_config_is_the_effective_one(tmp_path, hf_tok_dir):
    """With a Hugging Face tokenizer the model's vocabulary is the tokenizer's, in config.yaml and MLflow."""
    import yaml
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(hf_tok_dir / "tokenizer.json")).get_vocab_size()
    assert vocab != 256
    (tmp_path / "corpus.txt").write_text("the cat sat on the mat. a dog ate the bone. " * 400)
    proc = cli([*FAST, "train.max_steps=3", "data=text_files", f"data.path={tmp_path / 'corpus.txt'}",
                f"data.tokenizer=hf:{hf_tok_dir}", f"hydra.run.dir={tmp_path}/run",
                f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]["vocab_size"] == vocab
    assert mlflow_runs(tmp_path / "mlflow.db").iloc[0]["params.model.vocab_size"] == str(vocab)
    from smet_lab.compose import group_composer
    from smet_lab.sweep.runner import plan

    overrides = ["+sweep=smoke", f"data.tokenizer=hf:{hf_tok_dir}", f"ray.storage={tmp_path}"]
    configs = plan(compose(overrides), group_composer(overrides))[2]
    assert {c["model"]["vocab_size"] for c in configs.values()} == {vocab}


def test_a_closed_stdout_stops_the_run_like_ctrl_c(tmp_path):
    """`python -m smet_lab | head -2`: the reader goes away; the run stops at the next step, checkpointed,
    its MLflow run KILLED, instead of dying of BrokenPipeError in a print with the run left RUNNING."""
    proc = start_cli([*FAST, "train.max_steps=400", "train.checkpoint_every=0", f"hydra.run.dir={tmp_path}/run",
                      f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"], cwd=tmp_path)
    line = ""
    while "tracking to MLflow run" not in line:
        line = proc.stdout.readline()
        assert line or proc.poll() is None, proc.stderr.read()
    proc.stdout.close()  # the first progress line (every 5 % of the steps: 20) meets a closed pipe
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, err
    assert "Traceback" not in err and "BrokenPipeError" not in err and "resume with train.resume_from=" in err
    assert list(mlflow_runs(tmp_path / "mlflow.db")["status"]) == ["KILLED"]
    (step,) = [int(p.name.removeprefix("step_")) for p in (tmp_path / "run" / "checkpoints").glob("step_*")]
    assert 20 <= step <= 21, step  # it stopped at the step boundary after that line, not at the end (400)


def test_ctrl_c_while_the_config_is_checked_starts_nothing(tmp_path):
    """Ctrl-C before training starts (here: while an extension is imported, before the preflight) is a
    request like any other, never an exception in the middle of an import; nothing is then started."""
    (tmp_path / "impatient.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGINT)\n")
    proc = cli([*FAST, "extensions=[impatient.py]", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"], cwd=tmp_path)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.endswith("smet_lab: interrupted before anything started\n") and "Traceback" not in proc.stderr
    assert {p.name for p in tmp_path.iterdir()} - {"__pycache__"} == {"impatient.py"}  # no output folder, no database


def test_help_or_plan_to_a_reader_that_has_gone_ends_quietly(tmp_path):
    """`python -m smet_lab --help | head -1` where head has already left: exit 141 as `yes | head` does, and
    no BrokenPipeError traceback (Python prints one for the failed print or for the flush at exit)."""
    from helpers import run_to_a_gone_reader

    for args in (["--help"], ["--plan", "+sweep=density"]):  # a plan is not a job: no "stopping after this step"
        proc = run_to_a_gone_reader([sys.executable, "-m", "smet_lab", *args], cwd=tmp_path)
        assert proc.returncode == 141 and proc.stderr == "", (args, proc.stderr)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_resume_starts_from_the_overrides_of_the_run_it_continues(tmp_path):
    """Hydra records a run's overrides in its folder (.hydra/); a resume composes them first, and each
    key typed now replaces the recorded ones of that key and below it."""
    hydra_dir = tmp_path / "run" / ".hydra"
    hydra_dir.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(["method=naive_dst", "model.n_layers=3", "+tracking.tags.owner=alice",
                                     "tracking.uri=sqlite:///x.db", "train.max_steps=20"]), hydra_dir / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": {"overrides": {"hydra": ["hydra.run.dir=run", "hydra.searchpath=[file://conf]"]}}}),
                   hydra_dir / "hydra.yaml")
    ckpt = tmp_path / "run" / "checkpoints" / "step_20"
    ckpt.mkdir(parents=True)
    for given in (tmp_path / "run", ckpt, ckpt / "state.pt"):
        typed = [f"train.resume_from={given}", "train.max_steps=40", "model=small", "tracking=none"]
        overrides, kept = resume_overrides(typed)
        assert kept == ["method=naive_dst", "hydra.searchpath=[file://conf]"]  # model.*, tracking.*, max_steps replaced
        assert overrides == kept + typed
    assert resume_overrides(["train.max_steps=40"]) == (["train.max_steps=40"], [])  # no resume
    elsewhere = [f"train.resume_from={tmp_path}"]  # a checkpoint outside a run folder: nothing recorded
    assert resume_overrides(elsewhere) == (elsewhere, [])


def test_a_resume_from_another_folder_reads_the_runs_relative_paths_from_where_it_started(tmp_path, monkeypatch):
    """The recorded relative paths (and the default MLflow database, which a run names relative to its
    folder) are anchored at the folder the run started in, which Hydra records (runtime.cwd)."""
    started, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    hydra_dir = started / "run" / ".hydra"
    hydra_dir.mkdir(parents=True)
    elsewhere.mkdir()
    for folder in ("my data", "conf", "shared"):
        (started / folder).mkdir()
    OmegaConf.save(OmegaConf.create(["data=text_files", "data.path='my data/*.txt'", "data.tokenizer=hf:t5-base",
                                     "data.cache_dir=auto"]), hydra_dir / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": {"runtime": {"cwd": str(started)}, "overrides": {
        "hydra": [f"hydra.searchpath=[file://conf,file://{started}/shared]"]}}}), hydra_dir / "hydra.yaml")
    monkeypatch.chdir(elsewhere)
    _, kept = resume_overrides([f"train.resume_from={started / 'run'}"])
    assert kept == ["data=text_files", f"data.path='{started}/my data/*.txt'", "data.tokenizer=hf:t5-base",
                    "data.cache_dir=auto", f"hydra.searchpath=[file://{started}/conf,file://{started}/shared]",
                    f"tracking.uri='sqlite:///{started}/mlflow.db'"]
    _, kept = resume_overrides([f"train.resume_from={started / 'run'}", "tracking=none"])
    assert not any(k.startswith("tracking") for k in kept)  # a store typed now wins
    monkeypatch.chdir(started)  # from where it started: the overrides as recorded
    _, kept = resume_overrides([f"train.resume_from={started / 'run'}"])
    assert kept == ["data=text_files", "data.path='my data/*.txt'", "data.tokenizer=hf:t5-base", "data.cache_dir=auto",
                    f"hydra.searchpath=[file://conf,file://{started}/shared]"]


@pytest.mark.e2e  # real processes, ~10-30 s: in CI's set, not in the quick `pytest -q`
def test_a_resumed_run_continues_its_mlflow_run(tmp_path):
    from mlflow.tracking import MlflowClient

    db = f"sqlite:///{tmp_path}/mlflow.db"
    first = cli([*FAST, "train.max_steps=20", "method=naive_dst", "sparsity.density=0.5", f"hydra.run.dir={tmp_path}/a",
                 f"tracking.uri={db}"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "INFO" not in first.stdout + first.stderr  # a fresh database: no MLflow/alembic chatter
    client = MlflowClient(db)
    (run,) = client.search_runs([client.get_experiment_by_name("smet_lab").experiment_id])
    assert "smet_lab" in client.get_experiment_by_name("smet_lab").tags["mlflow.note.content"]
    again = cli([*FAST, "train.max_steps=40", f"train.resume_from={tmp_path}/a",  # the run's folder: its newest
                 f"hydra.run.dir={tmp_path}/b", f"tracking.uri={db}"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming from {tmp_path}/a/checkpoints/step_20" in again.stdout
    assert f"tracking to MLflow run {run.info.run_id} (continued)" in again.stdout
    recorded = OmegaConf.load(tmp_path / "b" / "config.yaml")
    assert recorded.train.resume_from == f"{tmp_path}/a/checkpoints/step_20"
    # Resumed as its command set it up (method, density and store not typed again), only max_steps changed.
    expected = compose([*FAST, "method=naive_dst", "sparsity.density=0.5", "train.max_steps=40", f"tracking.uri={db}"])
    assert {k: recorded[k] for k in ("method", "sparsity", "optim")} == {k: expected[k] for k in ("method", "sparsity", "optim")}
    assert "resuming with the settings of the run's command: " in again.stderr and "method=naive_dst" in again.stderr
    assert "resuming with settings other than the checkpoint's: train.max_steps: 20 -> 40" in again.stderr
    runs = client.search_runs([run.info.experiment_id])
    assert [r.info.run_id for r in runs] == [run.info.run_id] and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["smet.resumed"] == "true"
    assert runs[0].data.tags["smet.resume_changes"] == "train.max_steps: 20 -> 40"  # params keep the first start's
    # One contiguous history: every 5th step once, 5..20 from the first process, 25..40 from the second.
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(5, 41, 5))
    # Another store does not have that run: a new run that names the one it resumed.
    other = f"sqlite:///{tmp_path}/other.db"
    moved = cli([*FAST, "train.max_steps=40", f"train.resume_from={tmp_path}/a/checkpoints/step_20",
                 f"hydra.run.dir={tmp_path}/c", f"tracking.uri={other}"], cwd=tmp_path)
    assert moved.returncode == 0, moved.stderr[-2000:]
    other_client = MlflowClient(other)
    (new,) = other_client.search_runs([other_client.get_experiment_by_name("smet_lab").experiment_id])
    assert new.info.run_id != run.info.run_id and new.data.tags["smet.resumed_from_run"] == run.info.run_id


@pytest.mark.e2e
def test_relative_paths_reach_sweep_trials_and_a_resume_from_another_folder(tmp_path):
    """`data.path=corpus.txt` in a sweep: Ray runs each trial in a folder of its own, where the file is not
    (both trials FAILED with a TypeError, the ConfigError unpicklable). A run started in one folder and
    resumed from another reads the same corpus and continues its MLflow run in the first folder's database."""
    import json

    from mlflow.tracking import MlflowClient

    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    (project / "corpus.txt").write_text("def f(x):\n    return x + 1\n" * 300)
    data = ["data=text_files", "data.path=corpus.txt"]
    sweep = cli(["+sweep=smoke", *data, "train.max_steps=10", "tracking=none"], cwd=project)
    assert sweep.returncode == 0, sweep.stdout[-2000:] + sweep.stderr[-2000:]
    assert "2/2 trials ended (2 finished, 0 diverged, 0 failed)" in sweep.stdout
    grid = json.loads((project / "sweeps" / "smoke" / "grid.json").read_text())
    assert {c["data"]["path"] for c in grid.values()} == {str(project / "corpus.txt")}
    first = cli([*data, "train.max_steps=20", "train.eval_every=10", "hydra.run.dir=run"], cwd=project)
    assert first.returncode == 0, first.stderr[-2000:]
    again = cli([f"train.resume_from={project}/run", "train.max_steps=30", "train.eval_every=10"], cwd=elsewhere)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"data.path={project}/corpus.txt tracking.uri='sqlite:///{project}/mlflow.db'" in again.stderr
    assert "settings other than the checkpoint's: train.max_steps: 20 -> 30\n" in again.stderr  # the same corpus
    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("smet_lab").experiment_id])
    assert f"tracking to MLflow run {run.info.run_id} (continued)" in again.stdout
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [10, 20, 30]
    assert not (elsewhere / "mlflow.db").exists()


def test_a_cluster_sweep_is_not_held_to_the_drivers_memory(tmp_path):
    """A trial too large for this machine is refused by a local sweep, and planned by a sweep on a Ray
    cluster (its trials train on the cluster's nodes, whose memory the driver cannot see)."""
    from smet_lab.compose import group_composer
    from smet_lab.sweep.runner import plan

    huge = ["+sweep=smoke", "model=llama_7b", "model.ffn_dim=1000000", f"ray.storage={tmp_path}"]
    with pytest.raises(ConfigError, match="its weights, gradients and Adam state need"):
        plan(compose(huge), group_composer(huge))
    on_cluster = [*huge, "ray=cluster"]
    configs = plan(compose(on_cluster), group_composer(on_cluster))[2]
    assert {c["model"]["ffn_dim"] for c in configs.values()} == {1000000}


@pytest.mark.e2e  # three short runs and a report: ~30 s
def test_the_report_of_an_experiments_single_runs_counts_a_rerun_once(tmp_path):
    """`python -m smet_lab.report smet_lab` over single runs: a setting and seed run twice is one row (the
    newest), named as left out, so the report never calls a re-run a second seed."""
    db = f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"
    for i, method in enumerate(("smet", "smet", "naive_dst")):
        assert cli([*FAST, f"method={method}", db, f"hydra.run.dir={tmp_path}/run{i}"], cwd=tmp_path).returncode == 0
    runs = mlflow_runs(tmp_path / "mlflow.db").sort_values("start_time")
    newest_smet = runs[runs["tags.smet.method"] == "smet"].iloc[-1]["run_id"]
    proc = subprocess.run([sys.executable, "-m", "smet_lab.report", "smet_lab", "--tracking-uri",
                           f"sqlite:///{tmp_path}/mlflow.db", "--out", str(tmp_path / "rep")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import csv

    rows = list(csv.DictReader(open(tmp_path / "rep" / "trials.csv")))
    assert sorted(r["method"] for r in rows) == ["naive_dst", "smet"]
    assert next(r["run_id"] for r in rows if r["method"] == "smet") == newest_smet
    assert "- runs left out: 1 older run(s) of a setting and seed" in (tmp_path / "rep" / "report.md").read_text()
