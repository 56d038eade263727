"""Training throughput and optimizer-step time: dense Adam vs naive DST (dense-masked state) vs SMET
(compact state) with dense and with compact weights, all four in ONE process, interleaved, so that machine
load hits them alike.

    python benchmarks/speed.py [--models tiny llama_20m] [--batch 8] [--seq-len 256] [--vocab 32000]
                               [--density 0.25] [--block-size 1] [--repeats 15] [--steps 1] [--warmup 2]
                               [--threads N]

Each repeat runs `--steps` training steps (forward + backward + grad clip 1.0 + optimizer step +
zero_grad, random tokens) of every method in turn (order reversed every other repeat); a step's time is taken around all of it, the
optimizer-step time around step + zero_grad only (SMET's gradient gather runs inside backward, in its
hooks, and is counted in the step time). Reported: the median over all timed steps, and the ratio
smet/dense (and naive/dense) of tokens/s as the median of the per-repeat ratios (paired, so that a
busy machine slows both sides of a ratio). A topology update (prune 0.3 + regrow + state reset) is
timed separately (median of --updates) and shown amortised over update_every = 100 steps.
On CUDA when available (or --device), on CPU otherwise.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from common import METHODS, batch, build, topology_update, train_step


def measure(model_name: str, args, device: str) -> dict:
    vocab = args.vocab if model_name != "tiny" or args.tiny_vocab is None else args.tiny_vocab
    setups = [build(m, model_name, vocab, args.density, args.block_size, args.seq_len, device) for m in METHODS]
    seq = setups[0].model.cfg.seq_len
    tokens = args.batch * seq
    for w in range(args.warmup):
        x, y = batch(w, args.batch, seq, vocab, device)
        for s in setups:
            train_step(s, x, y)
    step_t = {m: [] for m in METHODS}
    opt_t = {m: [] for m in METHODS}
    ratios = {m: [] for m in METHODS}
    for r in range(args.repeats):
        per_repeat = {}
        order = METHODS if r % 2 == 0 else METHODS[::-1]  # alternate the order: no method always first
        for s in (next(x for x in setups if x.method == m) for m in order):
            times = []
            for k in range(args.steps):
                x, y = batch(args.warmup + r * args.steps + k, args.batch, seq, vocab, device)
                dt, dopt = train_step(s, x, y)
                times.append(dt)
                opt_t[s.method].append(dopt)
            step_t[s.method] += times
            per_repeat[s.method] = statistics.median(times)
        for m in METHODS:
            ratios[m].append(per_repeat["dense"] / per_repeat[m])  # tokens/s ratio = inverse time ratio
    updates = {m: [] for m in METHODS}
    for u in range(args.updates):
        for s in setups:
            updates[s.method].append(topology_update(s, 100 * (u + 1)))
    n_params = sum(p.numel() for p in setups[0].model.parameters())
    sparse = setups[2].topology.numel if setups[2].topology is not None else 0
    out = {"model": model_name, "params": n_params, "sparse_params": sparse, "vocab": vocab, "batch": args.batch,
           "seq_len": seq, "density": args.density, "block_size": args.block_size, "dense_adam": setups[0].dense_adam,
           "methods": {}}
    for m in METHODS:
        step = statistics.median(step_t[m])
        upd = statistics.median(updates[m])
        out["methods"][m] = {
            "tokens_per_s": tokens / step, "step_ms": 1e3 * step, "opt_step_ms": 1e3 * statistics.median(opt_t[m]),
            "ratio_vs_dense": statistics.median(ratios[m]), "ratio_min": min(ratios[m]), "ratio_max": max(ratios[m]),
            "update_ms": 1e3 * upd, "tokens_per_s_with_updates": tokens / (step + upd / 100)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["tiny", "llama_20m"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=None, help="default: the preset's")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tiny-vocab", type=int, default=256, help="vocab of the tiny model (byte-level)")
    ap.add_argument("--density", type=float, default=0.25)
    ap.add_argument("--block-size", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--updates", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    where = torch.cuda.get_device_name(0) if device == "cuda" else f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
    print(f"# {time.strftime('%Y-%m-%d')} torch {torch.__version__} on {device} ({where}); batch {args.batch}, "
          f"density {args.density}, block size {args.block_size}, {args.repeats} repeats x {args.steps} steps, "
          f"{args.warmup} warm-up steps")
    print("| model | seq | vocab | method | tokens/s | step ms | opt step ms | x dense (min-max) | update ms | tokens/s incl. updates every 100 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for name in args.models:
        res = measure(name, args, device)
        results.append(res)
        for m, r in res["methods"].items():
            label = f"dense Adam ({res['dense_adam']})" if m == "dense" else m
            print(f"| {name} | {res['seq_len']} | {res['vocab']} | {label} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | "
                  f"{r['opt_step_ms']:.1f} | {r['ratio_vs_dense']:.3f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) | "
                  f"{r['update_ms']:.1f} | {r['tokens_per_s_with_updates']:,.0f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "device": device, "where": where, "args": vars(args),
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
