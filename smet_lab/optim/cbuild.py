"""adam_rows.c as a loaded shared library: built with the machine's C compiler once, then kept.

A build takes ~3 s (2-core VM; one loop per combination of options, each vectorised), and every CPU
process with a compact sparse state loads the kernel (each run, Ray trial and torchrun rank), so the
library is kept in a cache directory under a name that hashes what it was built from: the source, the
compiler (its resolved path, size and mtime) and the CPU (the model and feature flags: -march=native code
must never reach a CPU without those features, e.g. a home directory shared over NFS by different
nodes). A change of any of them builds a new library. Where the cache cannot be written the library is
built in a temporary directory and loaded from there. The directory: smet_lab.config.cache_root().
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from smet_lab.config import cache_root

C_SOURCE = Path(__file__).with_name("adam_rows.c")
C_FLAGS = (["-march=native", "-fopenmp"], ["-fopenmp"], ["-fopenmp-simd"], [])  # tried in order
BASE_FLAGS = ["-O3", "-fno-math-errno", "-ffp-contract=off", "-fPIC", "-shared"]


def c_compiler() -> str | None:
    return next(filter(None, map(shutil.which, (os.environ.get("CC") or "cc", "gcc", "clang"))), None)


def _cpu() -> bytes:
    try:
        with open("/proc/cpuinfo", "rb") as f:
            head = f.read().split(b"\n\n")[0]  # the first core's model and flags
        keys = (b"model name", b"flags", b"Features", b"CPU implementer", b"CPU part")  # x86, then ARM
        return b"\n".join(line for line in head.splitlines() if line.startswith(keys))
    except OSError:
        return f"{platform.machine()} {platform.processor()}".encode()


def library_name(cc: str) -> str:
    """The cached library's file name for this source, compiler and CPU."""
    real = os.path.realpath(cc)
    stat = os.stat(real)
    parts = [C_SOURCE.read_bytes(), real.encode(), f"{stat.st_size}:{stat.st_mtime_ns}".encode(),
             repr((C_FLAGS, BASE_FLAGS)).encode(), _cpu()]
    key = hashlib.sha256(b"\0".join(parts))
    return f"adam_rows-{key.hexdigest()[:20]}.so"


def _compile(cc: str, out: str) -> None:
    for flags in C_FLAGS:
        run = subprocess.run([cc, *BASE_FLAGS, *flags, "-o", out, str(C_SOURCE)], capture_output=True, text=True)
        if run.returncode == 0:
            return
    raise RuntimeError(f"{cc} failed: {run.stderr.strip() or run.returncode}")


def load_library() -> ctypes.CDLL:
    """The kernel's library: the cached build if there is one, else compiled now (and cached where the
    cache directory is writable). RuntimeError: no compiler, or it failed; OSError: it does not load."""
    cc = c_compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc, clang or $CC)")
    cached = cache_root() / library_name(cc)
    if cached.is_file():
        try:
            return ctypes.CDLL(str(cached))
        except OSError:  # unreadable or damaged: built again below
            pass
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cached.parent)
        os.close(fd)
    except OSError:  # no writable cache: a private build, gone when the process has loaded it
        with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
            _compile(cc, os.path.join(tmp, "adam_rows.so"))
            return ctypes.CDLL(os.path.join(tmp, "adam_rows.so"))
    try:
        _compile(cc, tmp)
        os.replace(tmp, cached)  # atomic: a process building at the same time loads either complete file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return ctypes.CDLL(str(cached))
