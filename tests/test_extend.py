"""The extension API: a user's rule in one small file, outside the repository, used everywhere."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

from helpers import run_cli as cli
from smet_lab import extend
from smet_lab.config import ConfigError, RuleError, RunConfig
from smet_lab.methods import METHODS, apply_method
from smet_lab.optim.options import LR_SCALING
from smet_lab.sparse import DISTRIBUTIONS, GROWTH, PRUNE, SCHEDULES, DynamicSparsity, SparseTopology

REGISTRIES = (GROWTH, PRUNE, SCHEDULES, LR_SCALING, DISTRIBUTIONS, METHODS)


@pytest.fixture(autouse=True)
def clean_registries():
    """Every test leaves the registries as it found them."""
    saved = [dict(r) for r in REGISTRIES]
    yield
    for registry, before in zip(REGISTRIES, saved):
        registry.clear()
        registry.update(before)


class Linear(nn.Module):
    """loss = sum(W * G): the gradient of W is the fixed G."""

    def __init__(self, rows=16, cols=16, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(rows, cols, generator=gen))
        self.register_buffer("g", torch.randn(rows, cols, generator=gen))

    def forward(self):
        return (self.w * self.g).sum()


def lowest_free(ctx):
    free = torch.ones(ctx.n_blocks, dtype=torch.bool)
    free[torch.cat([ctx.active, ctx.excluded])] = False
    return free.nonzero().flatten()[:ctx.n]


def test_a_registered_growth_rule_drives_the_update():
    extend.register_growth("lowest_free")(lowest_free)
    topo = SparseTopology.build(Linear(), 0.25, dense_patterns=[])
    layer = topo.layers[0]
    before = set(layer.block_ids().tolist())
    upd = DynamicSparsity(topo, total_steps=1000, update_every=100, prune_rate=0.5, prune_schedule="constant",
                          growth="lowest_free")
    (event,) = upd.update(100)
    pruned = set(event.old_blocks.tolist())
    # By hand: the 32 lowest ids among the blocks that were neither active nor just pruned.
    expected = [i for i in range(256) if i not in before and i not in pruned][:32]
    assert sorted(event.new_blocks.tolist()) == expected
    assert set(layer.block_ids().tolist()) == (before - pruned) | set(expected)


def test_a_rule_that_needs_the_dense_gradient_gets_it_only_at_update_steps():
    seen = []

    @extend.register_growth("spy", needs_dense_grad=True)
    def spy(ctx):
        seen.append(None if ctx.dense_grad is None else ctx.dense_grad.clone())
        return lowest_free(ctx)

    model = Linear()
    topo = SparseTopology.build(model, 0.25, dense_patterns=[])
    upd = DynamicSparsity(topo, total_steps=1000, update_every=2, prune_rate=0.25, prune_schedule="constant",
                          growth="spy")
    assert upd.needs_dense_grad
    for step in (1, 2):
        upd.begin_step(step)
        for _ in range(3):  # three micro-batches: the captured gradient is their sum
            model().backward()
        model.w.grad = None
    upd.update(2)
    # The dense gradient of sum(W * G) is G; three backward passes give 3 G (as [n_blocks, B]).
    assert len(seen) == 1 and torch.equal(seen[0], (3 * model.g).view(-1, 1))
    with pytest.raises(RuntimeError, match="call begin_step"):
        upd.update(4)  # nothing was captured for step 4


@pytest.mark.parametrize("bad,message", [
    (lambda ctx: lowest_free(ctx)[:-1], r"returned \d+ block ids for \d+ requested"),
    (lambda ctx: lowest_free(ctx)[:1].repeat(ctx.n), "returned duplicate block ids"),
    (lambda ctx: ctx.active[:ctx.n], "returned block ids that are already active"),
    (lambda ctx: ctx.excluded[:ctx.n], r"returned block ids that this update pruned \(ctx.excluded\)"),
    (lambda ctx: lowest_free(ctx) + ctx.n_blocks, r"returned block ids outside \[0, 256\)"),
    (lambda ctx: lowest_free(ctx).float(), "must return a 1-D integer tensor"),
    (lambda ctx: lowest_free(ctx).tolist(), "must return a 1-D integer tensor of block ids, got list"),
])
def test_a_rule_that_breaks_the_contract_stops_with_one_line(bad, message):
    extend.register_growth("bad")(bad)
    topo = SparseTopology.build(Linear(), 0.25, dense_patterns=[])
    upd = DynamicSparsity(topo, total_steps=1000, update_every=100, prune_rate=0.5, growth="bad")
    with pytest.raises(RuleError, match=rf"^sparsity.growth=bad \(layer w\) {message}"):
        upd.update(100)


def test_prune_rules_and_schedules_register_too():
    @extend.register_prune("largest")
    def largest(ctx):
        return torch.topk(ctx.weights.abs().sum(1), ctx.n).indices

    extend.register_prune_schedule("half")(lambda p: 0.5)
    topo = SparseTopology.build(Linear(), 0.5, dense_patterns=[])
    layer = topo.layers[0]
    values = dict(zip(layer.block_ids().tolist(), layer.gather().abs().flatten().tolist()))
    upd = DynamicSparsity(topo, total_steps=1000, update_every=100, prune_rate=0.5, prune_schedule="half",
                          prune="largest")
    (event,) = upd.update(100)
    assert event.old_blocks.numel() == int(0.25 * 128)  # rate 0.5 x schedule 0.5 of the 128 active blocks
    assert sorted(event.old_blocks.tolist()) == sorted(sorted(values, key=values.get)[-32:])


def test_lr_scaling_distribution_and_method_presets():
    from smet_lab.optim import SMETAdam

    extend.register_lr_scaling("double")(lambda d, p: 2.0)
    extend.register_distribution("first_full")(lambda shapes, d: [1.0] + [d] * (len(shapes) - 1))
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False))
    topo = SparseTopology.build(model, 0.25, distribution="first_full", dense_patterns=[])
    assert [layer.n_active for layer in topo.layers] == [64, 16]
    opt = SMETAdam(model, topo, lr=1e-3, lr_scaling="double")
    assert [g["lr"] for g in opt.param_groups if g["kind"] == "sparse"] == [2e-3]

    preset = extend.register_method("smet_w7", optim={"regrow": {"warmup_steps": 7}, "lr_scaling": {"rule": "inverse"}})
    assert preset == {"optim.regrow.warmup_steps": 7, "optim.lr_scaling.rule": "inverse"}
    cfg = apply_method(RunConfig(), "smet_w7")
    assert cfg.method == "smet_w7" and cfg.optim.regrow.warmup_steps == 7
    with pytest.raises(ValueError, match="optim.regrow.warmup_stepz is not a config key"):
        extend.register_method("typo", optim={"regrow": {"warmup_stepz": 7}})


def test_registering_an_existing_name_needs_replace():
    with pytest.raises(ValueError, match="growth rule 'random' is already registered; pass replace=True"):
        extend.register_growth("random")(lowest_free)
    extend.register_growth("random", replace=True)(lowest_free)
    assert GROWTH["random"].fn is lowest_free


def test_load_extensions_from_a_file_and_refuse_a_broken_one(tmp_path):
    (tmp_path / "rules_ok.py").write_text(textwrap.dedent("""
        from smet_lab.extend import register_prune_schedule
        register_prune_schedule("from_file")(lambda p: 1.0 - p)
    """))
    (tmp_path / "rules_bad.py").write_text("raise RuntimeError('boom')\n")
    assert extend.load_extensions([str(tmp_path / "rules_ok.py")]) == [str(tmp_path / "rules_ok.py")]
    assert SCHEDULES["from_file"](0.25) == 0.75
    with pytest.raises(ConfigError, match=r"^extensions='.*rules_bad.py' is not allowed: it failed to import \(RuntimeError: boom\)"):
        extend.load_extensions([str(tmp_path / "rules_bad.py")])
    with pytest.raises(ConfigError, match=f"FileNotFoundError: no file {tmp_path}/rule_ok.py; did you mean "
                                          f"{tmp_path}/rules_ok.py\\?"):
        extend.load_extensions([str(tmp_path / "rule_ok.py")])


@pytest.mark.parametrize("register, fn, takes", [
    (lambda: extend.register_growth("g"), lambda ctx, n: None, "(ctx)"),
    (lambda: extend.register_prune("p"), lambda: None, "(ctx)"),
    (lambda: extend.register_prune_schedule("s"), lambda progress, total: 1.0, "(progress)"),
    (lambda: extend.register_lr_scaling("l"), lambda density: 1.0, "(density, power)"),
    (lambda: extend.register_distribution("d"), lambda shapes, density, seed: [density], "(shapes, density)"),
    (lambda: (lambda fn: extend.register_metric("summary/m", "m", definition="M.", compute=fn)), lambda: 0.0,
     "(history_rows)"),
])
def test_a_rule_that_cannot_take_its_arguments_is_refused_when_it_registers(register, fn, takes):
    from smet_lab.metrics import METRICS

    with pytest.raises(ValueError, match=rf"must take \({takes[1:-1]}\)$"):
        register()(fn)
    assert not {"g", "p", "s", "l", "d"} & (set(GROWTH) | set(PRUNE) | set(SCHEDULES) | set(LR_SCALING)
                                           | set(DISTRIBUTIONS)) and "summary/m" not in METRICS


def test_a_file_with_such_a_rule_is_one_line_at_load(tmp_path):
    (tmp_path / "rules_sig.py").write_text("from smet_lab.extend import register_growth\n"
                                           "register_growth('two_args')(lambda ctx, n: None)\n")
    with pytest.raises(ConfigError, match=r"^extensions='.*rules_sig.py' is not allowed: it registers what cannot work: "
                                          r"growth rule 'two_args': <lambda>\(ctx, n\) must take \(ctx\)$"):
        extend.load_extensions([str(tmp_path / "rules_sig.py")])


@pytest.mark.parametrize("out, says", [
    ("oops", "returned 'oops'; it must return a finite number > 0 (the sparse layers' lr multiplier)"),
    (0.0, "returned 0.0; it must return a finite number > 0"),
    (float("nan"), "returned nan; it must return a finite number > 0"),
    (True, "returned True; it must return a finite number > 0"),
    (torch.tensor([1.0, 2.0]), "returned tensor([1., 2.]); it must return a finite number > 0"),
])
def test_an_lr_scaling_rule_must_return_a_positive_number(out, says):
    from smet_lab.optim import SMETAdam

    extend.register_lr_scaling("bad")(lambda density, power: out)
    model = nn.Sequential(nn.Linear(8, 8, bias=False))
    with pytest.raises(RuleError, match="^" + re.escape(f"optim.lr_scaling.rule=bad {says}")):
        SMETAdam(model, SparseTopology.build(model, 0.25, dense_patterns=[]), lr=1e-3, lr_scaling="bad")
    extend.register_lr_scaling("half", replace=True)(lambda density, power: torch.tensor(0.5))  # a 0-d tensor is a number
    assert [g["lr"] for g in SMETAdam(model, SparseTopology.build(model, 0.25, dense_patterns=[]), lr=1e-3,
                                      lr_scaling="half").param_groups] == [5e-4]


def test_a_schedule_or_distribution_outside_its_contract_or_raising_is_one_line():
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False))
    extend.register_distribution("short")(lambda shapes, density: [density])
    with pytest.raises(RuleError, match=r"^sparsity.distribution=short returned \[0.25\]; it must return one "
                                        r"density per sparse layer \(2\)$"):
        SparseTopology.build(model, 0.25, distribution="short", dense_patterns=[])
    extend.register_distribution("over")(lambda shapes, density: [1.5, density])
    with pytest.raises(RuleError, match=r"^sparsity.distribution=over returned 1.5; it must return densities in \(0, 1\]$"):
        SparseTopology.build(model, 0.25, distribution="over", dense_patterns=[])

    def crashing(progress):
        return 1.0 / (progress - progress)

    extend.register_prune_schedule("crash")(crashing)
    line = crashing.__code__.co_firstlineno + 1
    topo = SparseTopology.build(Linear(), 0.25, dense_patterns=[])
    upd = DynamicSparsity(topo, total_steps=1000, update_every=100, prune_rate=0.5, prune_schedule="crash")
    with pytest.raises(RuleError, match=rf"^sparsity.prune_schedule=crash raised ZeroDivisionError: float division "
                                        rf"by zero at {re.escape(__file__)}:{line}$"):
        upd.update(100)
    extend.register_prune_schedule("negative")(lambda progress: -0.5)
    upd = DynamicSparsity(topo, total_steps=1000, update_every=100, prune_rate=0.5, prune_schedule="negative")
    with pytest.raises(RuleError, match=r"^sparsity.prune_schedule=negative returned -0.5; it must return a finite "
                                        r"number >= 0"):
        upd.update(100)


def test_rules_that_need_no_topology_are_checked_before_a_run_starts():
    """Pre-flight (what the command line runs before it creates an output folder or an MLflow run)."""
    from smet_lab.train import check_config

    extend.register_lr_scaling("negative")(lambda density, power: -1.0)
    extend.register_distribution("short")(lambda shapes, density: [density])
    extend.register_prune_schedule("ends_badly")(lambda progress: 1.0 if progress < 1 else float("inf"))
    for key, value, says in (
            ("optim.lr_scaling.rule", "negative", "returned -1.0; it must return a finite number > 0"),
            ("sparsity.distribution", "short", "returned [0.25]; it must return one density per sparse layer (14)"),
            ("sparsity.prune_schedule", "ends_badly", "returned inf; it must return a finite number >= 0")):
        cfg = RunConfig()
        section, _, name = key.rpartition(".")
        node = cfg
        for part in section.split("."):
            node = getattr(node, part)
        setattr(node, name, value)
        with pytest.raises(ConfigError, match="^" + re.escape(f"{key}={value!r} is not allowed: its rule {says}")):
            check_config(cfg)
    cfg = RunConfig()
    cfg.sparsity.update_every, cfg.sparsity.prune_schedule = 0, "ends_badly"  # a static topology never calls it
    check_config(cfg)


def test_a_prune_rule_that_raises_names_its_line():
    def broken(ctx):
        return ctx.weights.topk(ctx.n + 10**9)

    extend.register_prune("broken")(broken)
    line = broken.__code__.co_firstlineno + 1
    upd = DynamicSparsity(SparseTopology.build(Linear(), 0.25, dense_patterns=[]), total_steps=1000,
                          update_every=100, prune_rate=0.5, prune="broken")
    with pytest.raises(RuleError, match=rf"^sparsity.prune=broken \(layer w\) raised RuntimeError: .* at "
                                        rf"{re.escape(__file__)}:{line}$"):
        upd.update(100)


# ----------------------------------------------------------------------- from outside the repo
RULES = '''
import torch
from smet_lab.extend import register_growth, register_metric

register_metric("summary/last_train_loss", "last train loss", "{:.3f}", "lower", "The train loss of the run's last step.",
                compute=lambda rows: rows[-1]["train/loss"])


@register_growth("lowest_free")
def lowest_free(ctx):
    """Grow the ctx.n lowest-numbered blocks that are neither active nor just pruned."""
    free = torch.ones(ctx.n_blocks, dtype=torch.bool)
    free[torch.cat([ctx.active, ctx.excluded]).cpu()] = False
    return free.nonzero().flatten()[:ctx.n]


@register_growth("twice_the_first")
def twice_the_first(ctx):  # a broken rule: one id, ctx.n times
    return lowest_free(ctx)[:1].repeat(ctx.n)


@register_growth("typo")
def typo(ctx):  # a rule with a bug: it raises
    return lowest_fre(ctx)
'''
FAST = ["data=synthetic", "train.max_steps=20", "train.eval_every=10", "sparsity.update_every=10",
        "train.probe_window=5", "train.batch_size=4", "train.eval_batches=2", "train.probe_batch_size=8"]


@pytest.mark.e2e
def test_the_worked_example_runs_from_outside_the_repository(tmp_path):
    """README "How to extend": a growth rule in the user's own file, one run and a smoke sweep."""
    from mlflow.tracking import MlflowClient

    (tmp_path / "my_rules.py").write_text(RULES)
    db = f"sqlite:///{tmp_path}/mlflow.db"
    one = cli(["extensions=[my_rules]", "sparsity.growth=lowest_free", *FAST, f"tracking.uri={db}",
               f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    sweep = cli(["+sweep=smoke", "extensions=[my_rules]", "sparsity.growth=lowest_free", "train.max_steps=20",
                 f"tracking.uri={db}", f"ray.storage={tmp_path}/sw"], cwd=tmp_path)
    assert sweep.returncode == 0, sweep.stdout[-2000:] + sweep.stderr[-2000:]
    client = MlflowClient(db)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    trials = [r for r in runs if r.data.tags.get("smet.kind") in ("run", "trial")]
    assert len(trials) == 3 and {r.data.params["sparsity.growth"] for r in trials} == {"lowest_free"}
    assert {r.info.status for r in runs} == {"FINISHED"}
    # The trials (Ray workers, in other working directories) imported the same file, by absolute path.
    assert {r.data.params["extensions"] for r in trials if r.data.tags["smet.kind"] == "trial"} == \
        {f"[{tmp_path / 'my_rules.py'}]"}
    assert "lowest_free" in (tmp_path / "sw" / "smoke" / "report" / "report.md").read_text()
    # The user's metric: logged by every trial, and a report rebuilt in a fresh process (which imports the
    # sweep's extensions from its runs' params) shows it with its label and definition.
    assert all(r.data.metrics["summary/last_train_loss"] == client.get_metric_history(r.info.run_id, "train/loss")[-1].value
               for r in trials)
    rebuilt = subprocess.run([sys.executable, "-m", "smet_lab.report", "smoke", "--tracking-uri", db, "--out",
                              str(tmp_path / "rebuilt")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert rebuilt.returncode == 0 and rebuilt.stderr == "", rebuilt.stderr
    report = (tmp_path / "rebuilt" / "report.md").read_text()
    assert "last train loss" in report and "The train loss of the run's last step." in report

    bad = cli(["extensions=[my_rules]", "sparsity.growth=twice_the_first", *FAST, f"tracking.uri={db}",
               f"hydra.run.dir={tmp_path}/bad"], cwd=tmp_path)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        "smet_lab: error: sparsity.growth=twice_the_first (layer layers.0.attention.wq.weight) returned duplicate block ids"]
    line = RULES.splitlines().index("    return lowest_fre(ctx)") + 1
    raised = cli(["extensions=[my_rules]", "sparsity.growth=typo", *FAST, f"tracking.uri={db}",
                  f"hydra.run.dir={tmp_path}/raised"], cwd=tmp_path)
    assert raised.returncode == 1 and raised.stderr.strip().splitlines() == [
        "smet_lab: error: sparsity.growth=typo (layer layers.0.attention.wq.weight) raised NameError: name "
        f"'lowest_fre' is not defined at {tmp_path / 'my_rules.py'}:{line}"]
    failed = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
              if r.data.params.get("sparsity.growth") == "typo"]
    assert [r.info.status for r in failed] == ["FAILED"]
    missing = cli(["extensions=[not_a_module]", *FAST, f"hydra.run.dir={tmp_path}/x"], cwd=tmp_path)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert "extensions='not_a_module' is not allowed: it failed to import" in missing.stderr


def test_an_installed_package_registers_through_its_entry_point(tmp_path):
    """A distribution on the path whose entry point in group smet_lab.extensions names its module."""
    (tmp_path / "plug_rules.py").write_text(RULES.replace("lowest_free", "plugged").replace("twice_the_first", "plugged2"))
    info = tmp_path / "plug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: plug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[smet_lab.extensions]\nplug = plug_rules\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    proc = cli(["sparsity.growth=plugged", *FAST, "train.max_steps=11", "tracking=none",
                f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path, env_extra=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "growth: plugged" in (tmp_path / "run" / "config.yaml").read_text()
