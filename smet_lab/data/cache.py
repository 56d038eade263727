"""A tokenized corpus kept on disk (`data.cache_dir`), so that it is tokenized once and then read
memory-mapped: by the next run, by every trial of a sweep and by every process of a torchrun, which
then share one copy in the page cache instead of holding one each.

The folder's name is a hash of what decides the token streams: the data keys, the tokenizer's own
definition, and for local files their paths, sizes and modification times. One process builds a
folder while the others wait on its lock file and then read it; it appears complete or not at all
(written under a temporary name, then renamed).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch

from smet_lab.config import ConfigError, DataConfig, cache_root
from smet_lab.data.corpus import Corpus

# Bump when the assembler's output for the same input changes (split rule, separators, dtypes); a test
# (tests/test_data.py, ASSEMBLED) fails when the tokens of a fixed input change under the same FORMAT.
FORMAT = 1


def cache_folder(value: str) -> Path:
    """data.cache_dir as a folder: `auto` is the corpora folder of smet_lab's cache (config.cache_root())."""
    return cache_root() / "corpora" if value == "auto" else Path(value).expanduser()


def cache_key(cfg: DataConfig, tok, files: list[str]) -> str:
    stat = [(os.path.abspath(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    spec = {"format": FORMAT, "name": cfg.name, "tokenizer": tok.fingerprint(), "val_fraction": cfg.val_fraction,
            "seed": cfg.seed, "max_tokens": cfg.max_tokens, "files": stat,
            # pysource reads the running Python's standard library
            "python": sys.version if cfg.name == "pysource" else None}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


def cached(cfg: DataConfig, tok, files: list[str], build: Callable[[], Corpus],
           say: Callable[[str], None] | None) -> Corpus:
    """The corpus from `cfg.cache_dir`, built there by `build()` first if no process has yet."""
    folder = cache_folder(cfg.cache_dir) / f"{cfg.name}-{cache_key(cfg, tok, files)}"
    if not (folder / "meta.json").is_file():
        _build_once(cfg, folder, build, say)
    meta = json.loads((folder / "meta.json").read_text())
    dtype = getattr(torch, meta["dtype"])

    def stream(split: str) -> torch.Tensor:  # a private map: pages come from the shared page cache
        return torch.from_file(str(folder / f"{split}.bin"), shared=False, size=meta[f"{split}_tokens"], dtype=dtype)

    return Corpus(train=stream("train"), val=stream("val"), vocab_size=meta["vocab_size"], sha256=meta["sha256"],
                  name=meta["name"], n_documents=meta["n_documents"], tokenizer=meta["tokenizer"])


def _build_once(cfg: DataConfig, folder: Path, build: Callable[[], Corpus], say: Callable[[str], None] | None) -> None:
    def unwritable(e: OSError) -> ConfigError:  # e.g. no space left: one line, no partial folder
        return ConfigError("data.cache_dir", cfg.cache_dir, f"cannot write the tokenized corpus there "
                           f"({e.strerror or e}); another folder, or null (no cache)")

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        lock = open(folder.parent / f"{folder.name}.lock", "w")
    except OSError as e:
        raise unwritable(e) from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if say:
                say(f"smet_lab: waiting for another process to write the tokenized corpus {folder}")
            fcntl.flock(lock, fcntl.LOCK_EX)  # released by the writer, or by the OS if it died
        if (folder / "meta.json").is_file():
            return
        corpus = build()
        try:
            _write(corpus, folder)
        except OSError as e:
            raise unwritable(e) from None
    if say:
        say(f"smet_lab: tokenized corpus kept in {folder} (the next run reads it from there)")


def _write(corpus: Corpus, folder: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        for split in ("train", "val"):
            getattr(corpus, split).numpy().tofile(tmp / f"{split}.bin")
        meta = {"dtype": str(corpus.train.dtype).removeprefix("torch."), "train_tokens": len(corpus.train),
                "val_tokens": len(corpus.val), "vocab_size": corpus.vocab_size, "sha256": corpus.sha256,
                "name": corpus.name, "n_documents": corpus.n_documents, "tokenizer": corpus.tokenizer}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
