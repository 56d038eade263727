"""Does it fit? Train a model for --steps steps under a resident-memory budget, per method.

    python benchmarks/fits.py --model llama_350m --budget-gib 4 [--density 0.25] [--steps 20]
        [--methods dense smet smet_compact] [--threads 2] [--json results/fits.json]

Each method runs in its own subprocess (build the model, train on random tokens, batch 1, the preset's
sequence length, vocabulary 32000, a topology update after step --steps/2). This process enforces the
budget: it reads the child's resident set (/proc/PID/status VmRSS) every 10 ms and kills the child the
moment it exceeds the budget, so "fits" means every step ran without the process ever holding more
than the budget (a sampled cap, no cgroup needed). Children run as the trainer does with
train.release_memory=true (the setting for fitting a model). Results: steps done, peak RSS (the
child's VmHWM), and whether it fit.
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

HERE = os.path.dirname(os.path.abspath(__file__))


def train_one(cfg: dict) -> None:
    """In the child: build, then train, printing one line per finished step."""
    import torch

    sys.path.insert(0, HERE)
    from common import batch, build, topology_update, train_step

    from smet_lab.train.memory import release_freed_memory

    release_freed_memory()
    torch.set_num_threads(cfg["threads"])
    s = build(cfg["method"], cfg["model"], cfg["vocab"], cfg["density"], 1)
    seq = s.model.cfg.seq_len
    for step in range(1, cfg["steps"] + 1):
        x, y = batch(step, 1, seq, cfg["vocab"], "cpu")
        seconds, _ = train_step(s, x, y)
        if step == cfg["steps"] // 2:
            topology_update(s, 100)
        print(json.dumps({"step": step, "seconds": seconds}), flush=True)


def status_mib(pid: int, key: str) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_capped(cfg: dict, budget_mib: float) -> dict:
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--one", json.dumps(cfg)],
                                stdout=out, stderr=err, text=True)
        peak, killed, started = 0.0, False, time.time()
        while proc.poll() is None:
            rss = status_mib(proc.pid, "VmRSS")
            peak = max(peak, status_mib(proc.pid, "VmHWM") or 0.0)
            if rss is not None and rss > budget_mib:
                proc.kill()
                killed = True
                break
            time.sleep(0.01)
        proc.wait()
        out.seek(0)
        err.seek(0)
        buf, stderr = out.read(), err.read()
    lines = [json.loads(line) for line in buf.splitlines() if line.startswith("{")]
    steps = [r for r in lines if "step" in r]
    from smet_lab.model import count_parameters, model_preset

    params = count_parameters(model_preset(cfg["model"], vocab_size=cfg["vocab"]))  # of the dense model
    if not killed and proc.returncode:
        sys.exit(f"{cfg['method']} failed (exit {proc.returncode}): {stderr[-2000:]}")
    out = {**cfg, "budget_mib": budget_mib, "steps_done": len(steps), "peak_mib": round(peak, 1),
           "killed_over_budget": killed, "fits": not killed and len(steps) == cfg["steps"],
           "params": params, "seconds": round(time.time() - started, 1),
           "median_step_s": sorted(r["seconds"] for r in steps)[len(steps) // 2] if steps else None}
    print(f"  {cfg['method']}: {'fits' if out['fits'] else 'does NOT fit'} ({out['steps_done']}/{cfg['steps']} steps, "
          f"peak {peak:,.0f} MiB{', killed over the budget' if killed else ''})", flush=True)
    return out


def table(results: list[dict]) -> str:
    lines = ["| model | params | method | density | budget MiB | steps done | peak RSS MiB | fits |",
             "|---|---|---|---|---|---|---|---|"]
    label = {"dense": "dense Adam", "naive_dst": "naive_dst", "smet": "smet (dense weights)",
             "smet_compact": "smet (compact weights)"}
    for r in results:
        lines.append(f"| {r['model']} | {r['params'] / 1e6:,.0f}M | "
                     f"{label[r['method']]} | {r['density'] if r['method'] != 'dense' else 1.0} | {r['budget_mib']:,.0f} | "
                     f"{r['steps_done']}/{r['steps']} | {r['peak_mib']:,.0f}{' (killed)' if r['killed_over_budget'] else ''} | "
                     f"{'yes' if r['fits'] else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama_350m")
    ap.add_argument("--budget-gib", type=float, default=4.0)
    ap.add_argument("--density", type=float, default=0.25)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=["dense", "smet", "smet_compact"])
    ap.add_argument("--json", default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        train_one(json.loads(args.one))
        return
    budget = args.budget_gib * 1024
    print(f"# {time.strftime('%Y-%m-%d')} {platform.machine()}, {os.cpu_count()} CPUs; {args.model}, budget "
          f"{args.budget_gib} GiB, {args.steps} steps, batch 1", flush=True)
    results = [run_capped({"model": args.model, "method": m, "density": args.density, "steps": args.steps,
                           "vocab": args.vocab, "threads": args.threads}, budget) for m in args.methods]
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
