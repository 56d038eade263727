"""Tests for smet_lab.data: tokenizers, corpora and batching, checked against values computed here."""

import dataclasses
import gzip
import hashlib
import json
import re
import string
import sysconfig
from pathlib import Path

import pytest
import torch

from smet_lab.config import ConfigError, DataConfig
from smet_lab.data import CORPORA, Corpus, TokenBatcher, build_tokenizer, check_streams, load_corpus, storage_dtype


def text_of(ids: torch.Tensor) -> str:
    return bytes(ids.tolist()).decode("utf-8")


def fingerprint(docs) -> str:
    """The documented fingerprint: key NUL text NUL over all documents in order."""
    h = hashlib.sha256()
    for key, text in docs:
        h.update(key.encode() + b"\0" + text.encode() + b"\0")
    return h.hexdigest()


def split_by_membership(docs, val_text_docs, sep):
    """Given which documents landed in val, the exact train/val streams expected."""
    train = sep.join(d for d in docs if d not in val_text_docs)
    val = sep.join(d for d in docs if d in val_text_docs)
    return train, val


# --- tokenizers ---------------------------------------------------------------------------------


def test_byte_tokenizer_round_trip():
    tok = build_tokenizer("byte")
    text = "héllo, wörld ✓\n\tend"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and len(ids) == len(text) + 4  # é, ö: 2 bytes; ✓: 3
    assert tok.decode(ids) == text and tok.decode(torch.tensor(ids)) == text
    assert [t.tolist() for t in tok.encode_tensors([text, ""])] == [ids, []]
    assert (tok.vocab_size, tok.eos_id, tok.name) == (256, None, "byte")


@pytest.mark.parametrize("spec", ["bpe", "", "hf:", "hf:/no/such/dir/tokenizer.json", None])
def test_bad_tokenizer_spec(spec):
    with pytest.raises(ConfigError, match="data.tokenizer"):
        build_tokenizer(spec)


@pytest.mark.parametrize("path", ["/no/such/folder", "./no_such_folder"])
def test_a_missing_local_tokenizer_path_is_not_looked_up_on_the_hub(path):
    with pytest.raises(ConfigError, match=f"no tokenizer.json at {path} \\(no such file or folder\\)"):
        build_tokenizer(f"hf:{path}")


def test_a_mistyped_tokenizer_path_gets_a_did_you_mean(tmp_path):
    (tmp_path / "t5-tokenizer").mkdir()
    with pytest.raises(ConfigError, match=f"no such file or folder; did you mean {tmp_path}/t5-tokenizer\\?"):
        build_tokenizer(f"hf:{tmp_path}/t5_tokenizer")


def test_hf_tokenizer_from_file_and_dir(hf_tok_dir):
    from tokenizers import Tokenizer

    ref = Tokenizer.from_file(str(hf_tok_dir / "tokenizer.json"))
    for spec in (f"hf:{hf_tok_dir}", f"hf:{hf_tok_dir / 'tokenizer.json'}"):
        tok = build_tokenizer(spec)
        assert tok.name == spec and tok.vocab_size == ref.get_vocab_size() > 10
        assert tok.eos_id == ref.token_to_id("</s>") == 1
        text = "the cat ate a bone zebra"
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False).ids
        assert tok.encode(text)[-1] == 0 and ref.encode(text).ids[-1] == 1  # zebra -> [UNK]; no </s>
        assert tok.decode(tok.encode("the dog")) == "the dog"
        texts = ["the cat sat", "", "a dog ate the bone zebra", "one two three four"]
        assert [t.tolist() for t in tok.encode_tensors(texts)] == \
            [ref.encode(t, add_special_tokens=False).ids for t in texts]


def test_storage_dtype():
    assert [storage_dtype(v) for v in (2, 256, 257, 32767, 32768, 50000)] == [
        torch.uint8, torch.uint8, torch.int16, torch.int16, torch.int32, torch.int32]


# --- pysource -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pysource():
    return load_corpus(DataConfig())


