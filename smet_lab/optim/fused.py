"""optim.kernel: the compact state's Adam step as ONE pass over the active entries instead of ~10 ops.

The eager step (SMETAdam._sparse_step) makes a memory-bound pass per torch op: lerp, mul, addcmul, the
per-cohort coefficient gathers, two divisions, sqrt, add, the warm-up and the descent. The fused step
reads g, m, v, the 1-byte cohort id and the weight once and writes m, v and the weight once:

    CPU   adam_rows.c, built with the machine's C compiler (-O3 -march=native -fopenmp, ~3 s, then kept
          in a cache: smet_lab.optim.cbuild) and called through ctypes. The compiler turns the three
          per-cohort lookups into vector gathers; torch.compile's C++ (the previous CPU kernel) made
          them scalar loops, 3.5 x slower with two cohorts. With dense weights the layout also
          decodes its rows and gathers each layer's gradient with the file's two index helpers (exact
          data movement, in one pass each).
    CUDA  `adam_rows` below through torch.compile (Triton).

Not bit-identical to the eager step. The C kernel rounds as eager's torch ops do (its fused
multiply-adds written out where theirs are, the file built with -ffp-contract=off: m and v bit for bit)
except for the sqrt, which is IEEE's correctly rounded one and torch's CPU sqrt is not always (one float32
ulp off in ~0.7 % of values on an AVX-512 CPU, ~20 % on an AVX2 one): a step's weights differ from eager's
there and only there. torch.compile evaluates lerp and addcmul without eager's fused multiply-adds. So
the kernel is a choice (`optim.kernel`), logged with the run:

    eager     the reference arithmetic, bit for bit the step every earlier version computed: on a CPU
              with a C compiler the kernel's exact form (FusedStep.exact: the kernel in two passes around
              torch's own sqrt: the tiny model's step 1.2-1.5 x faster), else the torch ops
    compiled  the fused kernel; falls back to eager with one warning where it cannot be built (no C
              compiler on CPU, no Triton on CUDA)
    auto      compiled when the sparse state holds >= AUTO_MIN_ENTRIES (2^19) entries and a compiler is
              present, eager otherwise: the CPU-sized default run stays eager and bit-exact
"""

from __future__ import annotations

import ctypes
import importlib.util
import warnings

import torch

from smet_lab.optim.cbuild import c_compiler, load_library
from smet_lab.optim.compact import row_view

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
    """Whether the fused kernel can be built here: a C compiler on CPU, Triton on CUDA."""
    if device.type == "cuda":
        return importlib.util.find_spec("triton") is not None
    return c_compiler() is not None


def resolve_kernel(kind: str, n_entries: int, device: torch.device) -> str:
    """The kernel a run uses: `kind` (optim.kernel) with auto decided by the state's size and compiler."""
    if kind == "auto":
        return "compiled" if n_entries >= AUTO_MIN_ENTRIES and compiler_present(device) else "eager"
    return kind


def _warn(failed: str) -> None:
    warnings.warn(f"optim.kernel=compiled: the fused kernel could not be built ({failed}); "
                  "the optimizer runs the eager step", RuntimeWarning, stacklevel=3)


class FusedStep:
    """The fused step's interface: a call updates m, v and the weights in place and returns True, or
    returns False (nothing modified) once the kernel has failed to build: then the caller runs the eager
    step. theta is the compact values [n, B] (rows None) or the flat dense weights [N, B], the rows' blocks
    at `rows` (int32 [n])."""

    failed: str | None = None

    def takes(self, cohort: torch.Tensor | None, theta: torch.Tensor) -> bool:
        return True

    def exact(self, g, m, v, cohort, table, lr: float, b1: float, b2: float, eps: float, weight_decay: float,
              damping: bool, theta: torch.Tensor, rows: torch.Tensor | None) -> bool:
        """As a call, but bit for bit the eager step's arithmetic; False: the caller runs the eager ops."""
        return False

    def decode_rows(self, offsets: torch.Tensor, counts: torch.Tensor, base: int) -> torch.Tensor | None:
        """int32 sparse.layer.decode(offsets, counts) + base in one pass, or None: the caller decodes."""
        return None

    def gather_rows(self, grad: torch.Tensor, rows: torch.Tensor, shift: int, out: torch.Tensor,
                    fresh: bool) -> bool:
        """out = (fresh) or += grad's blocks at rows - shift (row views as compact.row_view gives them), or
        False: the caller gathers."""
        return False


