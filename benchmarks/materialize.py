"""What compact weights cost per layer: the dense weight materialised (decode the positions, scatter
the values into zeros) in forward and again in backward, and the weight gradient gathered into the
compact gradient, against the layer's three matmuls (forward, input gradient, weight gradient).

    python benchmarks/materialize.py [--models llama_20m llama_130m] [--density 0.25] [--batch 8]
        [--threads 1] [--repeats 50] [--kernels]

One thread by default; each figure is the median of --repeats timings (microseconds). --kernels adds
the forward matmul with torch.sparse kernels instead of the materialised dense weight: CSR, and BSR
with the topology's 1 x B blocks (MKL refuses non-square blocks on CPU: reported as such).
"""

from __future__ import annotations

import argparse
import time

import torch

from common import median_time
from smet_lab.model import model_preset
from smet_lab.sparse.layer import SparseLayer


def timed(fn, repeats: int) -> float:  # microseconds
    return 1e6 * median_time(fn, repeats)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["llama_20m", "llama_130m"])
    ap.add_argument("--density", type=float, default=0.25)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--kernels", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {time.strftime('%Y-%m-%d')}, {args.threads} thread(s), density {args.density}, batch {args.batch}, B = 1, "
          f"median of {args.repeats} (microseconds)")
    print("| model | layer (out x in) | tokens | materialise | gather grad | 2 x materialise + gather | 3 matmuls | overhead |")
    print("|---|---|---|---|---|---|---|---|")
    kernels = []
    for name in args.models:
        cfg = model_preset(name)
        tokens = args.batch * cfg.seq_len
        for out_f, in_f in ((cfg.dim, cfg.dim), (cfg.ffn_dim, cfg.dim), (cfg.dim, cfg.ffn_dim)):
            w = torch.nn.Parameter(torch.randn(out_f, in_f) * 0.02)
            n = w.numel()
            ids = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:round(args.density * n)]
            layer = SparseLayer("w", w, 1, ids)
            layer.apply_mask()
            layer.make_compact()
            x, g = torch.randn(tokens, in_f), torch.randn(tokens, out_f)
            dense_w, grad_w = layer.materialize(), g.t() @ x
            mat = timed(layer.materialize, args.repeats)
            gat = timed(lambda: layer.gather(grad_w), args.repeats)
            mm = (timed(lambda: x @ dense_w.t(), args.repeats) + timed(lambda: g @ dense_w, args.repeats)
                  + timed(lambda: g.t() @ x, args.repeats))
            extra = 2 * mat + gat
            print(f"| {name} | {out_f} x {in_f} | {tokens} | {mat:,.0f} | {gat:,.0f} | {extra:,.0f} | {mm:,.0f} | "
                  f"{100 * extra / mm:.1f} % |", flush=True)
            if args.kernels:
                kernels.append((name, out_f, in_f, x, dense_w))
    if args.kernels:
        print("\n| model | layer | forward matmul: dense weight | CSR weight | BSR weight, 1 x 16 blocks |\n|---|---|---|---|---|")
        for name, out_f, in_f, x, dense_w in kernels:
            csr = dense_w.to_sparse_csr()
            try:
                bsr = dense_w.to_sparse_bsr((1, 16))
                bsr_us = f"{timed(lambda: bsr @ x.t(), args.repeats):,.0f}"
            except RuntimeError as exc:  # MKL: "doesn't support matrices with non-square blocks"
                bsr_us = "refused by MKL (non-square blocks)" if "non-square" in str(exc) else f"error: {exc}"
            dense_us = timed(lambda: x @ dense_w.t(), args.repeats)
            print(f"| {name} | {out_f} x {in_f} | {dense_us:,.0f} | {timed(lambda: csr @ x.t(), args.repeats):,.0f} | "
                  f"{bsr_us} |", flush=True)


if __name__ == "__main__":
    main()
