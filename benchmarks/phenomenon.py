"""Does the default tiny run show the paper's phenomenon? naive_dst vs smet over several seeds.

    python benchmarks/phenomenon.py --seeds 0 1 2 [--steps 3000] [--set key=value ...]

Prints per-run mean probe jump, regrow update ratio and final val loss, then the means and spreads.
--set key=value arguments set RunConfig fields (e.g. optim.lr=0.005 sparsity.density=0.5).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from smet_lab.config import RunConfig
from smet_lab.data import load_corpus
from smet_lab.methods import apply_method
from smet_lab.train import QUIET, train


def set_dotted(cfg, dotted: str, raw: str) -> None:
    *path, leaf = dotted.split(".")
    node = cfg
    for part in path:
        node = getattr(node, part)
    setattr(node, leaf, json.loads(raw) if raw[:1] in "[{0123456789-tf" else raw)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["naive_dst", "smet"])
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write all results here")
    ap.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    corpus = load_corpus(RunConfig().data)
    rows = []
    for seed in args.seeds:
        for method in args.methods:
            cfg = apply_method(RunConfig(), method)
            cfg.train.seed = seed
            if args.steps:
                cfg.train.max_steps = args.steps
            for o in args.overrides:
                k, v = o.split("=", 1)
                set_dotted(cfg, k, v)
            tic = time.time()
            res = train(cfg, corpus=corpus, callbacks=QUIET)
            s = res.summary
            row = {"method": method, "seed": seed, "status": res.status,
                   "mean_probe_jump": s.get("summary/mean_probe_jump"),
                   "max_probe_jump": s.get("summary/max_probe_jump"),
                   "regrow_ratio": s.get("summary/mean_regrow_update_ratio"),
                   "final_val_loss": s.get("summary/final_val_loss"),
                   "tokens_per_s": s["summary/tokens_per_s"], "seconds": time.time() - tic}
            rows.append(row)
            print(json.dumps(row), flush=True)
    for method in args.methods:
        mine = [r for r in rows if r["method"] == method and r["status"] == "FINISHED"]
        if not mine:
            continue
        jumps = [r["mean_probe_jump"] for r in mine]
        vals = [r["final_val_loss"] for r in mine]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        print(f"{method:>16}: mean probe jump {statistics.mean(jumps):.4f} (per seed {', '.join(f'{j:.4f}' for j in jumps)}); "
              f"final val loss {statistics.mean(vals):.4f} +- {sd:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
