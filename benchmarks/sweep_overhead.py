"""Wall time of a sweep through Ray Tune + MLflow against the same trials one after another in one
plain Python process (no Ray, no MLflow).

    python benchmarks/sweep_overhead.py [--sweep density] [--workdir DIR] [--set KEY=VALUE ...]

Runs `python -m smet_lab +sweep=NAME` (fresh storage and database in a temporary folder, or in
--workdir, which is kept: its mlflow.db and sweeps/ can feed `python -m smet_lab.report`) and then
the same trial configs sequentially with `smet_lab.train.train`, and prints both wall times and the
overhead. Run it on a quiet machine: both halves use all cores.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", default="density")
    ap.add_argument("--workdir", default=None, help="run the sweep here and keep it (default: a temporary folder)")
    ap.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    overrides = [f"+sweep={args.sweep}", *args.overrides]

    from smet_lab.compose import compose, group_composer
    from smet_lab.config import run_config_from
    from smet_lab.data import load_corpus
    from smet_lab.sweep.runner import plan
    from smet_lab.train import QUIET, train

    _, trials, configs = plan(compose(overrides), group_composer(overrides))
    with tempfile.TemporaryDirectory(prefix="sweepbench_") as tmp:
        work = os.path.abspath(args.workdir) if args.workdir else tmp
        os.makedirs(work, exist_ok=True)
        tic = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "smet_lab", *overrides, f"ray.storage={work}/sweeps",
                               f"tracking.uri=sqlite:///{work}/mlflow.db"],
                              cwd=work, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        swept = time.perf_counter() - tic
        if proc.returncode != 0:
            sys.exit(f"the sweep failed with exit code {proc.returncode}")

    torch.set_num_threads(os.cpu_count() or 1)
    tic = time.perf_counter()
    corpora = {}
    for trial in trials:
        cfg = run_config_from(configs[trial.key])
        key = repr(cfg.data)
        if key not in corpora:
            corpora[key] = load_corpus(cfg.data)
        train(cfg, corpus=corpora[key], callbacks=QUIET)
    plain = time.perf_counter() - tic
    print(f"\n{args.sweep}: {len(trials)} trials")
    print(f"  python -m smet_lab +sweep={args.sweep} (Ray Tune + MLflow, process start included): {swept:.1f} s")
    print(f"  the same trials one after another in one process (no Ray, no MLflow):          {plain:.1f} s")
    print(f"  overhead: {100 * (swept / plain - 1):.1f} %")


if __name__ == "__main__":
    main()
