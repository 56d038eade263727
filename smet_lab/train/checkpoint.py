"""Checkpoints: model, compact optimizer state, topology, step, RNG and data position in one file.

Written to a temporary name and renamed, so a crash never leaves a half-written checkpoint."""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from pathlib import Path

import torch

from smet_lab.config import ConfigError, no_such_path

STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"


def folder(output_dir, step: int) -> Path:
    """Where a run writes the checkpoint of `step`: <output_dir>/checkpoints/step_<step>."""
    return Path(output_dir) / "checkpoints" / f"step_{step}"


def _step(folder: Path) -> int | None:
    """N of a step_<N> folder, or None for another name."""
    name = folder.name.removeprefix("step_")
    return int(name) if name.isdigit() else None


def newest(output_dir) -> Path | None:
    """A run folder's checkpoint of the latest step (one with its state file), or None."""
    found = [(_step(p), p) for p in Path(output_dir).glob("checkpoints/step_*")
             if _step(p) is not None and (p / STATE_FILE).is_file()]
    return max(found)[1] if found else None


def _folder(path: str | Path) -> Path:
    """The checkpoint folder that `train.resume_from` names (resolve), also when it names the state file."""
    path = resolve(path)
    return path if path.is_dir() else path.parent


def step_of(path: str | Path) -> int | None:
    """The step a checkpoint was written at (its folder's name, step_<N>), or None for another name."""
    return _step(_folder(path))


def resolve(path: str | Path) -> Path:
    """A checkpoint as `train.resume_from` names it: a checkpoints/step_<N> folder or its state file as
    given; a run's output folder, or its checkpoints/, gives the run's newest checkpoint."""
    path = Path(path)
    if path.is_dir() and not (path / STATE_FILE).is_file():
        return newest(path.parent if path.name == "checkpoints" else path) or path
    return path


def changes(path: str | Path, cfg) -> list[str]:
    """'key: old -> new' for each setting of `cfg` other than the checkpoint's (what a resume changes)."""
    config_file = _folder(path) / CONFIG_FILE
    if not config_file.is_file():
        return []

    def flat(d: dict, prefix: str = "") -> dict:
        return {k: v for key, value in d.items() for k, v in
                (flat(value, f"{prefix}{key}.").items() if isinstance(value, dict) else [(prefix + key, value)])}

    saved, mine = flat(json.loads(config_file.read_text())), flat(json.loads(json.dumps(dataclasses.asdict(cfg), default=str)))
    return [f"{k}: {saved[k]!r} -> {mine[k]!r}" for k in mine
            if k in saved and saved[k] != mine[k] and k not in ("train.resume_from", "model.vocab_size")]


def save(run, path: Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # config.json first: a state.pt is then always beside the config that check() compares against.
    for name, write in ((CONFIG_FILE, lambda f: f.write_text(json.dumps(dataclasses.asdict(run.cfg), indent=1, default=str))),
                        (STATE_FILE, lambda f: torch.save(run.state_dict(), f))):
        tmp = path / (name + ".tmp")
        write(tmp)
        os.replace(tmp, path / name)
    return path


def load(path: str | Path, cfg) -> dict:
    """Load a checkpoint for `cfg`, refusing one of another model or sparsity layout."""
    return torch.load(check(path, cfg), map_location="cpu", weights_only=False)


def check(path: str | Path, cfg) -> Path:
    """The checkpoint's state file, if it exists and was written for the same model and layout."""
    path = resolve(path)
    state_file = path / STATE_FILE if path.is_dir() else path
    if not state_file.is_file():
        raise ConfigError("train.resume_from", str(path), no_such_path(path) or "a run's output folder, or a "
                          f"checkpoints/step_<N> folder with {STATE_FILE} (there is none there)")
    try:  # torch.save writes a zip archive: its directory is read without loading the tensors
        zipfile.ZipFile(state_file).close()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ConfigError("train.resume_from", str(path), f"{state_file} is not a readable checkpoint ({exc}: "
                          "truncated or overwritten?); resume from another checkpoints/step_<N> folder") from None
    config_file = state_file.parent / CONFIG_FILE
    if config_file.is_file():
        saved = json.loads(config_file.read_text())
        for section, keys in (("model", ("dim", "n_layers", "n_heads", "ffn_dim", "vocab_size", "seq_len")),
                              ("sparsity", ("density", "distribution", "block_size", "weights")),
                              ("optim", ("state",))):
            for key in keys:
                node = getattr(cfg, section)
                # a checkpoint written before a key existed (sparsity.weights) used its default
                mine, theirs = getattr(node, key), saved[section].get(key, getattr(type(node)(), key))
                if mine != theirs:
                    raise ConfigError("train.resume_from", str(path),
                                      f"checkpoint has {section}.{key}={theirs!r} but this run has {mine!r}")
    return state_file