def stdlib_docs():
    """The stdlib file list, computed independently of the module (pathlib, not os.walk)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
    rels = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py")
                  if not skip & set(p.relative_to(root).parts[:-1]))
    return [(r, (root / r).read_text(encoding="utf-8", errors="replace")) for r in rels]


def test_pysource_matches_independent_recomputation(pysource):
    docs = stdlib_docs()
    assert 300 < len(docs) == pysource.n_documents
    assert isinstance(pysource, Corpus) and pysource.sha256 == fingerprint(docs)
    assert (pysource.name, pysource.tokenizer, pysource.vocab_size) == ("pysource", "byte", 256)
    assert pysource.train.dtype == pysource.val.dtype == torch.uint8
    # Documents are whole units joined by "\n": membership in val is read off the val stream,
    # so the streams must be exactly the in-order joins of two disjoint document sets.
    texts = [t for _, t in docs]
    val_keys = {}
    for key, text in docs:
        h = hashlib.sha256(f"0:{key}".encode()).digest()  # the documented split rule, seed 0
        val_keys[key] = int.from_bytes(h[:8], "big") / 2**64 < 0.05
    val_docs = {t for (k, t) in docs if val_keys[k]}
    train, val = split_by_membership(texts, val_docs, "\n")
    assert text_of(pysource.val) == val and text_of(pysource.train) == train
    share = sum(val_keys.values()) / len(docs)
    assert 0.02 < share < 0.09, share


def test_pysource_deterministic_and_budget(pysource):
    again = load_corpus(DataConfig())
    assert again.sha256 == pysource.sha256
    assert torch.equal(again.train, pysource.train) and torch.equal(again.val, pysource.val)
    small = load_corpus(DataConfig(max_tokens=10_000))
    assert len(small.train) == 10_000 and len(small.val) == 500
    assert torch.equal(small.train, pysource.train[:10_000]) and torch.equal(small.val, pysource.val[:500])
    assert small.sha256 == pysource.sha256  # the fingerprint covers the source, not the budget
    other = load_corpus(DataConfig(seed=1, max_tokens=10_000))
    assert not torch.equal(other.val, small.val)  # another seed, another split


# --- synthetic ----------------------------------------------------------------------------------


def test_synthetic_deterministic_sized_and_structured():
    a = load_corpus(DataConfig(name="synthetic", seed=3, max_tokens=20_000))
    b = load_corpus(DataConfig(name="synthetic", seed=3, max_tokens=20_000))
    c = load_corpus(DataConfig(name="synthetic", seed=4, max_tokens=20_000))
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val) and a.sha256 == b.sha256
    assert not torch.equal(a.train[:1000], c.train[:1000]) and a.sha256 != c.sha256
    assert len(a.train) == 20_000 and len(a.val) == 1_000
    text = text_of(a.train)
    assert set(text) <= set(string.printable[:95]) | {"\n"}
    # Learnable structure: every symbol has at most 4 distinct successors (uniform would give ~95).
    successors = {}
    for p, q in zip(text, text[1:]):
        if "\n" not in (p, q):
            successors.setdefault(p, set()).add(q)
    assert len(successors) > 20 and max(len(s) for s in successors.values()) <= 4
    assert len(load_corpus(DataConfig(name="synthetic")).train) == 200_000  # default size


# --- text_files ---------------------------------------------------------------------------------


def write_tree(root: Path) -> list[str]:
    """a.txt, b.jsonl, sub/c.jsonl.gz; returns the documents in the expected (sorted) order."""
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha document, plain text ✓")
    b_docs = [f"b line {i}" for i in range(6)]
    (root / "b.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(b_docs)) + "\n")
    c_docs = [f"c gz line {i}" for i in range(8)]
    with gzip.open(root / "sub" / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t, "url": f"u{i}"}) + "\n" for i, t in enumerate(c_docs))
    (root / "ignored.csv").write_text("not,a,document")
    return ["alpha document, plain text ✓", *b_docs, *c_docs]


def test_text_files_directory(tmp_path):
    docs = write_tree(tmp_path / "d")
    corpus = load_corpus(DataConfig(name="text_files", path=str(tmp_path / "d"), val_fraction=0.4))
    val_docs = set(text_of(corpus.val).split("\n"))
    train, val = split_by_membership(docs, val_docs, "\n")
    assert text_of(corpus.train) == train and text_of(corpus.val) == val
    assert 0 < len(val_docs) < len(docs) and corpus.n_documents == len(docs)
    keys = ["a.txt", *(f"b.jsonl:{i + 1}" for i in range(6)), *(f"sub/c.jsonl.gz:{i + 1}" for i in range(8))]
    assert corpus.sha256 == fingerprint(zip(keys, docs))


def test_text_files_split_independent_of_file_count_and_rename_changes_sha(tmp_path):
    d = tmp_path / "d"
    docs = write_tree(d)
    cfg = DataConfig(name="text_files", path=str(d), val_fraction=0.4)
    before = load_corpus(cfg)
    (d / "0_extra.txt").write_text("an extra document sorted first")
    (d / "z.jsonl").write_text("".join(json.dumps({"text": f"z{i}"}) + "\n" for i in range(20)))
    after = load_corpus(cfg)
    old_val = set(text_of(before.val).split("\n"))
    new_val = set(text_of(after.val).split("\n"))
    assert {t for t in new_val if t in docs} == old_val  # old documents kept their split
    (d / "0_extra.txt").rename(d / "0_renamed.txt")
    assert load_corpus(cfg).sha256 != after.sha256


def test_text_files_glob_and_single_file(tmp_path):
    write_tree(tmp_path / "d")
    jsonl = load_corpus(DataConfig(name="text_files", path=str(tmp_path / "d" / "**" / "*.jsonl*"), val_fraction=0.5))
    assert jsonl.n_documents == 14 and "alpha" not in text_of(jsonl.train) + text_of(jsonl.val)
    one = load_corpus(DataConfig(name="text_files", path=str(tmp_path / "d" / "a.txt"), val_fraction=0.25))
    whole = "alpha document, plain text ✓".encode()
    # One document cannot be split per document: its tail (a quarter) is val.
    assert bytes(one.train.tolist()) + bytes(one.val.tolist()) == whole
    assert len(one.val) == len(whole) // 4 and one.n_documents == 1
    # A file named alone is read as plain text whatever its name (a folder or glob takes only the suffixes).
    (tmp_path / "notes.md").write_text("# notes\n\nplain *markdown* text, read as it is\n")
    md = load_corpus(DataConfig(name="text_files", path=str(tmp_path / "notes.md"), val_fraction=0.25))
    assert bytes(md.train.tolist()) + bytes(md.val.tolist()) == (tmp_path / "notes.md").read_bytes()


def test_val_never_empty(tmp_path):
    names = ["one.txt", "two.txt", "three.txt"]
    for n in names:
        (tmp_path / n).write_text(f"document {n}")
        h = hashlib.sha256(f"0:{n}".encode()).digest()
        assert int.from_bytes(h[:8], "big") / 2**64 >= 0.01  # the rule puts none of them into val
    corpus = load_corpus(DataConfig(name="text_files", path=str(tmp_path), val_fraction=0.01))
    # ... so the last document (sorted: two.txt) is moved there.
    assert text_of(corpus.val) == "document two.txt"
    assert text_of(corpus.train) == "document one.txt\ndocument three.txt"


def test_train_never_empty(tmp_path):
    """The mirror case: every document's key falls into val (or the only one does)."""
    names = ["one.txt", "three.txt", "five.txt"]
    for n in names:
        (tmp_path / n).write_text(f"document {n}")
        h = hashlib.sha256(f"0:{n}".encode()).digest()
        assert int.from_bytes(h[:8], "big") / 2**64 < 0.5  # the rule puts all of them into val
    corpus = load_corpus(DataConfig(name="text_files", path=str(tmp_path), val_fraction=0.5))
    assert text_of(corpus.train) == "document three.txt"  # the last one (sorted) is moved to train
    assert text_of(corpus.val) == "document five.txt\ndocument one.txt"
    one = load_corpus(DataConfig(name="text_files", path=str(tmp_path / "one.txt"), val_fraction=0.5))
    whole = b"document one.txt"  # a single document: its tail is val, as when its key falls into train
    assert bytes(one.train.tolist()) + bytes(one.val.tolist()) == whole and len(one.val) == len(whole) // 2


