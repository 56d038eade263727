"""Exact gradient + optimizer-state bytes (counted from the tensors) for model presets and densities.

    python benchmarks/state_memory.py [--models tiny llama_20m llama_60m llama_130m] [--vocab 32000]

Builds each model, its topology and the optimizer (no training step is needed: every state tensor is
allocated up front), and prints state bytes and ratios to dense Adam (12 bytes per parameter), for the
whole model and for the sparse layers alone, next to the analytic minimum of the compact layout.
"""

from __future__ import annotations

import argparse

from smet_lab.model import LLaMA, model_preset
from smet_lab.optim import SMETAdam
from smet_lab.sparse import SparseTopology
from smet_lab.train.memory import DENSE_ADAM_BYTES_PER_PARAM, compact_layout_minimum

VARIANTS = {  # label: (state layout, needs a local step/age)
    "naive_dst dense_masked": ("dense_masked", False),
    "naive_dst compact": ("compact", False),
    "smet compact": ("compact", True),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["tiny", "llama_20m", "llama_60m", "llama_130m"])
    ap.add_argument("--densities", nargs="+", type=float, default=[0.1, 0.25, 0.5])
    ap.add_argument("--block-sizes", nargs="+", type=int, default=[1])
    ap.add_argument("--vocab", type=int, default=32000)
    args = ap.parse_args()
    print("| model | params | density | B | variant | state MiB | ratio (model) | ratio (sparse layers) | / analytic min |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        vocab = 256 if name == "tiny" else args.vocab
        model = LLaMA(model_preset(name, vocab_size=vocab))
        n = sum(p.numel() for p in model.parameters())
        for block in args.block_sizes:
            for d in args.densities:
                topo = SparseTopology.build(model, d, block_size=block)
                for label, (layout, age) in VARIANTS.items():
                    opt = SMETAdam(model, topo, lr=1e-3, reset_step=age, warmup_steps=100 if age else 0, state=layout)
                    total, sparse = opt.state_bytes(), opt.state_bytes("sparse")
                    minimum = compact_layout_minimum(opt) if layout == "compact" else float("nan")
                    print(f"| {name} | {n / 1e6:.1f}M | {d} | {block} | {label} | {total / 2**20:.1f} | "
                          f"{total / (DENSE_ADAM_BYTES_PER_PARAM * n):.3f} | "
                          f"{sparse / (DENSE_ADAM_BYTES_PER_PARAM * topo.numel):.3f} | {sparse / minimum:.3f} |", flush=True)
                    opt.remove_hooks()
                    del opt
        print(f"| {name} | {n / 1e6:.1f}M | 1.0 | - | dense Adam | {DENSE_ADAM_BYTES_PER_PARAM * n / 2**20:.1f} | 1.000 | 1.000 | - |")


if __name__ == "__main__":
    main()
