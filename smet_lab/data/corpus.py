"""Corpora as token streams.

Every corpus is a generator of (key, text) documents; one shared `_Assembler` does the rest
(fingerprint, train/val split, tokenization, token budget), so all corpora behave the same way.
Adding a corpus = one function `fn(cfg, tok) -> Corpus` + one entry in `CORPORA`.

Split rule: a document goes to val iff uniform(sha256(f"{seed}:{key}")) < val_fraction. It depends
only on the seed and the document's key, never on file order or count.
Fingerprint (`Corpus.sha256`): sha256 over key + b"\\0" + text + b"\\0" (UTF-8) of every document
read, in order, so edits and renames both change it.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import sysconfig
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

from smet_lab.config import ConfigError, DataConfig, check_writable_dir
from smet_lab.data.files import JSON_SUFFIXES, TEXT_SUFFIXES, file_docs, resolve_files
from smet_lab.data.tokenizer import build_tokenizer, hub_reachable

Docs = Iterable[tuple[str, str]]
# (report(line), seconds between lines) of the load_corpus call under way: a paper-scale corpus takes minutes.
_PROGRESS: ContextVar[tuple[Callable[[str], None], float] | None] = ContextVar("corpus_progress", default=None)


@dataclass
class Corpus:
    train: torch.Tensor  # 1-D token ids, compact dtype (see storage_dtype)
    val: torch.Tensor
    vocab_size: int
    sha256: str
    name: str
    n_documents: int
    tokenizer: str


def storage_dtype(vocab_size: int) -> torch.dtype:
    """Smallest dtype holding every id (the pysource stream is ~12M tokens: 12 MB as uint8)."""
    if vocab_size <= 256:
        return torch.uint8
    return torch.int16 if vocab_size < 32768 else torch.int32


def is_val(seed: int, key: str, val_fraction: float) -> bool:
    """The per-document split rule (see module docstring)."""
    h = hashlib.sha256(f"{seed}:{key}".encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < val_fraction


CHUNK = 256  # documents tokenized in one batch


class _Assembler:
    """Collects documents into train/val token streams under an optional token budget."""

    def __init__(self, tok, cfg: DataConfig, budget: int = 0):
        self.tok, self.seed, self.val_fraction = tok, cfg.seed, cfg.val_fraction
        self.dtype = storage_dtype(tok.vocab_size)
        sep = [tok.eos_id] if tok.eos_id is not None else tok.encode("\n")
        self.sep = torch.tensor(sep, dtype=torch.int64).to(self.dtype)
        self.limit = {"train": budget, "val": max(1, int(budget * cfg.val_fraction))} if budget else None
        self.parts: dict[str, list[torch.Tensor]] = {"train": [], "val": []}
        self.count = {"train": 0, "val": 0}
        self.sha = hashlib.sha256()
        self.n_documents = 0
        self.progress = _PROGRESS.get()
        self.started = self.last_report = time.monotonic()

    def full(self, split: str) -> bool:
        return self.limit is not None and self.count[split] >= self.limit[split]

    def add(self, key: str, text: str, split: str, ids: torch.Tensor | None) -> None:
        self.sha.update(key.encode("utf-8") + b"\0" + text.encode("utf-8") + b"\0")
        self.n_documents += 1
        if not self.full(split):  # past the budget we still fingerprint, but skip tokenizing
            ids = ids.to(self.dtype)
            self.parts[split].append(ids)
            self.count[split] += len(ids) + len(self.sep)
        if self.progress and time.monotonic() - self.last_report >= self.progress[1]:
            self.report()

    def report(self) -> None:
        self.last_report = now = time.monotonic()
        got, rate = self.count["train"], self.count["train"] / max(now - self.started, 1e-9)
        if self.limit:
            want = self.limit["train"]
            eta = (want - got) / rate if rate else 0.0
            done = f"{got:,} / {want:,} training tokens ({100 * min(got, want) // want} %)"
            tail = "" if got >= want or not rate else f", ETA {eta:.0f} s" if eta < 90 else f", ETA {eta / 60:.1f} min"
        else:
            done, tail = f"{got:,} training tokens", ""
        self.progress[0](f"smet_lab: reading the corpus: {done}, {self.n_documents:,} documents, "
                         f"{rate / 1e6:.2f} M tokens/s{tail}")

    def consume(self, docs: Docs | dict[str, Docs], stop_early: bool) -> None:
        """Add documents. stop_early (streamed corpora): stop reading once the budget is met;
        otherwise read everything so the fingerprint covers the whole source.
        A dict {split: docs} takes each split from its own source (remote C4 train/validation)."""
        if isinstance(docs, dict):
            for split, source in docs.items():
                self._consume(((key, text, split) for key, text in source),
                              (lambda: self.full(split)) if stop_early else None)
            return
        self._consume(((key, text, None) for key, text in docs),
                      (lambda: self.full("train") and self.full("val")) if stop_early else None)

    def _consume(self, docs: Iterator[tuple[str, str, str | None]], done: Callable[[], bool] | None) -> None:
        """Documents in order, each exactly as if added one by one, but tokenized CHUNK at a time: a
        document is tokenized if its split was not full at its chunk's start (a superset of those added)."""
        while chunk := list(itertools.islice(docs, CHUNK)):
            splits = [split or ("val" if is_val(self.seed, key, self.val_fraction) else "train")
                      for key, _, split in chunk]
            todo = [i for i, split in enumerate(splits) if not self.full(split)]
            ids = dict(zip(todo, self.tok.encode_tensors([chunk[i][1] for i in todo])))
            for i, ((key, text, _), split) in enumerate(zip(chunk, splits)):
                self.add(key, text, split, ids.get(i))
                if done and done():
                    return

    def _join(self, parts: list[torch.Tensor]) -> torch.Tensor:
        pieces = []
        for i, p in enumerate(parts):
            pieces += [self.sep, p] if i else [p]
        return torch.cat(pieces) if pieces else torch.empty(0, dtype=self.dtype)

    def finish(self, name: str, error_key: str, error_value) -> Corpus:
        train_parts, val_parts = self.parts["train"], self.parts["val"]
        if len(train_parts) + len(val_parts) == 1:
            # A single document cannot be split per document (whichever side its key fell): its tail becomes val.
            whole = self._join(train_parts + val_parts)
            n_val = max(1, int(len(whole) * self.val_fraction))
            train, val = whole[:-n_val], whole[-n_val:]
        else:  # neither split empty
            if not val_parts and train_parts:
                val_parts.append(train_parts.pop())
            if not train_parts and val_parts:
                train_parts.append(val_parts.pop())
            train, val = self._join(train_parts), self._join(val_parts)
        if self.limit is not None:
            train, val = train[: self.limit["train"]], val[: self.limit["val"]]
        if len(train) == 0 or len(val) == 0:
            raise ConfigError(error_key, error_value, f"corpus too small: {len(train)} train / {len(val)} val tokens")
        return Corpus(train=train, val=val, vocab_size=self.tok.vocab_size, sha256=self.sha.hexdigest(),
                      name=name, n_documents=self.n_documents, tokenizer=self.tok.name)


