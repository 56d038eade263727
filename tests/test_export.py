"""python -m smet_lab.export: sparse checkpoints out as safetensors, dense or compact, and back."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_to_a_gone_reader

from smet_lab.config import DataConfig, ModelConfig, RunConfig
from smet_lab.export import evaluate_export, export, load_export
from smet_lab.methods import apply_method
from smet_lab.train import QUIET, train


@pytest.fixture(scope="module", params=["dense", "compact"])
def finished(request, tmp_path_factory):
    """A finished 30-step smet run (an update every 10 steps) with its final checkpoint."""
    cfg = apply_method(RunConfig(), "smet")
    cfg.model = ModelConfig(name="test", dim=32, n_layers=2, n_heads=2, ffn_dim=64, seq_len=16)
    cfg.data = DataConfig(name="synthetic", max_tokens=40_000)
    cfg.train.max_steps, cfg.train.batch_size, cfg.train.eval_every, cfg.train.eval_batches = 30, 4, 10, 3
    cfg.train.probe_batch_size = 4
    cfg.sparsity.update_every, cfg.sparsity.block_size, cfg.sparsity.weights = 10, 4, request.param
    out = tmp_path_factory.mktemp(f"run_{request.param}")
    result = train(cfg, output_dir=out, callbacks=QUIET)
    assert result.status == "FINISHED"
    return cfg, result, out / "checkpoints" / "step_30"


@pytest.mark.parametrize("fmt", ["dense", "compact"])
def test_export_round_trip_gives_the_runs_val_loss(finished, fmt, tmp_path):
    cfg, result, ckpt = finished
    out = export(ckpt, tmp_path / "export", fmt)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == fmt and manifest["block_size"] == 4 and manifest["vocab_size"] == cfg.model.vocab_size
    assert manifest["step"] == 30 and manifest["tokenizer"] == "byte"
    tensors = load_file(str(out / "model.safetensors"))
    name = "layers.0.attention.wq.weight"
    assert manifest["layers"][name]["density"] == pytest.approx(0.25)
    if fmt == "dense":
        w = tensors[name]
        assert w.shape == (32, 32)
        assert (w.view(-1, 4).abs().sum(1) > 0).sum() <= 64  # at most the 64 active blocks of 4 are nonzero
    else:
        assert tensors["layers.0.attention.wq.values"].shape == (64, 4)
        assert tensors["layers.0.attention.wq.block_ids"].dtype == torch.int32
        assert name not in tensors
    model, _ = load_export(out)
    assert evaluate_export(out) == pytest.approx(result.summary["summary/final_val_loss"], abs=1e-6)


def test_export_cli_and_bad_input(finished, tmp_path):
    cfg, result, ckpt = finished
    run = lambda *args: subprocess.run([sys.executable, "-m", "smet_lab.export", *map(str, args)],
                                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    ok = run(ckpt, "--out", tmp_path / "e", "--eval")
    assert ok.returncode == 0, ok.stderr
    printed = float(ok.stdout.split("val loss of the export: ")[1].split()[0])
    assert printed == pytest.approx(result.summary["summary/final_val_loss"], abs=1e-6)
    gone = run_to_a_gone_reader([sys.executable, "-m", "smet_lab.export", str(ckpt), "--out", str(tmp_path / "g")],
                                cwd=tmp_path)  # `| head -0`: the export is written, no BrokenPipeError traceback
    assert gone.returncode == 141 and gone.stderr == "", gone.stderr
    assert (tmp_path / "g" / "model.safetensors").read_bytes() == (tmp_path / "e" / "model.safetensors").read_bytes()
    if cfg.sparsity.weights == "dense":
        return  # bad input is the same for both layouts: checked once, with the compact run's checkpoint
    (tmp_path / "a_file").write_text("x")
    cut = tmp_path / "cut" / "step_1"  # a checkpoint truncated (a full disk, a copy that broke off)
    cut.mkdir(parents=True)
    (cut / "config.json").write_bytes((Path(ckpt) / "config.json").read_bytes())
    for n in (1000, 7):  # a broken zip archive; too short to be one (torch then tries the pickle format)
        (cut / "state.pt").write_bytes((Path(ckpt) / "state.pt").read_bytes()[:n])
        bad = run(cut, "--out", tmp_path / "x")
        assert bad.returncode == 2 and bad.stderr.startswith(f"smet_lab: error: checkpoint='{cut}' is not allowed: "
                                                             "unreadable (") and "Traceback" not in bad.stderr
    for args, says in (([tmp_path / "nowhere", "--out", tmp_path / "x"], f"'{tmp_path / 'nowhere'}' is not allowed: no such file"),
                       ([ckpt, "--out", tmp_path / "a_file" / "x"], f"a folder that can be written ({tmp_path / 'a_file'} is a file)"),
                       ([ckpt, "--out", tmp_path / "x", "--format", "sparse"], "invalid choice: 'sparse'")):
        bad = run(*args)
        assert bad.returncode == 2
        assert bad.stderr.strip().count("\n") == 0 and bad.stderr.startswith("smet_lab: error: ") and says in bad.stderr
        assert not (tmp_path / "x").exists()


def test_an_interrupted_export_leaves_no_mismatched_pair(finished, tmp_path, monkeypatch):
    """Ctrl-C while the weights are written over an earlier export: the folder then holds no manifest
    (load_export says so in one line) rather than new weights beside the old export's manifest."""
    import safetensors.torch

    from smet_lab.export import ExportError

    _, _, ckpt = finished
    export(ckpt, tmp_path / "e", "compact")

    def interrupted(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export(ckpt, tmp_path / "e", "dense")
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["model.safetensors"]  # the old weights, no .tmp
    with pytest.raises(ExportError, match="holds no export .no manifest.json: never exported there, or the export"):
        load_export(tmp_path / "e")
    monkeypatch.undo()
    export(ckpt, tmp_path / "e", "dense")  # done again, whole
    assert json.loads((tmp_path / "e" / "manifest.json").read_text())["format"] == "dense"
    assert load_export(tmp_path / "e")[0].layers[0].attention.wq.weight.shape == (32, 32)


def test_eval_of_a_checkpoint_between_evaluations_names_the_steps(finished, tmp_path, capsys):
    """A checkpoint taken between evaluations (a sweep's, say) is not compared with the run's last val
    loss as if they were the same weights: --eval names both steps."""
    from smet_lab.export import main

    cfg, _, _ = finished
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=20, checkpoint_every=15))
    train(cfg, output_dir=tmp_path / "run", callbacks=QUIET)
    assert main([str(tmp_path / "run" / "checkpoints" / "step_15"), "--out", str(tmp_path / "e"), "--eval"]) == 0
    out = capsys.readouterr().out
    assert "(the run last evaluated at step 10: " in out and "; this checkpoint is step 15)" in out
    assert main([str(tmp_path / "run" / "checkpoints" / "step_20"), "--out", str(tmp_path / "f"), "--eval"]) == 0
    assert "(the run's val loss at this step: " in capsys.readouterr().out


