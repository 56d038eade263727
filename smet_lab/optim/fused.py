"""optim.kernel: the compact state's Adam step as ONE fused pass (torch.compile) instead of ~10 kernels.

The eager step (SMETAdam._sparse_step) makes a memory-bound pass per torch op: lerp, mul, addcmul, the
per-cohort coefficient gathers, two divisions, sqrt, add, the warm-up and the descent. `adam_rows`
below is the same arithmetic written as one function; torch.compile (Inductor: C++ on CPU, Triton on
CUDA) fuses it into a single loop that reads g, m, v, the 1-byte cohort id and the weight once and
writes m, v and the weight once. The cohort table lookup happens in registers.

Not bit-identical to the eager step: the compiler evaluates lerp and addcmul without eager's fused
multiply-adds (measured: updates differ by <= ~3e-5 relative, m and v by one float32 ulp), so the kernel
is a choice (`optim.kernel`), logged with the run:

    eager     the reference ops (bit for bit the step every earlier version computed)
    compiled  the fused kernel; falls back to eager with one warning where torch.compile cannot build
              (no C++ compiler on CPU, no Triton on CUDA)
    auto      compiled when the sparse state holds >= AUTO_MIN_ENTRIES (2^19) entries and a compiler is
              present (the one-off compile, ~20 s on a 2-core CPU and cached on disk, then pays for
              itself), eager otherwise: the CPU-sized default run stays eager and bit-exact
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import warnings

import torch

KERNELS = ("eager", "compiled", "auto")
AUTO_MIN_ENTRIES = 1 << 19


def adam_rows(g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, theta: torch.Tensor | None,
              cohort: torch.Tensor | None, table: torch.Tensor, lr: torch.Tensor, b1: float, b2: float,
              eps: float, weight_decay: float, damping: bool, descend: bool) -> torch.Tensor | None:
    """Adam on the rows [n, B] of g, m, v, in place. table [3, C]: per cohort 1 - b1^t, 1 - b2^t and
    the warm-up factor; without cohorts (cohort None) its column 0 holds every row's. theta: the rows'
    weights (or None without weight decay and descend). descend: theta -= lr * update here (compact
    weights) and return None; else return the update for the caller to apply (dense weights)."""
    m.lerp_(g, 1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    if cohort is None:
        bc1, bc2, warm = table[0, 0], table[1, 0], table[2, 0]
    else:  # three 1-D lookups by an int32 id compile to ~2x faster loops than one [C, 3] row lookup
        c = cohort.int()
        bc1, bc2, warm = table[0][c].unsqueeze(1), table[1][c].unsqueeze(1), table[2][c].unsqueeze(1)
    if damping:
        m.mul_(warm)
    upd = (m / bc1) / ((v / bc2).sqrt() + eps)
    if weight_decay:
        upd = upd + weight_decay * theta
    if not damping:
        upd = upd * warm  # x * 1.0 == x: rows that are not warming are unchanged
    if descend:
        theta.sub_(upd * lr)
        return None
    return upd


def compiler_present(device: torch.device) -> bool:
    """Whether torch.compile can build kernels here: a C++ compiler on CPU, Triton on CUDA."""
    if device.type == "cuda":
        return importlib.util.find_spec("triton") is not None
    return any(shutil.which(c) for c in (os.environ.get("CXX") or "g++", "clang++", "c++"))


def resolve_kernel(kind: str, n_entries: int, device: torch.device) -> str:
    """The kernel a run uses: `kind` (optim.kernel) with auto decided by the state's size and compiler."""
    if kind == "auto":
        return "compiled" if n_entries >= AUTO_MIN_ENTRIES and compiler_present(device) else "eager"
    return kind


class FusedStep:
    """The compiled adam_rows, with the eager fallback the first time compilation fails."""

    _compiled = None  # one torch.compile wrapper per process: every optimizer shares its cache

    def __init__(self):
        if FusedStep._compiled is None:
            FusedStep._compiled = torch.compile(adam_rows, dynamic=True, fullgraph=True)
        self.fn = FusedStep._compiled
        self.failed: str | None = None

    def __call__(self, *args) -> tuple[bool, torch.Tensor | None]:
        """(True, adam_rows' result), or (False, None) once compilation has failed: then the caller
        runs the eager step (nothing was modified)."""
        if self.failed is None:
            try:
                return True, self.fn(*args)
            except Exception as e:  # noqa: BLE001 - any build failure: the eager step computes the same
                self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                warnings.warn(f"optim.kernel=compiled: torch.compile failed ({self.failed}); "
                              "the optimizer runs the eager step", RuntimeWarning, stacklevel=2)
        return False, None