class NativeStep(FusedStep):
    """adam_rows.c through ctypes (CPU): the step and the dense-weights layout's index helpers."""

    _lib = None  # loaded once per process
    _error: str | None = None

    def __init__(self, warn: bool = True):
        self._q: torch.Tensor | None = None  # the exact form's buffer for v / bc2 and its sqrt
        if NativeStep._lib is None and NativeStep._error is None:
            try:
                NativeStep._lib = self._build()
            except (OSError, RuntimeError) as e:
                NativeStep._error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        self.failed = NativeStep._error
        if self.failed and warn:
            _warn(self.failed)

    @staticmethod
    def _build():
        lib = load_library()
        ptr, f32, i64, i32 = ctypes.c_void_p, ctypes.c_float, ctypes.c_int64, ctypes.c_int
        lib.smet_adam_rows.argtypes = [i64, i64, *[ptr] * 9, *[f32] * 6, i32, ptr, i32, i32]
        lib.smet_decode_rows.argtypes = [i64, ptr, ptr, i64, ptr]
        lib.smet_gather_rows.argtypes = [i64, i64, ptr, ptr, i64, ptr, i32, i32]
        for fn in (lib.smet_adam_rows, lib.smet_decode_rows, lib.smet_gather_rows):
            fn.restype = None
        return lib

    def takes(self, cohort: torch.Tensor | None, theta: torch.Tensor) -> bool:
        """Cohort ids widened past one byte (> 255 live cohorts) and non-float32 weights take the eager step."""
        return (cohort is None or cohort.dtype == torch.uint8) and theta.dtype == torch.float32

    def __call__(self, g, m, v, cohort, table, lr: float, b1: float, b2: float, eps: float, weight_decay: float,
                 damping: bool, theta: torch.Tensor, rows: torch.Tensor | None) -> bool:
        if self.failed:
            return False
        self._call(self._args(g, m, v, cohort, table, lr, b1, b2, eps, weight_decay, damping, theta, rows), None, 0)
        return True

    def exact(self, g, m, v, cohort, table, lr: float, b1: float, b2: float, eps: float, weight_decay: float,
              damping: bool, theta: torch.Tensor, rows: torch.Tensor | None) -> bool:
        # The kernel's phases 1 and 2 around torch's own sqrt of v / bc2 (torch's CPU sqrt is not always
        # correctly rounded, the kernel's is): every other rounding is already the eager ops' own.
        # q lives as long as the optimizer (one float per entry of the largest chunk): a fresh one per
        # step costs its page faults: 1.65 against 1.40 ms for 1M entries (Zen 3; docs/measurements.md).
        if self.failed:
            return False
        if self._q is None or self._q.numel() < g.numel():
            self._q = torch.empty(g.numel())
        q = self._q[:g.numel()].view(g.shape)
        args = self._args(g, m, v, cohort, table, lr, b1, b2, eps, weight_decay, damping, theta, rows)
        self._call(args, q, 1)
        self._call(args, q.sqrt_(), 2)
        return True

    @staticmethod
    def _args(g, m, v, cohort, table, lr, b1, b2, eps, weight_decay, damping, theta, rows) -> tuple:
        """The kernel's arguments but the last three (q, phase, threads), checked and converted once per
        call of the step: the tiny model's step is mostly such Python. Its first item holds the tensors
        whose addresses it passes, so that they live as long as the tuple."""
        for t in (g, m, v, theta, cohort, rows, table):
            if t is not None and not (t.is_contiguous() and t.device.type == "cpu"):
                raise ValueError("the native kernel takes contiguous CPU tensors")
        table, rows = table.float().contiguous(), None if rows is None else rows.to(torch.int32)
        t1 = table.data_ptr()
        t2 = t1 + 4 * table.shape[1]
        return ((table, rows), g.shape[0], g.shape[1], g.data_ptr(), m.data_ptr(), v.data_ptr(),
                None if theta is None else theta.data_ptr(), None if rows is None else rows.data_ptr(),
                None if cohort is None else cohort.data_ptr(), t1, t2, t2 + 4 * table.shape[1], lr, 1 - b1,
                b2, 1 - b2, eps, weight_decay, int(damping))

    @staticmethod
    def _call(args: tuple, q: torch.Tensor | None, phase: int) -> None:
        NativeStep._lib.smet_adam_rows(*args[1:], None if q is None else q.data_ptr(), phase,
                                       torch.get_num_threads())

    def decode_rows(self, offsets: torch.Tensor, counts: torch.Tensor, base: int) -> torch.Tensor | None:
        if self.failed or not (offsets.dtype == torch.uint8 and counts.dtype == torch.int16
                               and offsets.device.type == "cpu" and offsets.is_contiguous() and counts.is_contiguous()):
            return None
        rows = torch.empty(offsets.numel(), dtype=torch.int32)
        NativeStep._lib.smet_decode_rows(counts.numel(), counts.data_ptr(), offsets.data_ptr(), base, rows.data_ptr())
        return rows

    def gather_rows(self, grad: torch.Tensor, rows: torch.Tensor, shift: int, out: torch.Tensor,
                    fresh: bool) -> bool:
        # The shifted copy of the rows that index_select needs costs more than the gather itself (llama_20m,
        # 2 threads: 5.2 -> 3.8 ms of gathers and decode per step; docs/measurements.md).
        if self.failed or not all(t.device.type == "cpu" and t.is_contiguous() for t in (grad, rows, out)) \
                or grad.dtype != torch.float32 or out.dtype != torch.float32 or rows.dtype != torch.int32:
            return False
        B = 1 if out.dim() == 1 else out.shape[1]
        NativeStep._lib.smet_gather_rows(rows.numel(), B, grad.data_ptr(), rows.data_ptr(), shift, out.data_ptr(),
                                         int(not fresh), torch.get_num_threads())
        return True


