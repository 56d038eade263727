"""smet_lab's methods side by side with two mask-based DST libraries: sparsimony 0.1.0 (SET) and
rigl-torch 0.5.2 (RigL), each on torch.optim.Adam(fused=True), on smet_lab's LLaMA.

    # once, into the project's venv. Not dependencies of smet_lab (`import smet_lab` never imports
    # them); --no-deps because sparsimony 0.1.0 declares numpy==1.*, which conflicts with the pinned
    # numpy==2.4.6 (so a `bench` extra cannot resolve), and rigl-torch needs torchvision only for an
    # isinstance check (stubbed here, see ADAPTATIONS):
    pip install -c constraints.txt --no-deps sparsimony==0.1.0 rigl-torch==0.5.2

    python benchmarks/peers.py [--models tiny llama_20m] [--vocab 256] [--batch 8] [--density 0.25]
        [--threads 1] [--repeats 15] [--warmup 2] [--updates 3] [--mem-steps 3] [--contenders ...]
        [--json benchmarks/results/peers.json]
    python benchmarks/peers.py --check     # peers: density after an update, loss over 30 steps, regrown state
    python benchmarks/peers.py --models tiny --repeats 3 --updates 1     # smoke run

Methodology as benchmarks/speed.py: every contender (common.METHODS, then the peers) is built from the
same seed on the same model, and each repeat runs one training step (forward + backward + clip 1.0 +
optimizer step + zero_grad, and the peer's per-step mask work) of every contender in turn on the same
batch, the order reversed every other repeat. Reported: median tokens/s and step ms, median
optimizer-step ms (what it contains: OPT_STEP), the median (min-max) over repeats of the paired ratio
of tokens/s to dense Adam, one topology update at step 100(u+1) (median of --updates; smet_lab:
common.topology_update), and tokens/s with one update per 100 steps. Sparse layers: the attention
and MLP projections, exactly those smet_lab makes sparse (SparseTopology.build's rule), density 0.25,
prune fraction 0.3 (magnitude), regrowth random (SET, smet_lab) or by gradient (RigL).
Memory: every contender in a fresh subprocess (--memory-child): --mem-steps training steps with a
topology update after the first; gradients (at their largest), optimizer state and masks counted from
the tensors (smet_lab methods: benchmarks/memory.py's measure_one), and the peak RSS (VmHWM, see peak_rss).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from common import METHODS, Setup, batch, build, dense_adam, topology_update, train_step
from smet_lab.model import LLaMA, model_preset
from smet_lab.sparse.topology import SparseTopology, is_dense

PEERS = ("sparsimony_set", "rigl_torch")
LABELS = {"dense": "dense Adam (fused)", "sparsimony_set": "sparsimony 0.1.0 SET", "rigl_torch": "rigl-torch 0.5.2 RigL"}
LR, CLIP, EVERY, PRUNE, T_END = 1e-3, 1.0, 100, 0.3, 10_000  # T_END = common.build's total_steps
INSTALL = "pip install -c constraints.txt --no-deps sparsimony==0.1.0 rigl-torch==0.5.2"

OPT_STEP = {  # what the "opt step ms" column times, per contender
    "dense": "fused Adam step + zero_grad",
    "naive_dst": "SMETAdam.step (dense_masked state) + zero_grad; its gradient gather runs in backward hooks (step time only)",
    "smet": "SMETAdam.step (compact state) + zero_grad; its gradient gather runs in backward hooks (step time only)",
    "smet_compact": "as smet, with compact weights",
    "sparsimony_set": "fused Adam step over the dense `original` weights + sparsimony's step wrapper (a momentum_buffer "
                      "lookup per sparse layer, nothing to do for Adam) + zero_grad; the mask itself is applied in forward "
                      "(weight = mask * original at every forward, torch.ao FakeSparsity) and its backward (step time only)",
    "rigl_torch": "fused Adam step + rigl-torch's step wrapper: reset_momentum (SGD momentum only, nothing to do for Adam) "
                  "and apply_mask_to_weights (w *= mask per sparse layer) + zero_grad; gradients are masked by a tensor "
                  "hook (grad * mask) in backward (step time only)",
}
ADAPTATIONS = [  # every change made to run the peers here; all in this file, none in site-packages
    "both: installed with --no-deps (sparsimony declares numpy==1.*; the project pins numpy==2.4.6, which it runs on)",
    "rigl-torch: a stub `torchvision` module (two never-matching classes) sits in sys.modules only while rigl_torch is "
    "imported: rigl_torch/util.py imports torchvision just for an isinstance check against ResNet blocks, and "
    "torchvision is not installed",
    "rigl-torch: RigLScheduler gets an nn.ModuleList of the projection nn.Linear modules instead of the model (its "
    "get_W takes every module with a .weight: embedding, norms, head) and ignore_linear_layers=False (the default "
    "keeps every nn.Linear dense)",
    "rigl-torch: subclass, random_sparsify first sets every layer's sparsity to 1 - density: with "
    "sparsity_distribution='uniform' the library keeps the first layer in its list (block 0's wq) dense",
    "rigl-torch: subclass, cosine_annealing returns alpha = 0.3: a constant prune fraction as smet_lab's "
    "prune_schedule=constant (the library anneals alpha/2 (1 + cos(pi t / T_end)))",
    "sparsimony: subclass of SET, _step undoes one of its two _step_count increments per call (else the counter "
    "visits only odd steps and ConstantScheduler's step % 100 == 0 never fires: no update ever happens)",
    "sparsimony: SET's _assert_sparsity_level is replaced by its base class DSTMixin's (ones == int(numel * (1 - "
    "sparsity))): SET's compares the count of ones with numel * sparsity and fails on every correct mask",
    "sparsimony: init_method=None, so the active weights keep smet_lab's N(0, 0.02^2) init as in every other "
    "contender (the default 'grad_flow' redraws them with a fan-in-scaled init); sparse config = the projections' "
    "tensor_fqn, UniformDistribution without exclusions (sparsity 0.75 in every projection)",
    "both: the per-step scheduler call (rigl `pruner()`, sparsimony `sparsifier.step()`: a counter increment when no "
    "update is due) is made only for the timed topology updates, with the counter set to step 100(u+1) - 1 first, "
    "as smet_lab's update is called only at updates; rigl-torch's update follows its usage `if pruner(): "
    "optimizer.step()`: forward + backward (hooks keep the dense gradient, untimed), then the timed pruner() call",
]
NOTES = [  # read from the peers' code (and shown by --check)
    "Adam state of regrown weights: neither peer resets it. rigl-torch's reset_momentum masks only SGD's "
    "'momentum_buffer', so exp_avg/exp_avg_sq of pruned and regrown weights stay as they were (a weight pruned "
    "earlier, or in this very update, comes back with its old m and v). sparsimony's wrapper likewise touches only "
    "'momentum_buffer'.",
    "Regrown weights' values: rigl-torch sets new connections to 0. sparsimony's SET.grow_mask computes "
    "torch.where(new_mask != mask, grown_weights_init, original) and discards the result, and the trained `original` "
    "is never zeroed under the mask, so a regrown weight comes back with its stale value (its init value if never "
    "active, its value when pruned, moved since by the decaying m) instead of 0.",
    "Masks: rigl-torch keeps a bool mask (1 B per sparse-layer weight) and, from the backward before an update until "
    "the next backward, a float dense-gradient copy per sparse layer (4 B per weight; JSON update_buffer_bytes); "
    "sparsimony keeps float32 masks (4 B per weight). Both train dense-size weights, gradients and Adam moments.",
    "Initial topology: smet_lab and rigl-torch draw it at random; sparsimony keeps the largest 25 % of the dense init "
    "by magnitude. Topology update cost: both peers sort/top-k whole dense layers (rigl-torch two full top-k sorts "
    "per layer).",
]


@dataclass
class Contender:
    name: str
    setup: Setup  # model + opt: what common.train_step runs
    update: Callable[[int, torch.Tensor, torch.Tensor], float]  # a real prune + regrow at step t; seconds
    density: Callable[[], float]  # active entries / entries of the sparse layers
    layers: Callable[[], list] = lambda: []  # peers: (bool mask, masked weight, trained param) per sparse layer
    buffers: Callable[[], int] = lambda: 0  # peers: bytes of update-time buffers held now
    masks: Callable[[], list] = lambda: []  # peers: the mask tensors the library keeps


def sparse_names(model: nn.Module) -> list[str]:
    """The parameters SparseTopology.build makes sparse (its rule, its default dense patterns)."""
    patterns = list(inspect.signature(SparseTopology.build).parameters["dense_patterns"].default)
    return [n for n, p in model.named_parameters() if not is_dense(n, p, patterns)]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def import_peer(name: str) -> None:
    if name == "rigl_torch" and importlib.util.find_spec("torchvision") is None:
        tv = types.ModuleType("torchvision")
        tv.models = types.ModuleType("torchvision.models")
        tv.models.resnet = types.ModuleType("torchvision.models.resnet")
        tv.models.resnet.Bottleneck = type("Bottleneck", (), {})
        tv.models.resnet.BasicBlock = type("BasicBlock", (), {})
        stubs = {"torchvision": tv, "torchvision.models": tv.models, "torchvision.models.resnet": tv.models.resnet}
        sys.modules.update(stubs)
        try:
            importlib.import_module("rigl_torch.RigL")  # rigl_torch.util keeps its reference to the stub
        finally:
            for k in stubs:
                sys.modules.pop(k, None)
    elif name == "sparsimony_set":
        importlib.import_module("sparsimony.dst.set")


def make(name: str, model_name: str, vocab: int, density: float, seed: int = 0, kernel: str = "auto") -> Contender:
    if name in METHODS:
        s = build(name, model_name, vocab, density, 1, None, "cpu", seed=seed, lr=LR, total_steps=T_END, kernel=kernel)
        return Contender(name, s, lambda t, x, y: topology_update(s, t),
                         lambda: s.topology.density() if s.topology is not None else 1.0)
    import_peer(name)
    torch.manual_seed(seed)  # as common.build: the same initial weights
    model = LLaMA(model_preset(model_name, vocab_size=vocab))
    opt, kind = dense_adam(model.parameters(), LR, torch.device("cpu"))
    setup, names = Setup(name, model, opt, dense_adam=kind), sparse_names(model)
    return (make_sparsimony if name == "sparsimony_set" else make_rigl)(setup, names, density)


def make_sparsimony(s: Setup, names: list[str], density: float) -> Contender:
    from sparsimony.distributions.base import UniformDistribution
    from sparsimony.dst.base import DSTMixin
    from sparsimony.dst.set import SET
    from sparsimony.schedulers.base import ConstantScheduler
    from sparsimony.utils import get_mask, get_original_tensor

    class FixedSET(SET):
        _assert_sparsity_level = DSTMixin._assert_sparsity_level

        def _step(self):
            super()._step()
            self._step_count -= 1  # SET._step advances the counter twice

    sp = FixedSET(ConstantScheduler(PRUNE, T_END, EVERY), UniformDistribution(), s.opt, sparsity=1 - density,
                  init_method=None)  # the optimizer first: prepare() wraps its step
    sp.prepare(s.model, [{"tensor_fqn": n} for n in names])

    def update(t, x, y):
        sp._step_count = t - 1
        return timed(sp.step)

    @torch.no_grad()
    def layers():
        return [(get_mask(**g).bool(), getattr(g["module"], g["tensor_name"]), get_original_tensor(**g)) for g in sp.groups]

    def density_now():
        ls = layers()
        return sum(int(m.sum()) for m, _, _ in ls) / sum(m.numel() for m, _, _ in ls)

    return Contender("sparsimony_set", s, update, density_now, layers, masks=lambda: [get_mask(**g) for g in sp.groups])


def make_rigl(s: Setup, names: list[str], density: float) -> Contender:
    from rigl_torch.RigL import RigLScheduler

    class UniformRigL(RigLScheduler):
        def random_sparsify(self):
            self.S = [1 - self.dense_allocation] * len(self.W)  # every listed layer sparse, the first one too
            super().random_sparsify()

        def cosine_annealing(self):
            return self.alpha  # constant prune fraction

    projections = nn.ModuleList(s.model.get_submodule(n.rpartition(".")[0]) for n in names)
    sched = UniformRigL(projections, s.opt, dense_allocation=density, T_end=T_END, delta=EVERY, alpha=PRUNE,
                        ignore_linear_layers=False)

    def update(t, x, y):
        sched.step = t - 1  # the next backward precedes an update: the hooks keep the dense gradient
        s.model(x, y).backward()
        torch.nn.utils.clip_grad_norm_(s.model.parameters(), CLIP, foreach=True)
        out = []
        dt = timed(lambda: out.append(sched()))
        assert out == [False] and sched.step == t, "rigl-torch did not update"  # False: skip optimizer.step()
        s.opt.zero_grad(set_to_none=True)
        return dt

    def layers():
        return [(m.bool(), w.detach(), w) for m, w in zip(sched.backward_masks, sched.W)]

    def density_now():
        return sum(int(m.sum()) for m in sched.backward_masks) / sum(m.numel() for m in sched.backward_masks)

    def buffers():
        return sum(h.dense_grad.numel() * h.dense_grad.element_size() for h in sched.backward_hook_objects
                   if h is not None and h.dense_grad is not None)

    return Contender("rigl_torch", s, update, density_now, layers, buffers, lambda: list(sched.backward_masks))


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
    for r in range(args.repeats):
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
    updates = {c.name: [] for c in cs}
    for u in range(args.updates):
        x, y = batch(10_000 + u, args.batch, seq, args.vocab, "cpu")
        for c in cs:
            updates[c.name].append(c.update(EVERY * (u + 1), x, y))
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
    lines += ["", f"Peers installed with: `{INSTALL}`", "", "Adaptations (all in benchmarks/peers.py):"]
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
    ap.add_argument("--updates", type=int, default=3)
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
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor() or platform.machine()) if os.path.exists("/proc/cpuinfo") else platform.machine()
    machine = f"{platform.machine()}, {cpu}, {os.cpu_count()} CPUs"
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
