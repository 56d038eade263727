"""Optimizer-step time vs density: dense fused Adam against SMET's step in both weight layouts and both
kernels (optim.kernel eager / compiled), one process, interleaved.

    python benchmarks/step_density.py [--models tiny llama_20m llama_60m] [--densities 0.1 0.25 0.5]
        [--threads 1] [--repeats 21] [--json benchmarks/results/step_density_threads1.json]
        [--plot benchmarks/results/step_density.png]
    python benchmarks/step_density.py --plot-only results/step_density_threads1.json results/step_density_threads2.json \
        --plot results/step_density.png

Each contender runs one real forward + backward (random tokens) so that its gradients exist where its
optimizer keeps them, then `--repeats` rounds time one optimizer step of every contender in turn
(order reversed every other round; the gradients are reused, no zero_grad). Before them each sparse
contender makes one topology update, as in training: the state has two cohorts and a running warm-up
(without regrown weights the per-cohort lookups cost next to nothing and the step looks faster). The
step of dense Adam covers every parameter; SMET's covers the dense group (AdamW) and the sparse
layers' compact state (with dense weights, each repeated step decodes the layers' block ids for its
descent; in training the gradient gather in backward has decoded them already). Reported: the
median step in ms and its ratio to dense Adam's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from common import batch, build, describe_machine, topology_update

CONTENDERS = {  # name: (method in common.build, optim.kernel)
    "dense Adam (fused)": ("dense", None),
    "smet, dense weights, eager": ("smet", "eager"),
    "smet, dense weights, compiled": ("smet", "compiled"),
    "smet, compact weights, eager": ("smet_compact", "eager"),
    "smet, compact weights, compiled": ("smet_compact", "compiled"),
}


def measure(model_name: str, density: float, args) -> dict:
    setups = {}
    for name, (method, kernel) in CONTENDERS.items():
        if method == "dense" and density != args.densities[0]:
            continue  # density-independent: measured once per model
        s = build(method, model_name, args.vocab, density, 1, None, kernel=kernel or "auto")
        x, y = batch(0, args.batch, s.model.cfg.seq_len, args.vocab, "cpu")
        s.model(x, y).backward()
        topology_update(s, 100)  # as in training: regrown weights, two cohorts, a running warm-up
        for _ in range(3):  # warm-up (compiles the fused kernel)
            s.opt.step()
        setups[name] = s
    times = {name: [] for name in setups}
    names = list(setups)
    for r in range(args.repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            setups[name].opt.step()
            times[name].append(time.perf_counter() - t0)
    return {name: {"step_ms": 1e3 * statistics.median(ts), "kernel": getattr(setups[name].opt, "kernel", None)}
            for name, ts in times.items()}


def plot(runs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for run in runs for r in run["results"]))
    fig, axes = plt.subplots(len(runs), len(models), figsize=(4.2 * len(models), 3.4 * len(runs)), squeeze=False)
    for row, run in enumerate(runs):
        for col, model in enumerate(models):
            ax = axes[row][col]
            rows = [r for r in run["results"] if r["model"] == model]
            dense = next(r["step_ms"]["dense Adam (fused)"]["step_ms"] for r in rows if "dense Adam (fused)" in r["step_ms"])
            ax.axhline(dense, color="black", ls="--", label="dense Adam (fused)")
            for name in list(CONTENDERS)[1:]:
                ds = [r["density"] for r in rows]
                ax.plot(ds, [r["step_ms"][name]["step_ms"] for r in rows], marker="o", label=name.replace("smet, ", ""))
            ax.set_title(f"{model}, {run['threads']} thread{'s' if run['threads'] > 1 else ''}")
            ax.set_xlabel("density")
            ax.set_ylabel("optimizer step ms")
            ax.set_ylim(bottom=0)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"SMET optimizer step vs dense fused Adam ({runs[0]['date']}, {runs[0]['machine']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["tiny", "llama_20m", "llama_60m"])
    ap.add_argument("--densities", nargs="+", type=float, default=[0.1, 0.25, 0.5])
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--plot-only", nargs="+", default=None, metavar="JSON")
    args = ap.parse_args()
    if args.plot_only:
        plot([json.load(open(p)) for p in args.plot_only], args.plot)
        return
    torch.set_num_threads(args.threads)
    machine = describe_machine()
    print(f"# {time.strftime('%Y-%m-%d')} torch {torch.__version__}, {machine}, {args.threads} thread(s), vocab {args.vocab}")
    print("| model | density | " + " | ".join(CONTENDERS) + " |")
    print("|---|---|" + "---|" * len(CONTENDERS))
    results, dense = [], {}
    for model in args.models:
        for d in args.densities:
            res = measure(model, d, args)
            dense.setdefault(model, res.get("dense Adam (fused)"))
            res.setdefault("dense Adam (fused)", dense[model])
            results.append({"model": model, "density": d, "step_ms": res})
            ref = dense[model]["step_ms"]
            cells = [f"{res[n]['step_ms']:.2f}" + ("" if n.startswith("dense") else f" ({res[n]['step_ms'] / ref:.2f}x)")
                     for n in CONTENDERS]
            print(f"| {model} | {d} | " + " | ".join(cells) + " |", flush=True)
    out = {"date": time.strftime("%Y-%m-%d"), "machine": machine, "threads": args.threads, "args": vars(args),
           "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    if args.plot:
        plot([out], args.plot)


if __name__ == "__main__":
    main()
