"""Memory of dense Adam vs naive DST (dense-masked state) vs SMET (compact state) with dense weights
vs SMET with compact weights, per model preset, density and block size: (a) exact bytes of weights,
gradients and optimizer state counted from the tensors, (b) peak process memory, (c) the analytic
minimum for float32 states.

    python benchmarks/memory.py [--models tiny llama_20m llama_60m llama_130m]
        [--densities 0.1 0.25 0.5 1.0] [--block-sizes 1 16 128] [--vocab 32000] [--batch 1]
        [--seq-len 256] [--steps 3] [--threads 1] [--json benchmarks/results/memory.json] [--resume]
        [--plot benchmarks/results/state_memory.png] [--peak-plot benchmarks/results/peak_memory.png]
        [--allocator default|release] [--activation-checkpointing]

Every configuration runs in a fresh subprocess (so that peak memories do not mix): build the model
and optimizer, train `--steps` steps on random tokens (a topology update after step 1 for the sparse
methods, so the measured state includes a regrown cohort), then report:

- bytes counted from the tensors: weights; gradients at their largest (dense Adam: every .grad after
  backward; SMETAdam: dense-parameter grads + the sparse-gradient buffer, the dense weight gradient
  of a sparse layer lives only during its own backward); optimizer state (moments, step counters,
  cohort ids, masks, ages, and the topology's position store);
- peak RSS of the subprocess (CPU; ru_maxrss) and its growth over the RSS right after imports, or
  torch.cuda.max_memory_allocated on GPU;
- the analytic minimum: 12 B (float32 grad, m, v) per trainable active weight + the index the
  method needs at least in the compact layout (1 B offset per active block + 2 B per 256 blocks, and
  1 B cohort id per active block + 8 B per cohort when it needs a local step).

Ratios are to dense Adam (12 B per parameter for gradient + moments) and to the analytic minimum.
"persistent x dense Adam" counts the weights too (16 B per parameter). "peak saving % of persistent"
is (dense Adam's peak RSS - the method's) / (dense Adam's persistent bytes - the method's): how much of
the saving in live tensors survives at the peak. --allocator release measures every method as the
trainer runs with train.release_memory=true (glibc returns freed blocks >= 128 KiB to the OS at once);
--allocator default (the default, and the trainer's default) leaves glibc's adaptive threshold.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_one(cfg: dict) -> dict:
    """One configuration, in this process. cfg: model, method, density, block_size, vocab, batch, seq_len, steps."""
    import torch

    sys.path.insert(0, HERE)
    from common import batch, build, topology_update

    from smet_lab.model import count_parameters
    from smet_lab.optim import SMETAdam
    from smet_lab.train.memory import DENSE_ADAM_BYTES_PER_PARAM, analytic_state_bytes, torch_adam_state_bytes

    device = cfg.get("device", "cpu")
    if cfg.get("allocator", "default") == "release":
        from smet_lab.train.memory import release_freed_memory

        release_freed_memory()
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    rss0 = rss_now()
    s = build(cfg["method"], cfg["model"], cfg["vocab"], cfg["density"], cfg["block_size"], cfg["seq_len"], device)
    model, opt = s.model, s.opt
    model.checkpoint_blocks = cfg.get("checkpointing", False)  # train.activation_checkpointing
    seq = model.cfg.seq_len
    grad_peak = 0
    for step in range(1, cfg["steps"] + 1):
        x, y = batch(step, cfg["batch"], seq, cfg["vocab"], device)
        model(x, y).backward()
        if isinstance(opt, SMETAdam):
            roles = opt.state_bytes_by_role()
            grad_peak = max(grad_peak, roles["dense/grad"] + roles["sparse/grad"])
            opt.clip_grad_norm_(1.0)
        else:
            grad_peak = max(grad_peak, torch_adam_state_bytes(model, opt)["grad"])
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == 1 and s.updater is not None:
            topology_update(s, 100)
    n_params = count_parameters(model.cfg)  # of the dense model (compact weights store fewer)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    topo = s.topology
    sparse_numel = topo.numel if topo is not None else 0
    if isinstance(opt, SMETAdam):
        roles = opt.state_bytes_by_role()
        state = sum(b for r, b in roles.items() if not r.endswith("/grad"))
        sparse_state = opt.state_bytes("sparse")  # grad + moments + index of the sparse layers
        cohorts = opt.births.numel() if opt.births is not None else 0
    else:
        state = torch_adam_state_bytes(model, opt)["state"]
        sparse_state, cohorts = None, 0
    needs_step = cfg["method"] in ("smet", "smet_compact")
    dense_numel = n_params - sparse_numel
    analytic = DENSE_ADAM_BYTES_PER_PARAM * dense_numel
    if sparse_numel:
        analytic += analytic_state_bytes(topo, "compact", needs_step, cohorts)
    out = {**cfg, "params": n_params, "sparse_params": sparse_numel, "weights": weights, "grads": grad_peak,
           "state": state, "sparse_state": sparse_state, "cohorts": cohorts, "analytic_min": analytic,
           "dense_adam": DENSE_ADAM_BYTES_PER_PARAM * n_params,
           "sparse_dense_adam": DENSE_ADAM_BYTES_PER_PARAM * sparse_numel,
           "sparse_released": analytic_state_bytes(topo, "released", needs_step) if sparse_numel else None,
           "sparse_floor": DENSE_ADAM_BYTES_PER_PARAM * topo.n_active_weights if sparse_numel else None,
           "rss_after_import": rss0,
           "persistent": weights + grad_peak + state,
           "dense_adam_persistent": (DENSE_ADAM_BYTES_PER_PARAM + 4) * n_params}
    if device == "cuda":
        out["peak_bytes"] = torch.cuda.max_memory_allocated()
    else:
        out["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def configs(args) -> list[dict]:
    out = []
    for model in args.models:
        vocab = args.tiny_vocab if model == "tiny" else args.vocab
        base = {"model": model, "vocab": vocab, "batch": args.batch, "seq_len": args.seq_len, "steps": args.steps,
                "device": args.device, "threads": args.threads, "allocator": args.allocator,
                "checkpointing": args.activation_checkpointing}
        out.append({**base, "method": "dense", "density": 1.0, "block_size": 1})
        for d in args.densities:
            for method in args.methods:
                for b in (args.block_sizes if d < 1.0 else [1]):
                    out.append({**base, "method": method, "density": d, "block_size": b})
    return out


# What identifies one measurement (a re-run skips the configurations already measured).
CFG_KEYS = ("allocator", "batch", "block_size", "checkpointing", "density", "device", "method", "model", "seq_len",
            "steps", "vocab")
KEY_DEFAULTS = {"allocator": "default", "checkpointing": False}  # what results without the key were measured with
LABELS = {"dense": "dense Adam", "naive_dst": "naive_dst (dense_masked)", "smet": "smet (compact state)",
          "smet_compact": "smet (compact state + weights)"}


def cfg_key(c: dict) -> str:
    return json.dumps({k: c.get(k, KEY_DEFAULTS.get(k)) for k in CFG_KEYS})


def mib(x) -> str:
    return "-" if x is None else f"{x / 2**20:,.1f}"


def table(results: list[dict]) -> str:
    lines = ["| model | batch | params | B | density | method | weights MiB | grads MiB | opt state MiB | grad+state x dense Adam "
             "| sparse layers x dense Adam | x analytic min | persistent x dense Adam | peak RSS MiB (+ over dense Adam) "
             "| peak saving % of persistent |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    setting = lambda r: (r["model"], r["batch"], r.get("allocator"), r.get("checkpointing", False))
    dense = {setting(r): r for r in results if r["method"] == "dense"}
    persistent = lambda r: r.get("persistent", r["weights"] + r["grads"] + r["state"])  # older results lack it
    for r in results:
        gs = r["grads"] + r["state"]
        d = dense.get(setting(r))
        sparse = f"{r['sparse_state'] / r['sparse_dense_adam']:.3f}" if r.get("sparse_state") is not None and r["sparse_dense_adam"] else "-"
        peak, kept = f"{r['peak_bytes'] / 2**20:,.0f}", "-"
        if d is not None and r is not d:
            peak += f" ({(r['peak_bytes'] - d['peak_bytes']) / 2**20:+,.0f})"
            saved = persistent(d) - persistent(r)
            kept = f"{100 * (d['peak_bytes'] - r['peak_bytes']) / saved:.0f} %" if saved > 0 else "-"
        lines.append(f"| {r['model']} | {r['batch']} | {r['params'] / 1e6:.1f}M | {r['block_size'] if r['density'] < 1 else '-'} | "
                     f"{r['density']} | {LABELS[r['method']]} | {mib(r['weights'])} | {mib(r['grads'])} | {mib(r['state'])} | "
                     f"{gs / r['dense_adam']:.3f} | {sparse} | {gs / r['analytic_min']:.3f} | "
                     f"{persistent(r) / r.get('dense_adam_persistent', 16 * r['params']):.3f} | {peak} | {kept} |")
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sparse = [r for r in results if r.get("sparse_state") is not None and r["sparse_dense_adam"]]
    model = max(sparse, key=lambda r: r["params"])["model"]
    rows = [r for r in sparse if r["model"] == model]
    fig, ax = plt.subplots(figsize=(9.6, 4.6))
    ds = sorted({r["density"] for r in rows} | {1.0})
    ax.plot(ds, [1.0] * len(ds), "k-", label="dense Adam (12 B per weight)")
    styles = {1: "-", 16: "--", 128: ":"}
    for method, color in (("naive_dst", "tab:red"), ("smet", "tab:blue")):
        for b, ls in styles.items():
            pts = sorted((r["density"], r["sparse_state"] / r["sparse_dense_adam"]) for r in rows
                         if r["method"] == method and r["block_size"] == b)
            if pts:
                name = "naive_dst, dense_masked" if method == "naive_dst" else "smet, compact"
                ax.plot(*zip(*pts), ls, color=color, marker="o", ms=3, label=f"{name}, B={b}")
    ax.plot(ds, ds, "g-", lw=1, label="analytic: 12 B per active weight")
    ax.plot(ds, [d * 18 / 12 for d in ds], color="gray", ls="-.", lw=1,
            label="released SMET layout: 18 B per active weight (B=1)")
    ax.scatter([0.25], [0.30], marker="x", color="k", zorder=5, label="goal at d=0.25: 0.30")
    ax.set_xlabel("density of the sparse layers")
    ax.set_ylabel("grad + Adam state of the sparse layers / dense Adam")
    ax.set_title(f"{model}: gradient + optimizer-state memory of the sparse layers")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, max(1.25, max(r["sparse_state"] / r["sparse_dense_adam"] for r in rows) * 1.05))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def peak_plot(results: list[dict], path: str) -> None:
    """Peak RSS vs density, one line per method (B = 1), one panel per (model, batch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["model"], r["batch"], r.get("allocator", "default")) for r in results if r["method"] == "dense"})
    ncols = min(2, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.2 * ncols, 4.4 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    colors = {"naive_dst": "tab:red", "smet": "tab:blue", "smet_compact": "tab:green"}
    for ax, (model, batch, allocator) in zip(axes.flat, panels):
        rows = [r for r in results if (r["model"], r["batch"], r.get("allocator", "default")) == (model, batch, allocator)]
        dense = next(r for r in rows if r["method"] == "dense")
        ax.axhline(dense["peak_bytes"] / 2**20, color="k", label="dense Adam")
        for method, color in colors.items():
            pts = sorted((r["density"], r["peak_bytes"] / 2**20) for r in rows
                         if r["method"] == method and r["block_size"] == 1 and r["density"] < 1)
            if pts:
                ax.plot(*zip(*pts), "o-", color=color, label=LABELS[method])
        ax.set_title(f"{model}, batch {batch}, B = 1\n{'train.release_memory=true' if allocator == 'release' else 'default allocator'}",
                     fontsize=10)
        ax.set_xlabel("density of the sparse layers")
        ax.set_ylabel("peak RSS of the process, MiB")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["tiny", "llama_20m", "llama_60m", "llama_130m"])
    ap.add_argument("--densities", nargs="+", type=float, default=[0.1, 0.25, 0.5, 1.0])
    ap.add_argument("--block-sizes", nargs="+", type=int, default=[1, 16, 128])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tiny-vocab", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=None, help="default: the preset's")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a JSON config: run it here, print JSON
    ap.add_argument("--from-json", nargs="+", default=None, help="only print the table/plots of earlier --json files")
    ap.add_argument("--resume", action="store_true", help="keep the configurations already in --json")
    ap.add_argument("--methods", nargs="+", default=["naive_dst", "smet", "smet_compact"])
    ap.add_argument("--allocator", choices=["default", "release"], default="default")
    ap.add_argument("--peak-plot", default=None)
    ap.add_argument("--activation-checkpointing", action="store_true", help="as train.activation_checkpointing=true")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure_one(json.loads(args.one))))
        return
    if args.from_json:
        results = [r for path in args.from_json for r in json.load(open(path))["results"]]
    else:
        results = []
        if args.resume and args.json and os.path.exists(args.json):
            results = json.load(open(args.json))["results"]  # configurations measured already are kept
        print(f"# {time.strftime('%Y-%m-%d')} {platform.machine()}, {os.cpu_count()} CPUs, device {args.device}; "
              f"batch {args.batch}, seq {args.seq_len or 'preset'}, {args.steps} steps per configuration", flush=True)
        done = {cfg_key(r) for r in results}
        for cfg in configs(args):
            if cfg_key(cfg) in done:
                continue
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", json.dumps(cfg)],
                                  capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"configuration {cfg} failed (exit status {proc.returncode}):\n{proc.stderr}")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = results[-1]
            print(f"  {r['model']} {r['method']} d={r['density']} B={r['block_size']}: grads+state "
                  f"{mib(r['grads'] + r['state'])} MiB, peak {mib(r['peak_bytes'])} MiB", flush=True)
            if args.json:  # after every configuration: an interrupted run can --resume
                with open(args.json, "w") as f:
                    json.dump({"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "args": vars(args),
                               "results": results}, f, indent=1)
    key = cfg_key
    order = {key(c): i for i, c in enumerate(
        [c for path in args.from_json for c in configs(argparse.Namespace(**{
            "methods": ["naive_dst", "smet"], "allocator": "default", "activation_checkpointing": False,
            **json.load(open(path))["args"]}))]
        if args.from_json else configs(args))}
    results.sort(key=lambda r: order.get(key(r), len(order)))  # configuration order, resumed ones included
    print(table(results))
    if args.plot:
        plot(results, args.plot)
    if args.peak_plot:
        peak_plot(results, args.peak_plot)


if __name__ == "__main__":
    main()