class CompiledStep(FusedStep):
    """adam_rows through torch.compile (Triton on CUDA); the compile failure shows at the first call."""

    _compiled = None  # one torch.compile wrapper per process: every optimizer shares its cache

    def __init__(self):
        if CompiledStep._compiled is None:
            CompiledStep._compiled = torch.compile(adam_rows, dynamic=True, fullgraph=True)

    def __call__(self, g, m, v, cohort, table, lr: float, b1: float, b2: float, eps: float, weight_decay: float,
                 damping: bool, theta: torch.Tensor, rows: torch.Tensor | None) -> bool:
        if self.failed:
            return False
        lr_t = torch.tensor(lr, dtype=torch.float32, device=g.device)
        try:
            if rows is None:
                CompiledStep._compiled(g, m, v, theta, cohort, table, lr_t, b1, b2, eps, weight_decay, damping, True)
                return True
            flat = row_view(theta)  # the dense weights' rows, gathered and scattered as CompactState does
            rows_theta = flat.index_select(0, rows).view(g.shape) if weight_decay else None
            upd = CompiledStep._compiled(g, m, v, rows_theta, cohort, table, lr_t, b1, b2, eps, weight_decay,
                                         damping, False)
        except Exception as e:  # noqa: BLE001 - any build failure: the eager step computes the same
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            _warn(self.failed)
            return False
        flat.index_add_(0, rows, row_view(upd), alpha=-lr)
        return True


def fused_step(device: torch.device) -> FusedStep:
    """The fused step for `device`: the C kernel on CPU, torch.compile elsewhere."""
    return NativeStep() if device.type == "cpu" else CompiledStep()


def exact_step(device: torch.device) -> FusedStep | None:
    """What runs optim.kernel=eager's arithmetic faster, bit for bit (FusedStep.exact): the C kernel on a
    CPU with a working C compiler (one quiet try per process), else None: the eager torch ops."""
    if device.type != "cpu" or c_compiler() is None:
        return None
    step = NativeStep(warn=False)
    return None if step.failed else step
