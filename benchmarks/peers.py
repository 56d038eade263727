"""smet_lab's methods side by side with two mask-based DST libraries: sparsimony 0.1.0 (SET) and
rigl-torch 0.5.2 (RigL), each on torch.optim.Adam(fused=True), on smet_lab's LLaMA.

    # once, into the project's venv. Not dependencies of smet_lab (`import smet_lab` never imports
    # them); --no-deps because sparsimony 0.1.0 declares numpy==1.*, which conflicts with the pinned
    # numpy==2.4.6 (so a `bench` extra cannot resolve), and rigl-torch needs torchvision only for an
    # isinstance check (stubbed, see peer_adapters.ADAPTATIONS):
    pip install -c constraints.txt --no-deps sparsimony==0.1.0 rigl-torch==0.5.2

    python benchmarks/peers.py [--models tiny llama_20m] [--vocab 256] [--batch 8] [--density 0.25]
        [--threads 1] [--repeats 15] [--warmup 2] [--updates 3] [--mem-steps 3] [--contenders ...]
        [--json benchmarks/results/peers.json]
    python benchmarks/peers.py --check     # peers: density after an update, loss over 30 steps, regrown state
    python benchmarks/peers.py --models tiny --repeats 3 --updates 1     # smoke run

Methodology as benchmarks/speed.py: every contender (common.METHODS, then the peers) is built from the
same seed on the same model, and each repeat runs one training step (forward + backward + clip 1.0 +
optimizer step + zero_grad, and the peer's per-step mask work) of every contender in turn on the same
batch, the order reversed every other repeat. As in training, every contender makes a topology update
(timed alone) before repeat 0 and every 100 repeats, so the steps are measured with regrown weights
(smet: cohorts and a running warm-up, as in a default run, where update_every = W = 100). Reported:
median tokens/s and step ms, median optimizer-step ms (what it contains: OPT_STEP), the median
(min-max) over repeats of the paired ratio of tokens/s to dense Adam, the topology update at step
100(u+1) (median over the loop's updates, then more up to --updates; smet_lab:
common.topology_update), and tokens/s with one update per 100 steps. Sparse layers: the attention
and MLP projections, exactly those smet_lab makes sparse (SparseTopology.build's rule), density 0.25,
prune fraction 0.3 (magnitude), regrowth random (SET, smet_lab) or by gradient (RigL).
Memory: every contender in a fresh subprocess (--memory-child): --mem-steps training steps with a
topology update after the first; gradients (at their largest), optimizer state and masks counted from
the tensors (smet_lab methods: benchmarks/memory.py's measure_one), and the peak RSS (VmHWM, see peak_rss).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from common import METHODS, batch, describe_machine, train_step
from peer_adapters import ADAPTATIONS, CLIP, EVERY, INSTALL, LABELS, NOTES, OPT_STEP, PEERS, import_peer, make


def tensor_bytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


# ------------------------------------------------------------------------------------------ speed
def measure(model_name: str, args) -> dict:
    cs = [make(n, model_name, args.vocab, args.density, kernel=args.kernel) for n in args.contenders]
    seq = cs[0].setup.model.cfg.seq_len
    tokens = args.batch * seq
    for w in range(args.warmup):
        x, y = batch(w, args.batch, seq, args.vocab, "cpu")
        for c in cs:
            train_step(c.setup, x, y, CLIP)
    step_t, opt_t, ratios = ({c.name: [] for c in cs} for _ in range(3))
    updates = {c.name: [] for c in cs}

    def update_all(u: int) -> None:  # the u-th topology update of every contender (step 100(u+1)), timed alone
        x, y = batch(10_000 + u, args.batch, seq, args.vocab, "cpu")
        for c in cs:
            updates[c.name].append(c.update(EVERY * (u + 1), x, y))

    for r in range(args.repeats):
        if r % EVERY == 0:  # as in training: the steps follow topology updates (smet: regrown weights warming)
            update_all(r // EVERY)
        x, y = batch(args.warmup + r, args.batch, seq, args.vocab, "cpu")
        per = {}
        for c in (cs if r % 2 == 0 else cs[::-1]):  # alternate the order: no contender always first
            dt, dopt = train_step(c.setup, x, y, CLIP)
            step_t[c.name].append(dt)
            opt_t[c.name].append(dopt)
            per[c.name] = dt
        for c in cs:
            if "dense" in per:
                ratios[c.name].append(per["dense"] / per[c.name])  # tokens/s ratio = inverse time ratio
    done = len(updates[cs[0].name])
    for u in range(done, max(done, args.updates)):
        update_all(u)
    out = {"model": model_name, "seq_len": seq, "vocab": args.vocab, "batch": args.batch, "density": args.density,
           "params": sum(p.numel() for p in cs[0].setup.model.parameters()), "contenders": {}}
    for c in cs:
        step, upd = statistics.median(step_t[c.name]), statistics.median(updates[c.name])
        rs = ratios[c.name] or [float("nan")]
        out["contenders"][c.name] = {
            "tokens_per_s": tokens / step, "step_ms": 1e3 * step, "opt_step_ms": 1e3 * statistics.median(opt_t[c.name]),
            "ratio_vs_dense": statistics.median(rs), "ratio_min": min(rs), "ratio_max": max(rs),
            "update_ms": 1e3 * upd, "tokens_per_s_with_updates": tokens / (step + upd / EVERY),
            "density_after_updates": c.density(), "opt_step_contains": OPT_STEP.get(c.name, "optimizer step + zero_grad"),
            "kernel": getattr(c.setup.opt, "kernel", None)}
    return out


# ----------------------------------------------------------------------------------------- memory
def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """VmHWM, the peak RSS of this process's memory since exec. Not ru_maxrss: Linux carries the parent's peak
    into a child started by vfork + exec (as subprocess does), and the parent here holds every model."""
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))


def memory_child(name: str, model_name: str, args) -> dict:
    """In a fresh process: --mem-steps training steps, a topology update (step 100) after the first."""
    import memory  # benchmarks/memory.py: the smet_lab methods' accounting, as published there
    from smet_lab.train.memory import torch_adam_state_bytes  # (measure_one imports it too)

    for peer in PEERS:  # every child imports the same modules, so that the RSS baselines match
        import_peer(peer)
    if name in METHODS:
        r = memory.measure_one({"model": model_name, "method": name, "density": 1.0 if name == "dense" else args.density,
                                "block_size": 1, "vocab": args.vocab, "batch": args.batch, "seq_len": None,
                                "steps": args.mem_steps, "device": "cpu", "threads": args.threads})
        return {"weights": r["weights"], "grads": r["grads"], "state": r["state"], "masks": 0, "update_buffer_bytes": 0,
                "peak_bytes": peak_rss(), "rss_after_import": r["rss_after_import"]}
    rss0 = rss_now()
    c = make(name, model_name, args.vocab, args.density, kernel=args.kernel)
    model, opt = c.setup.model, c.setup.opt
    grads, buffers = 0, 0
    for step in range(1, args.mem_steps + 1):
        x, y = batch(step, args.batch, model.cfg.seq_len, args.vocab, "cpu")
        model(x, y).backward()
        grads = max(grads, tensor_bytes(p.grad for p in model.parameters() if p.grad is not None))
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == 1:
            c.update(EVERY, x, y)
            buffers = c.buffers()
    state = torch_adam_state_bytes(model, opt)["state"]  # every tensor in opt.state
    return {"weights": tensor_bytes(model.parameters()), "grads": grads, "state": state, "masks": tensor_bytes(c.masks()),
            "update_buffer_bytes": buffers, "peak_bytes": peak_rss(),
            "rss_after_import": rss0}


def measure_memory(model_name: str, args) -> dict:
    out = {}
    for name in args.contenders:
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", name, model_name, "--vocab", str(args.vocab),
               "--batch", str(args.batch), "--density", str(args.density), "--threads", str(args.threads),
               "--mem-steps", str(args.mem_steps), "--kernel", args.kernel]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"memory child {name} {model_name} failed (exit status {proc.returncode}):\n{proc.stderr}")
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


# ------------------------------------------------------------------------------------------ check
def check(args) -> list[dict]:
    """Per peer on `tiny`, one fixed batch, 30 steps with topology updates before steps 10 and 20. Per update:
    the mask density, how many entries became active, and how many of those start with a nonzero weight
    or a nonzero Adam exp_avg_sq (stale state: possible from the second update on)."""
    rows = []
    for name in [n for n in args.contenders if n in PEERS]:
        c = make(name, "tiny", args.vocab, args.density)
        model, opt = c.setup.model, c.setup.opt
        x, y = batch(0, args.batch, model.cfg.seq_len, args.vocab, "cpu")
        losses, row, ok = [], {"contender": name}, True
        for i in range(30):
            if i in (10, 20):
                before = [m.clone() for m, _, _ in c.layers()]
                c.update(EVERY * i // 10, x, y)
                after = c.layers()
                grown = [m & ~b for (m, _, _), b in zip(after, before)]
                u = {"mask_density": c.density(), "regrown": sum(int(g.sum()) for g in grown),
                     "regrown_nonzero_weight": sum(int((w[g] != 0).sum()) for (_, w, _), g in zip(after, grown)),
                     "regrown_nonzero_exp_avg_sq": sum(int((opt.state[p]["exp_avg_sq"][g] != 0).sum())
                                                       for (_, _, p), g in zip(after, grown))}
                row[f"update_before_step_{i}"] = u
                ok &= u["regrown"] > 0 and abs(u["mask_density"] - args.density) < 1e-3
            loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        with torch.no_grad():
            ls = c.layers()
            nnz = sum(int((w != 0).sum()) for _, w, _ in ls) / sum(w.numel() for _, w, _ in ls)
        row.update(losses={i: round(losses[i], 4) for i in (0, 9, 10, 19, 20, 29)}, nonzero_density_at_end=nnz,
                   ok=bool(ok and losses[-1] < losses[0] and abs(nnz - args.density) < 1e-3))
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------- main
def label(name: str) -> str:
    return LABELS.get(name, name)


def report(results: list[dict], header: str) -> str:
    lines = [header, "", "| model | seq | vocab | contender | tokens/s | step ms | opt step ms | x dense (min-max) "
             "| update ms | tokens/s incl. updates every 100 | density after updates |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for n, r in res["contenders"].items():
            name = label(n) + (f" ({r['kernel']})" if r.get("kernel") else "")
            lines.append(f"| {res['model']} | {res['seq_len']} | {res['vocab']} | {name} | {r['tokens_per_s']:,.0f} | "
                         f"{r['step_ms']:.1f} | {r['opt_step_ms']:.2f} | {r['ratio_vs_dense']:.3f} ({r['ratio_min']:.2f}-"
                         f"{r['ratio_max']:.2f}) | {r['update_ms']:.1f} | {r['tokens_per_s_with_updates']:,.0f} | "
                         f"{r['density_after_updates']:.4f} |")
    if any("memory" in res for res in results):
        mib = lambda b: f"{b / 2**20:,.2f}"
        lines += ["", "| model | contender | weights MiB | grads MiB | opt state MiB | masks MiB | grads+state+masks x dense "
                  "Adam | peak RSS MiB | RSS growth after imports MiB |", "|---|---|---|---|---|---|---|---|---|"]
        for res in results:
            mem = res.get("memory", {})
            ref = mem.get("dense")
            for n, m in mem.items():
                total = m["grads"] + m["state"] + m["masks"]
                x = f"{total / (ref['grads'] + ref['state']):.3f}" if ref else "-"
                masks = mib(m["masks"]) if n in PEERS else "(in state)"
                lines.append(f"| {res['model']} | {label(n)} | {mib(m['weights'])} | {mib(m['grads'])} | {mib(m['state'])} | "
                             f"{masks} | {x} | {m['peak_bytes'] / 2**20:,.0f} | {(m['peak_bytes'] - m['rss_after_import']) / 2**20:,.0f} |")
    lines += ["", "Optimizer-step time contains:"] + [f"- {label(n)}: {OPT_STEP.get(n, 'optimizer step + zero_grad')}"
                                                     for n in (results[0]["contenders"] if results else [])]
    lines += ["", f"Peers installed with: `{INSTALL}`", "", "Adaptations (all in benchmarks/peer_adapters.py):"]
    lines += [f"- {a}" for a in ADAPTATIONS] + ["", "Notes (from the peers' code):"] + [f"- {n}" for n in NOTES]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["tiny", "llama_20m"])
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--density", type=float, default=0.25)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--updates", type=int, default=3, help="topology updates timed, at least (the loop makes one per 100 repeats)")
    ap.add_argument("--mem-steps", type=int, default=3)
    ap.add_argument("--contenders", nargs="+", default=list(METHODS) + list(PEERS))
    ap.add_argument("--kernel", default="auto", choices=["auto", "eager", "compiled"], help="smet_lab's optim.kernel")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--check", action="store_true", help="sanity checks of the peers, then exit")
    ap.add_argument("--json", default=None)
    ap.add_argument("--memory-child", nargs=2, metavar=("CONTENDER", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(*args.memory_child, args)))
        return
    if args.check:
        rows = check(args)
        for r in rows:
            print(json.dumps(r))
        sys.exit(0 if all(r["ok"] for r in rows) else 1)
    machine = describe_machine()
    command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    header = (f"# {time.strftime('%Y-%m-%d')} torch {torch.__version__} on {machine}; threads {torch.get_num_threads()}; "
              f"batch {args.batch}, density {args.density}, {args.repeats} repeats, {args.warmup} warm-up steps, "
              f"{args.updates} updates, memory after {args.mem_steps} steps\n`{command}`")
    results = []
    for name in args.models:
        res = measure(name, args)
        if not args.no_memory:
            res["memory"] = measure_memory(name, args)
        results.append(res)
    print(report(results, header), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "command": command, "torch": torch.__version__,
                       "machine": machine, "threads": torch.get_num_threads(), "args": vars(args), "install": INSTALL,
                       "adaptations": ADAPTATIONS, "notes": NOTES, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