def sweep_of(root: Path, ckpt: Path, mode: str = "min") -> Path:
    """A sweep's folder in the layout the runner writes: trial a finished with its step-30 training
    checkpoint and its final (artifacts) checkpoint; trial b finished, its training checkpoints gone;
    trial c diverged (its final checkpoint's loss, lower than any, is not a best)."""
    import shutil

    folder = root / "sw"
    keys = {"a": "method=smet,seed=0", "b": "method=naive_dst,seed=0", "c": "method=static,seed=0"}
    (folder / "tune").mkdir(parents=True)
    (folder / "grid.json").write_text(json.dumps({k: {"method": k.split(",")[0][7:]} for k in keys.values()}))
    (folder / "sweep.json").write_text(json.dumps({"sweep": {"metric": "summary/final_val_loss", "mode": mode}}))
    ended = {"a": ("FINISHED", 4.0), "b": ("FINISHED", 5.0), "c": ("DIVERGED", 1.0)}
    (folder / "trial_status.json").write_text(json.dumps({keys[t]: {"status": s, "error": None}
                                                          for t, (s, _) in ended.items()}))
    shutil.copytree(ckpt, folder / "tune" / "trial_a" / "checkpoint_000000")
    finals = {"a": "checkpoint_000001", "b": "checkpoint_000000", "c": "checkpoint_000000"}
    for trial, name, step in (("a", "checkpoint_000000", 30), *((t, finals[t], 30) for t in keys)):
        (folder / "tune" / f"trial_{trial}" / name).mkdir(parents=True, exist_ok=True)
        (folder / "tune" / f"trial_{trial}" / name / "trial.json").write_text(json.dumps({"trial": keys[trial], "step": step}))
    for trial, (status, loss) in ended.items():  # the final checkpoints: artifacts, no state.pt
        (folder / "tune" / f"trial_{trial}" / finals[trial] / "summary.json").write_text(
            json.dumps({"status": status, "error": None, "summary": {"summary/final_val_loss": loss}}))
    return folder


