"""Local files as documents: plain text (one document per file) and JSON lines (one per line, its
"text" field: C4's shard format, gzipped or not), from a file, a folder (recursive) or a glob."""

from __future__ import annotations

import glob
import gzip
import json
import os
from typing import Iterator

from smet_lab.config import ConfigError, no_such_path

TEXT_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".json", ".json.gz")
JSON_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")


def resolve_files(path, suffixes: tuple[str, ...], any_named_file: bool = False) -> list[tuple[str, str]]:
    """A file, directory (recursive) or glob -> sorted [(key relative to its root, file path)]. Folders and
    globs yield the files with `suffixes`; with any_named_file a file named alone is read as plain
    text whatever its name (notes.md, a .py), unless it is binary."""
    wanted = f"give a {', '.join(suffixes)} file, directory or glob" + (" (or any plain-text file by name)"
                                                                          if any_named_file else "")
    if not path:
        raise ConfigError("data.path", path, f"required for this corpus; {wanted}")
    path = os.path.expanduser(str(path))
    if os.path.isdir(path):
        root = path
        files = [os.path.join(d, f) for d, _, names in os.walk(path) for f in names]
    elif os.path.isfile(path):
        root, files = os.path.dirname(path) or ".", [path]
        if any_named_file and not path.endswith(suffixes):
            with open(path, "rb") as f:
                head = f.read(8192)
            if b"\0" in head or head.startswith(b"\x1f\x8b"):  # as git and grep tell binary from text
                raise ConfigError("data.path", path, f"not plain text (a binary or compressed file); {wanted}")
            return [(os.path.basename(path), path)]
    else:
        fixed = []  # the glob's leading non-wildcard directories are the root for keys
        for part in path.split(os.sep):
            if glob.has_magic(part):
                break
            fixed.append(part)
        root = os.sep.join(fixed) or (os.sep if path.startswith(os.sep) else ".")
        files = [f for f in glob.glob(path, recursive=True) if os.path.isfile(f)]
    files = [f for f in files if f.endswith(suffixes)]
    if not files:
        missing = None if glob.has_magic(path) else no_such_path(path)  # "no such file or folder; did you mean X?"
        raise ConfigError("data.path", path, f"{wanted}; {missing}" if missing else f"no file matches; {wanted}")
    return sorted((os.path.relpath(f, root).replace(os.sep, "/"), f) for f in files)


def jsonl_docs(key: str, path: str) -> Iterator[tuple[str, str]]:
    opener = gzip.open if path.endswith(".gz") else open
    lineno = 0
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError("data.path", f"{path}:{lineno}", f"bad JSON ({e.msg})") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise ConfigError("data.path", f"{path}:{lineno}", 'each line must be a JSON object with a "text" string')
                yield f"{key}:{lineno}", rec["text"]
    except OSError as e:  # unreadable file or corrupt gzip
        raise ConfigError("data.path", f"{path}:{lineno}", f"cannot read ({e})") from None


def file_docs(files: list[tuple[str, str]]) -> Iterator[tuple[str, str]]:
    for key, path in files:
        if not path.endswith(JSON_SUFFIXES):
            with open(path, encoding="utf-8", errors="replace") as f:
                yield key, f.read()
        else:
            yield from jsonl_docs(key, path)
