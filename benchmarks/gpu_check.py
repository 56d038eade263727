"""GPU check: train=gpu on llama_60m / llama_130m for dense, smet (dense weights) and smet with compact
weights, on 1 GPU and on all local GPUs (torchrun), through the command line a user types.

    python benchmarks/gpu_check.py [--models llama_60m llama_130m] [--steps 60] [--batch 32]
        [--json benchmarks/results/gpu_check.json] [--md benchmarks/results/gpu_check.md]

Prints per case: tokens/s (all processes), its ratio to dense on the same number of GPUs,
torch.cuda.max_memory_allocated of the first process (summary/peak_cuda_bytes), the all-reduced bytes
per step, the kernel the sparse step ran (optim.kernel=auto compiles on CUDA) and the last train loss.
The embedded pysource corpus (byte tokenizer), so that no download is needed. Exits with a message
when no CUDA device is visible.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from data_parallel import run_smet_lab, write_results

CASES = {"dense": ["method=dense"], "smet": ["method=smet"],
         "smet, compact weights": ["method=smet", "sparsity.weights=compact"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["llama_60m", "llama_130m"])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=32, help="global batch (train.batch_size)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device visible; run it on a GPU machine")
    gpus = torch.cuda.device_count()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in a.models:
            for procs in sorted({1, gpus}):
                for case, extra in CASES.items():
                    args = ["train=gpu", f"model={model}", f"train.max_steps={a.steps}", f"train.batch_size={a.batch}",
                            "train.grad_accum=1", "train.eval_every=0", "train.checkpoint_every=0", *extra]
                    name = f"{model}-{case.replace(', ', '-').replace(' ', '_')}-{procs}"
                    m, wall = run_smet_lab(args, procs, Path(tmp), name)
                    rows.append({"model": model, "case": case, "gpus": procs, "tokens_per_s": m["summary/tokens_per_s"],
                                 "peak_cuda_bytes": m.get("summary/peak_cuda_bytes"),
                                 "comm_bytes_per_step": m["summary/comm_bytes_per_step"],
                                 "kernel": "compiled" if m.get("summary/optimizer_kernel_compiled") else "eager",
                                 "last_train_loss": m["last_train_loss"], "wall_s": wall})
                    print(json.dumps(rows[-1]), flush=True)
    meta = {"gpu": torch.cuda.get_device_name(0), "gpus": gpus, "torch": torch.__version__,
            "host": platform.node(), "date": time.strftime("%Y-%m-%d")}
    lines = [f"# GPU check: {gpus} x {meta['gpu']} (torch {meta['torch']}, {meta['date']})", "",
             "| model | case | GPUs | tokens/s | x dense | peak CUDA GiB | all-reduced MB / step | kernel | last loss |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dense = next(o for o in rows if o["model"] == r["model"] and o["gpus"] == r["gpus"] and o["case"] == "dense")
        peak = f"{r['peak_cuda_bytes'] / 2**30:.2f}" if r["peak_cuda_bytes"] else "-"
        lines.append(f"| {r['model']} | {r['case']} | {r['gpus']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tokens_per_s'] / dense['tokens_per_s']:.3f} | {peak} | {r['comm_bytes_per_step'] / 1e6:.2f} | "
                     f"{r['kernel']} | {r['last_train_loss']:.4f} |")
    write_results("\n".join(lines) + "\n", meta, rows, a.json, a.md)


if __name__ == "__main__":
    main()