def test_text_files_max_tokens(tmp_path):
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": "x" * 50 + str(i)}) + "\n" for i in range(40)))
    full = load_corpus(DataConfig(name="text_files", path=str(tmp_path), val_fraction=0.2))
    cut = load_corpus(DataConfig(name="text_files", path=str(tmp_path), val_fraction=0.2, max_tokens=300))
    assert len(cut.train) == 300 and len(cut.val) == 60
    assert torch.equal(cut.train, full.train[:300]) and torch.equal(cut.val, full.val[:60])


def test_loading_reports_progress_with_the_counts_so_far(tmp_path):
    texts = ["x" * (20 + 7 * i) for i in range(40)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    # Expected from the documented split rule: after document i, the training tokens of the training
    # documents so far (each + 1 separator), frozen once the budget of 900 is met.
    expected, got = [], 0
    for i, text in enumerate(texts, 1):
        h = hashlib.sha256(f"0:t.jsonl:{i}".encode()).digest()
        if int.from_bytes(h[:8], "big") / 2**64 >= 0.2 and got < 900:
            got += len(text) + 1
        expected.append(got)
    lines = []
    cfg = DataConfig(name="text_files", path=str(tmp_path), val_fraction=0.2, max_tokens=900)
    corpus = load_corpus(cfg, progress=lines.append, every_s=0)  # a line after every document
    assert len(lines) == 40 and len(corpus.train) == 900
    for i, (line, want) in enumerate(zip(lines, expected), 1):
        m = re.fullmatch(r"smet_lab: reading the corpus: ([\d,]+) / 900 training tokens \((\d+) %\), ([\d,]+) "
                         r"documents, [\d.]+ M tokens/s(, ETA \d+ s)?", line)
        assert m, line
        count = int(m.group(1).replace(",", ""))
        assert (count, int(m.group(2)), int(m.group(3).replace(",", ""))) == (want, min(100, 100 * want // 900), i)
        assert (m.group(4) is None) == (count == 0 or count >= 900)  # an ETA once there is a rate, until done
    quiet = []
    load_corpus(cfg, progress=quiet.append)  # a load quicker than the interval says nothing
    assert quiet == []


def test_a_streamed_corpus_stops_at_the_document_that_fills_its_budget(tmp_path):
    """Documents are tokenized in batches (smet_lab.data.corpus.CHUNK), yet a streamed corpus reads,
    fingerprints and keeps exactly the documents one-by-one reading would: computed here by hand."""
    texts = [f"document {i} " + "z" * (i % 53) for i in range(1500)]
    shard = tmp_path / "c4-train.00000-of-00001.jsonl"
    shard.write_text("".join(json.dumps({"text": t, "url": f"https://x/{i}"}) + "\n" for i, t in enumerate(texts)))
    budget, vf = 20_000, 0.2
    want = {"train": budget, "val": int(budget * vf)}
    kept, count, read = {"train": [], "val": []}, {"train": 0, "val": 0}, []
    for i, text in enumerate(texts):
        key = f"https://x/{i}"  # C4's records are keyed by their URL
        h = hashlib.sha256(f"0:{key}".encode()).digest()
        split = "val" if int.from_bytes(h[:8], "big") / 2**64 < vf else "train"
        read.append((key, text))
        if count[split] < want[split]:
            kept[split].append(text)
            count[split] += len(text) + 1
        if all(count[s] >= want[s] for s in want):
            break
    assert 256 < len(read) < 1500 and len(read) % 256  # stops inside a later batch, before the end
    corpus = load_corpus(DataConfig(name="c4", path=str(shard), tokenizer="byte", max_tokens=budget, val_fraction=vf))
    assert corpus.n_documents == len(read) and corpus.sha256 == fingerprint(read)
    assert text_of(corpus.train) == "\n".join(kept["train"])[:budget]
    assert text_of(corpus.val) == "\n".join(kept["val"])[:want["val"]]


# --- the on-disk cache (data.cache_dir) ----------------------------------------------------------


def same_corpus(a: Corpus, b: Corpus) -> bool:
    return (torch.equal(a.train, b.train) and torch.equal(a.val, b.val) and a.train.dtype == b.train.dtype
            and (a.sha256, a.vocab_size, a.n_documents, a.name, a.tokenizer)
            == (b.sha256, b.vocab_size, b.n_documents, b.name, b.tokenizer))


@pytest.mark.parametrize("tokenizer", ["byte", "hf"])
def test_a_cached_corpus_is_the_corpus_read_from_disk(tmp_path, hf_tok_dir, tokenizer):
    write_tree(tmp_path / "d")
    spec = "byte" if tokenizer == "byte" else f"hf:{hf_tok_dir}"
    plain = DataConfig(name="text_files", path=str(tmp_path / "d"), val_fraction=0.4, tokenizer=spec)
    cached = dataclasses.replace(plain, cache_dir=str(tmp_path / "cache"))
    reference, lines = load_corpus(plain), []
    first = load_corpus(cached, progress=lines.append)
    assert same_corpus(first, reference) and len(lines) == 1 and "tokenized corpus kept in" in lines[0]
    lines = []
    again = load_corpus(cached, progress=lines.append)
    assert same_corpus(again, reference) and lines == []
    (folder,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    raw = bytearray((folder / "train.bin").read_bytes())
    raw[:2] = b"\x05\x00"  # the file is what a cached load reads: token 5 at the start
    (folder / "train.bin").write_bytes(bytes(raw))
    assert load_corpus(cached).train[0] == 5 and reference.train[0] != 5
    # What decides the tokens decides the folder: an edited file, another split or budget is tokenized anew.
    (tmp_path / "d" / "a.txt").write_text("an edited document")
    edited = load_corpus(cached)
    assert same_corpus(edited, load_corpus(plain)) and not same_corpus(edited, reference)
    assert same_corpus(load_corpus(dataclasses.replace(cached, val_fraction=0.2)),
                       load_corpus(dataclasses.replace(plain, val_fraction=0.2)))
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 3


# The tokens the assembler makes of write_tree's documents (byte tokenizer, val_fraction 0.4), per cache
# FORMAT: sha256 over "train dtype,val dtype,vocab,len train,len val" then the train and val bytes.
ASSEMBLED = {1: "6e1fa163b3ce4ccf7d2caaa14c0ce32dd20d06358f7a30f96c5c57342fc0c7c3"}


def test_the_cache_format_changes_when_the_assembled_tokens_do(tmp_path):
    """A cache folder is named by the data keys, the tokenizer and the files, plus data.cache.FORMAT for
    the code that turns documents into tokens. Code that assembles other tokens from the same input
    (split rule, separators, dtypes) must bump FORMAT, else caches built before it would be read as its
    output: then this digest changes and FORMAT must be bumped, with the new digest recorded above."""
    from smet_lab.data.cache import FORMAT

    write_tree(tmp_path / "d")
    c = load_corpus(DataConfig(name="text_files", path=str(tmp_path / "d"), val_fraction=0.4, tokenizer="byte"))
    digest = hashlib.sha256(f"{c.train.dtype},{c.val.dtype},{c.vocab_size},{len(c.train)},{len(c.val)}".encode())
    digest.update(c.train.numpy().tobytes())
    digest.update(c.val.numpy().tobytes())
    assert ASSEMBLED.get(FORMAT) == digest.hexdigest(), (
        f"the assembled tokens changed: bump smet_lab.data.cache.FORMAT to {max(ASSEMBLED) + 1} and record "
        f"{max(ASSEMBLED) + 1}: {digest.hexdigest()!r} in ASSEMBLED" if FORMAT in ASSEMBLED else
        f"record {FORMAT}: {digest.hexdigest()!r} in ASSEMBLED")


def test_auto_is_the_corpora_folder_of_smet_labs_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SMET_LAB_CACHE", str(tmp_path / "mine"))  # as the C kernel's cache (smet_lab.optim.cbuild)
    corpus = load_corpus(DataConfig(name="synthetic", max_tokens=3000, cache_dir="auto"))
    (meta,) = (tmp_path / "mine" / "corpora").glob("synthetic-*/meta.json")
    assert json.loads(meta.read_text())["train_tokens"] == len(corpus.train) == 3000


def test_a_process_waits_for_the_one_writing_the_cache(tmp_path):
    import fcntl
    import threading
    import time

    from smet_lab.data.cache import cache_key
    from smet_lab.data.corpus import check_data, data_files

    write_tree(tmp_path / "d")
    cfg = DataConfig(name="text_files", path=str(tmp_path / "d"), cache_dir=str(tmp_path / "cache"))
    folder = f"text_files-{cache_key(cfg, check_data(cfg), data_files(cfg))}"
    (tmp_path / "cache").mkdir()
    lines, out = [], {}
    with open(tmp_path / "cache" / f"{folder}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process is writing this corpus
        waiter = threading.Thread(target=lambda: out.update(corpus=load_corpus(cfg, progress=lines.append)))
        waiter.start()
        deadline = time.time() + 30
        while not lines and time.time() < deadline:
            time.sleep(0.05)
        assert lines and "waiting for another process" in lines[0] and waiter.is_alive()
    # The writer stopped without writing (released, as the OS does for a process that died): the waiter builds it.
    waiter.join(30)
    assert same_corpus(out["corpus"], load_corpus(dataclasses.replace(cfg, cache_dir=None)))
    assert (tmp_path / "cache" / folder / "meta.json").is_file() and "tokenized corpus kept in" in lines[-1]


# --- bad inputs ---------------------------------------------------------------------------------


def test_bad_inputs(tmp_path):
    def fails(key, match=None, **kw):
        with pytest.raises(ConfigError, match=match or key) as e:
            load_corpus(DataConfig(**kw))
        assert e.value.key == key and "\n" not in str(e.value)
        return str(e.value)

    fails("data.path", name="text_files", path=None)
    fails("data.path", "no such file or folder$", name="text_files", path=str(tmp_path / "missing"))
    fails("data.path", "no file matches", name="text_files", path=str(tmp_path / "*.txt"))
    (tmp_path / "shard.parquet").write_bytes(b"PAR1\0\0binary")  # named alone, but not text
    assert "not plain text" in fails("data.path", name="text_files", path=str(tmp_path / "shard.parquet"))
    (tmp_path / "notes.gz").write_bytes(gzip.compress(b"compressed text"))
    assert "not plain text" in fails("data.path", name="text_files", path=str(tmp_path / "notes.gz"))
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    assert fails("data.path", name="text_files", path=str(tmp_path / "bad.json")).endswith(
        f"no such file or folder; did you mean {tmp_path / 'bad.jsonl'}?")
    msg = fails("data.path", name="text_files", path=str(tmp_path / "bad.jsonl"))
    assert "bad.jsonl:2" in msg and '"text"' in msg
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n\n{not json\n')
    assert "bad.jsonl:3" in fails("data.path", "bad JSON", name="text_files", path=str(tmp_path / "bad.jsonl"))
    assert "c4" in fails("data.name", name="nope")
    fails("data.tokenizer", tokenizer="wordpiece", name="synthetic")
    fails("data.max_tokens", name="c4")
    fails("data.max_tokens", max_tokens=-1)
    fails("data.val_fraction", val_fraction=0.0)
    fails("data.val_fraction", val_fraction=0.6)
    (tmp_path / "a_file").write_text("")
    assert "a_file is a file" in fails("data.cache_dir", cache_dir=str(tmp_path / "a_file" / "cache"))
    assert not (tmp_path / "a_file").is_dir()
    assert set(CORPORA) == {"pysource", "synthetic", "text_files", "c4"}


# --- c4 through `datasets` streaming, on a local shard ----------------------------------------


def test_c4_local_shard_with_hf_tokenizer(tmp_path, hf_tok_dir):
    from tokenizers import Tokenizer

    ref = Tokenizer.from_file(str(hf_tok_dir / "tokenizer.json"))
    words = "the cat sat on mat a dog ate bone cats and dogs one two three four".split()
    docs = [" ".join(words[(i * 7 + j) % len(words)] for j in range(3 + i % 5)) + f" {i}" for i in range(30)]
    shard = tmp_path / "c4-train.00000-of-00001.jsonl.gz"
    with gzip.open(shard, "wt") as f:
        f.writelines(json.dumps({"text": t, "url": f"https://x/{i}", "timestamp": "2019"}) + "\n"
                     for i, t in enumerate(docs))
    cfg = DataConfig(name="c4", path=str(shard), tokenizer=f"hf:{hf_tok_dir}", max_tokens=100_000, val_fraction=0.3)
    corpus = load_corpus(cfg)
    eos = ref.token_to_id("</s>")
    assert corpus.vocab_size == ref.get_vocab_size() and corpus.train.dtype == torch.uint8

    def doc_ids(stream):
        out, cur = [], []
        for t in stream.tolist():
            if t == eos:
                out.append(tuple(cur))
                cur = []
            else:
                cur.append(t)
        return out + [tuple(cur)]

    ids = [ref.encode(t, add_special_tokens=False).ids for t in docs]
    assert len(set(map(tuple, ids))) == len(docs)  # the " {i}" suffix makes documents distinct
    val_ids = set(doc_ids(corpus.val))

    def join(seqs):
        return [t for i, s in enumerate(seqs) for t in ([eos] if i else []) + s]

    assert corpus.train.tolist() == join([s for s in ids if tuple(s) not in val_ids])
    assert corpus.val.tolist() == join([s for s in ids if tuple(s) in val_ids])
    assert 0 < len(val_ids) < len(docs) and corpus.n_documents == len(docs)
    # A small budget stops the stream early; the train stream is a prefix of the full one.
    cut = load_corpus(DataConfig(**{**cfg.__dict__, "max_tokens": 20}))
    assert len(cut.train) == 20 and torch.equal(cut.train, corpus.train[:20]) and len(cut.val) == 6
    assert cut.n_documents < len(docs)


# --- TokenBatcher -------------------------------------------------------------------------------

SEQ = 10
STREAM = torch.arange(2001, dtype=torch.int32)  # 200 windows; token value = position


def starts(x):
    return x[:, 0].tolist()


def test_batches_are_shifted_windows():
    b = TokenBatcher(STREAM, batch_size=7, seq_len=SEQ, seed=0)
    x, y = b.next_batch()
    assert x.shape == y.shape == (7, SEQ) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # stream = positions, so "shifted by one" is +1
    assert all(s % SEQ == 0 for s in starts(x)) and torch.equal(x, x[:, :1] + torch.arange(SEQ))


def test_each_epoch_covers_every_window_once():
    b = TokenBatcher(STREAM, batch_size=7, seq_len=SEQ, seed=0)
    seen = []
    while len(seen) < 400:  # 7 does not divide 200: batches straddle the epoch boundary
        seen += starts(b.next_batch()[0])
    all_starts = list(range(0, 2000, SEQ))
    assert sorted(seen[:200]) == all_starts and sorted(seen[200:400]) == all_starts
    assert seen[:200] != seen[200:400] and seen[:200] != all_starts  # shuffled, anew each epoch
    assert b.state_dict() == {"epoch": 2, "cursor": len(seen) - 400}


def test_resume_from_state_dict_is_exact():
    a = TokenBatcher(STREAM, batch_size=8, seq_len=SEQ, seed=5)
    for _ in range(23):  # 184 windows in: the next batches cross into epoch 1
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(10)]
    b = TokenBatcher(STREAM, batch_size=8, seq_len=SEQ, seed=5)
    b.load_state_dict(dict(state))
    for ex, ey in expected:
        x, y = b.next_batch()
        assert torch.equal(x, ex) and torch.equal(y, ey)
    assert b.state_dict() == a.state_dict()


def test_seeds_and_compact_dtypes():
    first = {s: starts(TokenBatcher(STREAM, 16, SEQ, seed=s).next_batch()[0]) for s in (0, 1)}
    assert first[0] != first[1]
    assert first[0] == starts(TokenBatcher(STREAM, 16, SEQ, seed=0).next_batch()[0])
    x, y = TokenBatcher(torch.tensor([200, 255] * 50, dtype=torch.uint8), 2, 8, 0).next_batch()
    assert x.dtype == torch.int64 and set(x.flatten().tolist()) == {200, 255}
    with pytest.raises(ConfigError, match="train.batch_size"):
        TokenBatcher(STREAM, batch_size=201, seq_len=SEQ, seed=0)


def test_fixed_batches_evenly_spaced_and_short_streams():
    batches = TokenBatcher.fixed_batches(STREAM, batch_size=4, seq_len=SEQ, n_batches=5)
    assert len(batches) == 5 and all(torch.equal(y, x + 1) for x, y in batches)
    assert [s for x, _ in batches for s in starts(x)] == [i * 200 // 20 * SEQ for i in range(20)]
    again = TokenBatcher.fixed_batches(STREAM, batch_size=4, seq_len=SEQ, n_batches=5)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    short = STREAM[:91]  # 9 windows
    assert [starts(x) for x, _ in TokenBatcher.fixed_batches(short, 4, SEQ, 8)] == [[0, 10, 20, 30], [40, 50, 60, 70]]
    tiny = TokenBatcher.fixed_batches(STREAM[:31], 4, SEQ, 8)  # 3 windows < batch size: one smaller batch
    assert len(tiny) == 1 and starts(tiny[0][0]) == [0, 10, 20]
    with pytest.raises(ConfigError, match="model.seq_len"):
        TokenBatcher.fixed_batches(STREAM[:5], 4, SEQ, 8)


def test_heavy_packages_are_imported_lazily():
    import subprocess
    import sys

    code = ("import sys; from smet_lab.config import DataConfig; from smet_lab.data import load_corpus; "
            "load_corpus(DataConfig(name='synthetic', max_tokens=1000)); "
            "print(sorted(m for m in ('datasets', 'tokenizers', 'ray', 'mlflow', 'hydra') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("length,seq_len", [(65, 64), (1000, 64), (129, 64), (10, 3)])
def test_check_streams_allows_exactly_what_the_batcher_takes(length, seq_len):
    """check_streams (the CLI's check on a loaded corpus) refuses a batch exactly where TokenBatcher would:
    more rows than the stream has seq_len+1 windows (counted here with unfold), or a stream shorter than one."""
    tokens = torch.arange(length)
    n = tokens.unfold(0, seq_len + 1, seq_len).shape[0]
    check_streams(tokens, tokens[: seq_len + 1], seq_len, n)
    TokenBatcher(tokens, n, seq_len, seed=0)
    with pytest.raises(ConfigError, match=f"train.batch_size={n + 1} is not allowed: between 1 and {n} "):
        check_streams(tokens, tokens, seq_len, n + 1)
    with pytest.raises(ConfigError, match=f"train.batch_size={n + 1} is not allowed"):
        TokenBatcher(tokens, n + 1, seq_len, seed=0)
    with pytest.raises(ConfigError, match=f"the validation stream has {seq_len} tokens"):
        check_streams(tokens, tokens[:seq_len], seq_len, 1)