def _assemble(name: str, docs, tok, cfg: DataConfig, budget: int | None = None, stop_early: bool = False,
              error_key: str = "data.name", error_value=None) -> Corpus:
    asm = _Assembler(tok, cfg, cfg.max_tokens if budget is None else budget)
    asm.consume(docs, stop_early)
    return asm.finish(name, error_key, name if error_value is None else error_value)


# --- pysource: the running Python's standard library ------------------------------------------

_PYSOURCE_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test"}


def pysource_files() -> tuple[str, list[str]]:
    """(stdlib root, sorted relative posix paths of its *.py files, tests and site-packages excluded)."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _PYSOURCE_SKIP]  # prune: no descent
        rel = os.path.relpath(dirpath, root)
        found += [os.path.normpath(os.path.join(rel, f)).replace(os.sep, "/") for f in filenames if f.endswith(".py")]
    return root, sorted(found)


def _pysource(cfg: DataConfig, tok) -> Corpus:
    root, files = pysource_files()

    def docs() -> Iterator[tuple[str, str]]:
        for rel in files:
            with open(os.path.join(root, rel), encoding="utf-8", errors="replace") as f:
                yield rel, f.read()

    return _assemble("pysource", docs(), tok, cfg)


# --- synthetic: a seeded Markov chain, for tests ----------------------------------------------

_PRINTABLE = [chr(c) for c in range(32, 127)]


def _synthetic_docs(seed: int) -> Iterator[tuple[str, str]]:
    rng = random.Random(seed)
    # Each symbol has 4 successors with skewed weights: low-entropy structure a model can learn.
    # A 64-entry lookup table per symbol makes sampling one getrandbits(6) call per character.
    table = {s: "".join(rng.choices(rng.sample(_PRINTABLE, 4), weights=[8, 4, 2, 1], k=64)) for s in _PRINTABLE}
    state, i = rng.choice(_PRINTABLE), 0
    while True:  # endless: the assembler stops at the token budget
        out = []
        for _ in range(rng.randint(64, 1024)):
            state = table[state][rng.getrandbits(6)]
            out.append(state)
        yield f"synthetic/{i}", "".join(out)
        i += 1


def _synthetic(cfg: DataConfig, tok) -> Corpus:
    return _assemble("synthetic", _synthetic_docs(cfg.seed), tok, cfg,
                     budget=cfg.max_tokens or 200_000, stop_early=True)


# --- local files (smet_lab/data/files.py) ---------------------------------------------------


def _text_files(cfg: DataConfig, tok) -> Corpus:
    files = resolve_files(cfg.path, TEXT_SUFFIXES, any_named_file=True)
    return _assemble("text_files", file_docs(files), tok, cfg, error_key="data.path", error_value=cfg.path)


# --- c4: Hugging Face datasets, streamed ------------------------------------------------------


def _hf_docs(ds, fail: Callable[[Exception], ConfigError], where: str) -> Iterator[tuple[str, str]]:
    """Records of a streamed dataset as documents; keyed by URL (C4 has one) or else by content."""
    it = iter(ds)
    for i in itertools.count(1):
        try:
            rec = next(it)
        except StopIteration:
            return
        except Exception as e:  # network drop, bad JSON, ...: surface as a one-line config error
            raise fail(e) from None
        text = rec.get("text")
        if not isinstance(text, str):
            raise ConfigError("data.path", f"{where} record {i}", 'each record needs a "text" string')
        yield rec.get("url") or hashlib.sha256(text.encode("utf-8")).hexdigest(), text


def _c4(cfg: DataConfig, tok) -> Corpus:
    if cfg.max_tokens <= 0:
        raise ConfigError("data.max_tokens", cfg.max_tokens, "c4 is streamed: give a token budget > 0")
    try:
        import datasets  # lazy: heavy, optional (hf extra)
    except ImportError:
        raise ConfigError("data.name", "c4", "needs the 'datasets' package (pip install smet_lab[hf])") from None
    if cfg.path:
        files = data_files(cfg)

        def bad_file(e: Exception) -> ConfigError:
            return ConfigError("data.path", cfg.path, f"cannot read as JSON lines ({type(e).__name__}: {e})")

        try:
            ds = datasets.load_dataset("json", data_files=files, split="train", streaming=True)
        except Exception as e:
            raise bad_file(e) from None
        docs = _hf_docs(ds, bad_file, cfg.path)  # one stream: split by the per-document rule
    else:
        if not hub_reachable():
            raise ConfigError("data.name", "c4", "cannot reach the Hugging Face hub (offline?); "
                              "give data.path=<local C4 .json.gz shards>")

        def offline(_: Exception) -> ConfigError:
            return ConfigError("data.name", "c4", "cannot reach the Hugging Face hub (offline?); "
                               "give data.path=<local C4 .json.gz shards>")

        try:
            docs = {split: _hf_docs(datasets.load_dataset("allenai/c4", "en", split=hf_split, streaming=True),
                                    offline, "allenai/c4")
                    for split, hf_split in (("train", "train"), ("val", "validation"))}
        except Exception as e:
            raise offline(e) from None
    return _assemble("c4", docs, tok, cfg, stop_early=True)


CORPORA: dict[str, Callable[[DataConfig, object], Corpus]] = {
    "pysource": _pysource,
    "synthetic": _synthetic,
    "text_files": _text_files,
    "c4": _c4,
}


def check_data(cfg: DataConfig):
    """Cheap pre-flight of every data key (no corpus is read); returns the tokenizer it built."""
    if cfg.name not in CORPORA:
        raise ConfigError("data.name", cfg.name, f"one of {', '.join(CORPORA)}")
    vf = cfg.val_fraction
    if isinstance(vf, bool) or not isinstance(vf, (int, float)) or not 0 < vf <= 0.5:
        raise ConfigError("data.val_fraction", vf, "a number in (0, 0.5]")
    if isinstance(cfg.max_tokens, bool) or not isinstance(cfg.max_tokens, int) or cfg.max_tokens < 0:
        raise ConfigError("data.max_tokens", cfg.max_tokens, "an integer >= 0 (0 = whole corpus)")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise ConfigError("data.seed", cfg.seed, "an integer")
    if cfg.name == "c4" and cfg.max_tokens <= 0:
        raise ConfigError("data.max_tokens", cfg.max_tokens, "c4 is streamed: give a token budget > 0")
    data_files(cfg)  # a missing or unreadable data.path
    if cfg.cache_dir is not None:
        if not isinstance(cfg.cache_dir, str) or not cfg.cache_dir:
            raise ConfigError("data.cache_dir", cfg.cache_dir, "a folder path, auto (smet_lab's cache) or null (no cache)")
        from smet_lab.data.cache import cache_folder

        check_writable_dir("data.cache_dir", cache_folder(cfg.cache_dir))
    return build_tokenizer(cfg.tokenizer)


def data_files(cfg: DataConfig) -> list[str]:
    """The local files the corpus of `cfg` reads (none for pysource, synthetic and C4 from the hub)."""
    if cfg.name == "text_files" or (cfg.name == "c4" and cfg.path):
        text = cfg.name == "text_files"
        return [p for _, p in resolve_files(cfg.path, TEXT_SUFFIXES if text else JSON_SUFFIXES, any_named_file=text)]
    return []


def load_corpus(cfg: DataConfig, progress: Callable[[str], None] | None = None, every_s: float = 15.0) -> Corpus:
    """Validate `cfg`, build its tokenizer and load the named corpus; with `cfg.cache_dir`, tokenized
    once into that folder and read from it memory-mapped (smet_lab.data.cache). `progress` gets a line
    every `every_s` seconds while documents are read (none for a quick load)."""
    tok = check_data(cfg)
    token = _PROGRESS.set((progress, every_s) if progress else None)
    try:
        if not cfg.cache_dir:
            return CORPORA[cfg.name](cfg, tok)
        from smet_lab.data.cache import cached

        return cached(cfg, tok, data_files(cfg), lambda: CORPORA[cfg.name](cfg, tok), progress)
    finally:
        _PROGRESS.reset(token)
