"""The C kernel alone (smet_lab/optim/adam_rows.c, as the package builds it): one step over N active entries
in each layout and option, fused (one pass) and exact (two passes around torch's sqrt, bit for bit the
eager ops), against dense fused Adam over N / density weights; and the gradient gather helper against
torch's index_select.

    python benchmarks/kernel.py [--entries 1000000] [--density 0.25] [--threads 1] [--repeats 21]

What it is for: whether the machine's compiler vectorised the kernel (a scalar build runs several times
slower than dense fused Adam per entry; an AVX2 build of an earlier version did, for one select in the
loop), and which layout costs what. Medians of --repeats calls after one warm-up call; random values,
two cohorts, the dense weights' rows ascending as the position store gives them.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import describe_machine, median_time
from smet_lab.optim.fused import NativeStep


def median_ms(fn, repeats: int) -> float:
    return 1e3 * median_time(fn, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--density", type=float, default=0.25)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=21)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    native = NativeStep()
    if native.failed:
        raise SystemExit(f"kernel.py: the C kernel could not be built: {native.failed}")
    n, total = a.entries, int(a.entries / a.density)
    gen = torch.Generator().manual_seed(0)
    g, m, v, values = (torch.rand(n, 1, generator=gen) for _ in range(4))
    dense = torch.rand(total, 1, generator=gen)
    rows = torch.randperm(total, generator=gen)[:n].sort().values.int()
    cohort = torch.randint(0, 2, (n,), dtype=torch.uint8, generator=gen)
    table = torch.tensor([[0.1, 0.2], [0.01, 0.02], [1.0, 0.5]])

    param = torch.nn.Parameter(torch.rand(total))
    param.grad = torch.rand(total)
    adam = torch.optim.Adam([param], lr=1e-3, fused=True)
    dense_ms = median_ms(adam.step, a.repeats)
    print(f"# {time.strftime('%Y-%m-%d')}, {describe_machine()}, torch {torch.__version__}, "
          f"{a.threads} thread(s); {n:,} active entries of {total:,}")
    print("| step | fused (optim.kernel=compiled): ms | x dense | exact (optim.kernel=eager): ms | x dense |")
    print("|---|---|---|---|---|")
    print(f"| dense fused Adam, {total:,} weights | {dense_ms:.2f} | 1.00 | | |")
    for weights in ("compact", "dense"):
        for cohorts in (False, True):
            for wd in (0.0, 0.1):
                theta, at = (values, None) if weights == "compact" else (dense, rows)
                args = (g, m, v, cohort if cohorts else None, table[:, :2 if cohorts else 1].contiguous(), 1e-3, 0.9,
                        0.999, 1e-8, wd, False, theta, at)
                fused, exact = (median_ms(lambda: fn(*args), a.repeats) for fn in (native, native.exact))
                print(f"| {weights} weights, {'two cohorts' if cohorts else 'no cohorts'}, weight decay {wd:g} | "
                      f"{fused:.2f} | {fused / dense_ms:.2f} | {exact:.2f} | {exact / dense_ms:.2f} |")
    grad, out, rows64 = torch.rand(total), torch.empty(n), rows.long()
    c_ms = median_ms(lambda: native.gather_rows(grad, rows, 0, out, True), a.repeats)
    t_ms = median_ms(lambda: torch.index_select(grad, 0, rows64, out=out), a.repeats)
    print(f"\n| gradient gather of {n:,} from {total:,} | ms |\n|---|---|\n| C helper (smet_gather_rows) | {c_ms:.2f} |\n"
          f"| torch.index_select (int64 rows) | {t_ms:.2f} |")


if __name__ == "__main__":
    main()