def test_export_a_sweep_trial_by_key_by_best_or_by_its_folder(finished, tmp_path, capsys):
    from smet_lab.export import main

    cfg, _, ckpt = finished
    if cfg.sparsity.weights == "compact":
        pytest.skip("the sweep layout does not depend on the weights' layout: checked with dense weights")
    folder = sweep_of(tmp_path, ckpt)
    expected = load_file(str(export(ckpt, tmp_path / "direct") / "model.safetensors"))
    training = folder / "tune" / "trial_a" / "checkpoint_000000"
    for i, args in enumerate(([folder, "--trial", "best"], [folder, "--trial", "method=smet,seed=0"],
                              [folder / "tune" / "trial_a"], [folder / "tune" / "trial_a" / "checkpoint_000001"])):
        assert main([*map(str, args), "--out", str(tmp_path / f"e{i}")]) == 0
        assert f"exported {training} (trial method=smet,seed=0" in capsys.readouterr().out
        got = load_file(str(tmp_path / f"e{i}" / "model.safetensors"))
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    for args, says in (([folder], "is a sweep's folder: add --trial best, or --trial KEY with KEY one of method=smet,seed=0"),
                       ([folder, "--trial", "method=smet,seed=1"], "did you mean 'method=smet,seed=0'?"),
                       ([folder, "--trial", "method=naive_dst,seed=0"], "trial 'method=naive_dst,seed=0' of "
                                                                        f"{folder} has no training checkpoint yet"),
                       ([ckpt, "--trial", "best"], "--trial picks a trial of a sweep's folder"),
                       ([tmp_path / "sw2", "--trial", "best"], f"no such file or folder; did you mean {folder}?")):
        assert main([*map(str, args), "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err
    assert not (tmp_path / "x").exists()
    folder = sweep_of(tmp_path / "max", ckpt, mode="max")  # the sweep's mode: the best is b now
    assert main([str(folder), "--trial", "best", "--out", str(tmp_path / "x")]) == 2
    assert "trial 'method=naive_dst,seed=0'" in capsys.readouterr().err


def test_a_runs_folder_exports_its_newest_checkpoint(finished, tmp_path, capsys):
    from smet_lab.export import main

    cfg, _, _ = finished
    if cfg.sparsity.weights == "compact":
        pytest.skip("the folder lookup does not depend on the weights' layout: checked with dense weights")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=20, checkpoint_every=5))
    train(cfg, output_dir=tmp_path / "run", callbacks=QUIET)
    (tmp_path / "run" / "checkpoints" / "step_25").mkdir()  # a checkpoint cut before its state file: not taken
    expected = load_file(str(export(tmp_path / "run" / "checkpoints" / "step_20", tmp_path / "direct") / "model.safetensors"))
    for i, given in enumerate((tmp_path / "run", tmp_path / "run" / "checkpoints")):
        assert main([str(given), "--out", str(tmp_path / f"e{i}")]) == 0
        assert "(the run's newest checkpoint, step_20)" in capsys.readouterr().out
        got = load_file(str(tmp_path / f"e{i}" / "model.safetensors"))
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert json.loads((tmp_path / "e0" / "manifest.json").read_text())["step"] == 20


def test_sample_prints_what_the_exported_model_writes_after_the_prompt(finished, tmp_path, capsys):
    from smet_lab.data import ByteTokenizer
    from smet_lab.export import main

    cfg, _, ckpt = finished
    if cfg.sparsity.weights == "dense":
        pytest.skip("sampling reads the export, whose layout the round-trip test covers: checked with compact weights")

    def exit_code(args: list[str]) -> int:
        try:
            return main([str(ckpt), *args])
        except SystemExit as exc:  # argparse's errors
            return exc.code

    tok = ByteTokenizer()
    for flags, tokens, seed, kw in ((["--temperature", "0", "--tokens", "12"], 12, 0, dict(temperature=0)),
                                    (["--seed", "3", "--top-k", "5"], 200, 3, dict(temperature=0.8, top_k=5))):
        assert exit_code(["--out", str(tmp_path / "e"), "--sample", "ab", *flags]) == 0
        header, text = capsys.readouterr().out.split("\n", 2)[1:]
        model, _ = load_export(tmp_path / "e")
        expected = model.generate(torch.tensor([tok.encode("ab")]), tokens, generator=torch.Generator().manual_seed(seed),
                                  **kw)
        assert header.startswith("smet_lab: sample (") and text == tok.decode(expected[0]) + "\n"
    for args, says in ((["--sample", "ab", "--tokens", "0"], "argument --tokens: 0 is not allowed: an integer >= 1"),
                       (["--tokens", "5"], "--tokens is read only with --sample PROMPT"),
                       (["--sample", "ab", "--temperature", "-1"], "argument --temperature: -1 is not allowed"),
                       (["--sample", "ab", "--temperature", "0", "--top-k", "3"], "--top-k is not read with --temperature 0"),
                       (["--sample", ""], "--sample='' is not allowed: a prompt of at least one token")):
        assert exit_code(["--out", str(tmp_path / "x"), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("smet_lab: error: ") and says in err and err.count("\n") == 1, err
        assert not (tmp_path / "x").exists()
