"""What the corpus cache (data.cache_dir) saves: the time to have a tokenized corpus, and the memory of
several processes that train on it.

    python benchmarks/corpus_cache.py [--tokens 20000000] [--vocab 32000] [--md results/corpus_cache.md]

Writes JSON-lines shards (C4's format) of the running Python's standard library, repeated until about
--tokens tokens, trains a byte-level BPE tokenizer of --vocab symbols on them (so ids need int16, as
with T5's 32k), then times load_corpus(data=text_files) three ways: without a cache, filling an empty
cache, and from the filled cache. Then, with and without the cache, starts 2 processes that each load
the corpus and touch every token, and reports each one's private (anonymous) resident memory: the
corpus is in it without the cache, and in the shared page cache with it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from smet_lab.config import DataConfig
from smet_lab.data import load_corpus
from smet_lab.data.corpus import pysource_files

TOUCH = """
import sys
from smet_lab.config import DataConfig
from smet_lab.data import load_corpus
c = load_corpus(DataConfig(name="text_files", path=sys.argv[1], tokenizer="hf:" + sys.argv[2],
                           cache_dir=sys.argv[3] or None, max_tokens=int(sys.argv[4])))
print(int(c.train.sum()) + int(c.val.sum()), flush=True)  # every page read
sys.stdin.readline()  # hold the corpus while the parent measures
"""


def rss_anon(pid: int) -> int:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("RssAnon"))
    return int(line.split()[1]) * 1024


def two_processes(cfg, cache_dir: str, tokens: int) -> list[int]:
    """Private resident bytes of each of 2 processes holding the corpus."""
    procs = [subprocess.Popen([sys.executable, "-c", TOUCH, cfg.path, str(Path(cfg.tokenizer[3:])), cache_dir, str(tokens)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    sums = [p.stdout.readline().strip() for p in procs]
    anon = [rss_anon(p.pid) for p in procs]
    for p in procs:
        p.communicate("\n")
    assert len(set(sums)) == 1 and sums[0], sums
    return anon


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=20_000_000)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--md", default=None)
    args = ap.parse_args()
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    work = Path(tempfile.mkdtemp(prefix="corpus_cache_"))
    root, files = pysource_files()
    texts = [Path(root, f).read_text(encoding="utf-8", errors="replace") for f in files]
    size = sum(map(len, texts))
    repeats = max(1, round(args.tokens * 3.5 / size))  # ~3.5 characters per BPE token on code
    with open(work / "c4-like.00000.jsonl", "w") as f:
        for r in range(repeats):
            f.writelines(json.dumps({"text": t, "url": f"{r}/{name}"}) + "\n" for name, t in zip(files, texts))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts[:2000], trainers.BpeTrainer(vocab_size=args.vocab, special_tokens=["</s>"]))
    tok.save(str(work / "tokenizer.json"))
    cfg = DataConfig(name="text_files", path=str(work / "c4-like.00000.jsonl"), tokenizer=f"hf:{work}",
                     max_tokens=args.tokens)
    cached = DataConfig(**{**cfg.__dict__, "cache_dir": str(work / "cache")})
    times = {}
    for label, c in [("no cache", cfg), ("filling the cache", cached), ("from the cache", cached)]:
        t = time.perf_counter()
        corpus = load_corpus(c, progress=print)
        times[label] = time.perf_counter() - t
        print(f"{label}: {times[label]:.2f} s, {len(corpus.train):,} train tokens ({corpus.train.dtype})", flush=True)
    n_bytes = (len(corpus.train) + len(corpus.val)) * corpus.train.element_size()

    mib = 2**20
    private = {"without the cache": two_processes(cfg, "", args.tokens),
               "with the cache": two_processes(cfg, cached.cache_dir, args.tokens)}
    lines = [
        "# The corpus cache (data.cache_dir)", "",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()} ({os.cpu_count()} CPUs), "
        f"`python benchmarks/corpus_cache.py --tokens {args.tokens} --vocab {args.vocab}`: a byte-level BPE "
        f"tokenizer of {args.vocab} symbols, {len(corpus.train):,} training tokens ({corpus.train.dtype}, "
        f"{n_bytes / mib:.0f} MiB with validation) of Python source as JSON lines.", "",
        "| load_corpus | seconds |", "|---|---|",
        *(f"| {k} | {v:.2f} |" for k, v in times.items()), "",
        "Two processes holding the corpus (every token touched), private resident memory of each "
        "(RssAnon: the interpreter, torch, and the corpus unless it is mapped from the cache):", "",
        "| | process 1 MiB | process 2 MiB |", "|---|---|---|",
        *(f"| {k} | {a / mib:.0f} | {b / mib:.0f} |" for k, (a, b) in private.items()),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.md:
        Path(args.md).write_text(text)


if __name__ == "__main__":
    main()
