"""One run on 1 process vs 2 data-parallel processes (torchrun, gloo): tokens/s and the bytes each
process all-reduces per optimizer step, dense vs smet, through the command line a user types.

    python benchmarks/data_parallel.py [--models tiny llama_20m] [--methods dense smet] [--steps 60]
        [--json benchmarks/results/data_parallel.json] [--md benchmarks/results/data_parallel.md]

Each case is `python -m smet_lab` (1 process, train.threads = all cores) or `torchrun --standalone
--nproc_per_node=2 -m smet_lab` (2 processes, 1 thread each: torchrun's default), same global batch,
tracked to a throw-away SQLite MLflow store that the numbers are read back from (summary/tokens_per_s,
counting all processes' tokens; summary/comm_bytes_per_step). The pysource corpus with the byte
tokenizer (vocab 256), so that the embeddings do not dominate the dense gradients.
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


def run_smet_lab(args: list[str], procs: int, work: Path, name: str) -> tuple[dict, float]:
    """`python -m smet_lab ARGS` on `procs` processes (torchrun when > 1), tracked to a throw-away SQLite
    store: (the run's summary metrics + its last train loss, wall seconds)."""
    db = work / f"{name}.db"
    args = [*args, f"hydra.run.dir={work / name}", f"tracking.uri=sqlite:///{db}"]
    if procs == 1:
        cmd = [sys.executable, "-m", "smet_lab", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
               "-m", "smet_lab", *args]
    tic = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=work)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    (run,) = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    metrics = dict(run.data.metrics)
    metrics["last_train_loss"] = client.get_metric_history(run.info.run_id, "train/loss")[-1].value
    return metrics, time.perf_counter() - tic


def run_case(model: str, method: str, procs: int, steps: int, work: Path) -> dict:
    args = [f"model={model}", f"method={method}", f"train.max_steps={steps}", "train.eval_every=0"]
    if procs == 1:
        args.append(f"train.threads={os.cpu_count()}")
    m, wall = run_smet_lab(args, procs, work, f"{model}-{method}-{procs}")
    return {"model": model, "method": method, "processes": procs, "steps": steps,
            "tokens_per_s": m["summary/tokens_per_s"], "comm_bytes_per_step": m["summary/comm_bytes_per_step"],
            "final_train_loss": m["last_train_loss"], "wall_s": wall}


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# One run on 1 vs 2 processes ({meta['machine']}, {meta['date']})", "",
             f"`{meta['command']}`", "",
             "| model | method | processes | tokens/s | x 1 process | all-reduced MB / step | x dense | last train loss |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        one = next(o for o in rows if o["model"] == r["model"] and o["method"] == r["method"] and o["processes"] == 1)
        dense = next((o for o in rows if o["model"] == r["model"] and o["method"] == "dense"
                      and o["processes"] == r["processes"]), None)
        comm = f"{r['comm_bytes_per_step'] / 1e6:.2f}" if r["processes"] > 1 else "-"
        ratio = (f"{r['comm_bytes_per_step'] / dense['comm_bytes_per_step']:.3f}"
                 if dense and r["processes"] > 1 and dense["comm_bytes_per_step"] else "-")
        lines.append(f"| {r['model']} | {r['method']} | {r['processes']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tokens_per_s'] / one['tokens_per_s']:.2f} | {comm} | {ratio} | {r['final_train_loss']:.4f} |")
    return "\n".join(lines) + "\n"


def write_results(text: str, meta: dict, rows: list[dict], json_path: Path | None, md_path: Path | None) -> None:
    """Print the Markdown table; write it and the raw rows where asked."""
    print(text)
    if json_path:
        json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if md_path:
        md_path.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny", "llama_20m"])
    ap.add_argument("--methods", nargs="+", default=["dense", "smet"])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in a.models:
            for method in a.methods:
                for procs in (1, 2):
                    rows.append(run_case(model, method, procs, a.steps, Path(tmp)))
                    print(json.dumps(rows[-1]), flush=True)
    meta = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "date": time.strftime("%Y-%m-%d"), "command": "python benchmarks/data_parallel.py " + " ".join(sys.argv[1:])}
    write_results(markdown(rows, meta), meta, rows, a.json, a.md)


if __name__ == "__main__":
    main()
