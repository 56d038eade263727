"""`python -m smet_lab.export`: a trained model out of a training checkpoint, as safetensors.

    python -m smet_lab.export CHECKPOINT --out DIR [--format dense|compact] [--eval]
    python -m smet_lab.export SWEEP_DIR --trial KEY|best --out DIR [...]
        CHECKPOINT: a run's checkpoints/step_<N> folder (or the state.pt inside it), a run's folder
                 (its newest checkpoint), or a sweep trial's folder or final checkpoint (its newest
                 training checkpoint).
        SWEEP_DIR: a sweep's folder (sweeps/NAME); --trial names one of its trials by key, or `best`:
                 the finished trial best by the sweep's metric (trials.csv).
        dense    model.safetensors with full weight matrices (zeros off the topology), loadable into a
                 plain smet_lab.model.LLaMA: `model, manifest = load_export(DIR)`
        compact  the sparse layers as `<name>.values` [active blocks, B] float32 and `<name>.block_ids`
                 int32 (ascending, row-major blocks of B weights); dense layers as they are
        Both write manifest.json: model preset and sizes, vocabulary, tokenizer, block size, density
        per layer, method, step. --eval then loads the export back and prints its loss on the run's
        validation batches (the run's own data and eval settings; equals the run's last val loss).
        --sample PROMPT then prints what the export writes after PROMPT (the run's tokenizer; --tokens,
        --temperature, 0 = always the most likely token, --top-k and --seed shape it).

Bad input (no checkpoint there, a mistyped path, an unknown format): one line `smet_lab: error: ...` and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import sys
from pathlib import Path

import torch

from smet_lab.config import ConfigError, ModelConfig, RunConfig, check_writable_dir, from_dict, no_such_path
from smet_lab.stopping import clean_exit
from smet_lab.train import checkpoint as ckpt

FORMATS = ("dense", "compact")
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
EXIT_BAD_INPUT = 2


class ExportError(ValueError):
    """A one-line user error."""


def read_checkpoint(path: str | Path) -> tuple[RunConfig, dict, Path]:
    """The run config and state of a checkpoint folder (or its state.pt)."""
    path = Path(path)
    state_file = path / ckpt.STATE_FILE if path.is_dir() else path
    config_file = state_file.parent / ckpt.CONFIG_FILE
    if not state_file.is_file() or not config_file.is_file():
        raise ExportError(f"checkpoint={str(path)!r} is not allowed: expected a checkpoints/step_<N> folder "
                          f"with {ckpt.STATE_FILE} and {ckpt.CONFIG_FILE}, or a sweep's folder with --trial KEY|best")
    try:
        cfg = from_dict(RunConfig, json.loads(config_file.read_text()))
        state = torch.load(state_file, map_location="cpu", weights_only=False)
    except (OSError, ValueError, RuntimeError, ConfigError, EOFError, pickle.UnpicklingError) as exc:
        raise ExportError(f"checkpoint={str(path)!r} is not allowed: unreadable ({str(exc).splitlines()[0]})") from None
    return cfg, state, state_file.parent


def resolve_checkpoint(path: str | Path, trial: str | None = None) -> tuple[Path, str | None]:
    """(the training checkpoint to export, a note on how it was chosen). A run's checkpoint is taken as
    given; a sweep's folder needs `trial` (a key or "best"); a trial's folder or its final checkpoint
    (artifacts, no state.pt) gives that trial. A sweep trial's newest checkpoint with state.pt wins; a
    run's folder gives its newest checkpoints/step_<N>."""
    import difflib

    from smet_lab.sweep.folder import GRID_FILE, TRIAL_FILE, best_trial, read_json, sweep_folder_of, trial_checkpoints

    path = Path(path)
    missing = no_such_path(path)
    if missing:
        raise ExportError(f"checkpoint={str(path)!r} is not allowed: {missing}")
    sweep = sweep_folder_of(path)
    if sweep is None and not trial and (newest := ckpt.resolve(path)) != path:  # a run's folder, or its checkpoints/
        return newest, f"the run's newest checkpoint, {newest.name}"
    if sweep is None or (path / ckpt.STATE_FILE).is_file() or path.is_file():
        if trial:
            raise ExportError(f"--trial={trial!r} is not allowed: --trial picks a trial of a sweep's folder, and "
                              f"{str(path)!r} is {'a checkpoint' if sweep or path.is_file() else 'no sweep folder'}")
        return path, None
    note = None
    if path.resolve() == sweep:
        keys = list(read_json(sweep / GRID_FILE) or {})
        if not trial:
            raise ExportError(f"checkpoint={str(path)!r} is a sweep's folder: add --trial best, or --trial KEY "
                              f"with KEY one of {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}")
        if trial == "best":
            best = best_trial(sweep)
            if best is None:
                raise ExportError(f"--trial=best is not allowed: {sweep} has no finished trial with a value of its "
                                  "sweep metric yet; --trial KEY picks any trial")
            trial, note = best[0], f"best by {best[1]} = {best[2]:.6g}"
        elif trial not in keys:
            close = difflib.get_close_matches(trial, keys, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else f" (its trials: {', '.join(keys[:4])}, ...)"
            raise ExportError(f"--trial={trial!r} is not allowed: not a trial of the sweep {sweep}{hint}")
    else:
        named = [read_json(c / TRIAL_FILE) for c in (path, *sorted(path.glob("checkpoint_*")))]
        trial = next((n["trial"] for n in named if isinstance(n, dict) and n.get("trial")), None)
        if trial is None:  # no trial named there: as a run's checkpoint, the one-line error of read_checkpoint
            return path, None
    states = [c for c in trial_checkpoints(sweep).get(trial, []) if (c / ckpt.STATE_FILE).is_file()]
    if not states:
        raise ExportError(f"trial {trial!r} of {sweep} has no training checkpoint yet")
    return states[-1], f"trial {trial}" + (f", {note}" if note else "")


def sparse_tensors(cfg: RunConfig, state: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Size]]:
    """name -> (values [k, B], int32 block ids, dense shape) for every sparse layer of the checkpoint,
    whether it kept dense or compact weights."""
    from smet_lab.model import LLaMA

    with torch.device("meta"):
        shapes = {name: p.shape for name, p in LLaMA(cfg.model).named_parameters()}
    B = cfg.sparsity.block_size
    out = {}
    for name, ids in state["topology"]["layers"].items():
        ids = ids.to(torch.int32)
        model = state["model"]
        compact_key = name.removesuffix("weight") + "values"
        values = model[compact_key] if compact_key in model else model[name].reshape(-1, B)[ids.long()]
        out[name] = (values.float().contiguous(), ids, shapes[name])
    return out


def densify(values: torch.Tensor, ids: torch.Tensor, shape) -> torch.Tensor:
    """The dense weight of `shape` with the [k, B] `values` at blocks `ids`, zeros elsewhere."""
    dense = torch.zeros(torch.Size(shape).numel() // values.shape[1], values.shape[1])
    dense[ids.long()] = values
    return dense.view(shape)


def export(checkpoint: str | Path, out: str | Path, fmt: str = "dense", read=None) -> Path:
    """Write DIR/model.safetensors and DIR/manifest.json; returns DIR. `read`: read_checkpoint's result
    for `checkpoint`, if the caller has it already."""
    from safetensors.torch import save_file

    if fmt not in FORMATS:
        raise ExportError(f"--format={fmt!r} is not allowed: one of {', '.join(FORMATS)}")
    cfg, state, folder = read or read_checkpoint(checkpoint)
    sparse = sparse_tensors(cfg, state)
    tensors = {}
    for name, tensor in state["model"].items():
        if name.endswith(".values") or name in sparse:
            continue
        tensors[name] = tensor.contiguous()
    for name, (values, ids, shape) in sparse.items():
        if fmt == "dense":
            tensors[name] = densify(values, ids, shape)
        else:
            base = name.removesuffix("weight")
            tensors[base + "values"], tensors[base + "block_ids"] = values, ids.contiguous()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format": fmt,
        "model": dataclasses.asdict(cfg.model),
        "vocab_size": cfg.model.vocab_size,
        "tokenizer": cfg.data.tokenizer,
        "data": dataclasses.asdict(cfg.data),
        "method": cfg.method,
        "block_size": cfg.sparsity.block_size,
        "density": state["topology"]["target_density"],
        "layers": {name: {"shape": list(shape), "n_active_blocks": values.shape[0],
                          "density": values.shape[0] * values.shape[1] / shape.numel()}
                   for name, (values, _, shape) in sparse.items()},
        "step": state["step"],
        "checkpoint": str(folder.resolve()),
    }
    # The manifest goes last, so a folder with one holds a whole export, never an interrupted one's weights
    # beside an earlier export's manifest.
    (out / MANIFEST).unlink(missing_ok=True)
    umask = os.umask(0)
    os.umask(umask)
    for name, write in ((WEIGHTS, lambda f: save_file(tensors, str(f), metadata={"format": fmt})),
                        (MANIFEST, lambda f: f.write_text(json.dumps(manifest, indent=1)))):
        tmp = out / (name + ".tmp")
        try:
            write(tmp)
            os.chmod(tmp, 0o666 & ~umask)  # safetensors writes 0600: as readable as any other file
            os.replace(tmp, out / name)
        finally:
            tmp.unlink(missing_ok=True)
    return out


def load_export(path: str | Path):
    """(LLaMA with the exported weights, manifest) from an export folder of either format."""
    from safetensors.torch import load_file

    from smet_lab.model import LLaMA

    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise ExportError(f"{path} holds no export (no {MANIFEST}: never exported there, or the export was interrupted)")
    manifest = json.loads((path / MANIFEST).read_text())
    tensors = load_file(str(path / WEIGHTS))
    for name, info in manifest["layers"].items():
        base = name.removesuffix("weight")
        if base + "values" in tensors:
            tensors[name] = densify(tensors.pop(base + "values"), tensors.pop(base + "block_ids"), info["shape"])
    model = LLaMA(ModelConfig(**manifest["model"]))
    model.load_state_dict(tensors)
    return model, manifest


def evaluate_export(path: str | Path, cfg: RunConfig | None = None, progress=None) -> float:
    """The export's mean loss on its run's validation batches (`cfg`: the run's config, read from the
    manifest's checkpoint if not given), computed as the trainer does; `progress` as in load_corpus."""
    from smet_lab.data import TokenBatcher, load_corpus
    from smet_lab.train.trainer import mean_loss

    model, manifest = load_export(path)
    if cfg is None:
        cfg = read_checkpoint(manifest["checkpoint"])[0]
    corpus = load_corpus(cfg.data, progress=progress)
    batches = TokenBatcher.fixed_batches(corpus.val, cfg.train.batch_size, cfg.model.seq_len, cfg.train.eval_batches)
    return mean_loss(model, batches, cfg.train.dtype == "bfloat16")


def sample_text(model, tokenizer, prompt: str, tokens: int, temperature: float, top_k: int | None, seed: int) -> str:
    """`prompt` and `tokens` more tokens that `model` writes after it (LLaMA.generate, a seeded generator)."""
    ids = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long)
    out = model.eval().generate(ids, tokens, temperature, top_k, torch.Generator().manual_seed(seed))
    return tokenizer.decode(out[0])


def _at_least(low, kind=int):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not value >= low:  # (NaN too)
            raise argparse.ArgumentTypeError(f"{text} is not allowed: {'an integer' if kind is int else 'a number'} >= {low}")
        return value
    return parse


SAMPLING = {"tokens": 200, "temperature": 0.8, "top_k": 40, "seed": 0}  # the defaults of the options read with --sample


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like the main CLI, instead of usage + message
        print(f"smet_lab: error: {message} (see python -m smet_lab.export --help)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


@clean_exit
def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="python -m smet_lab.export", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("checkpoint", help="a run's checkpoints/step_<N> folder, or a sweep's folder with --trial")
    p.add_argument("--trial", default=None, help="with a sweep's folder: a trial key, or best")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", default="dense", choices=FORMATS)
    p.add_argument("--eval", action="store_true", help="print the export's loss on the run's validation batches")
    p.add_argument("--sample", metavar="PROMPT", help="print what the export writes after PROMPT")
    p.add_argument("--tokens", type=_at_least(1), help=f"with --sample: how many tokens (default {SAMPLING['tokens']})")
    p.add_argument("--temperature", type=_at_least(0.0, float),
                   help=f"with --sample: 0 = the most likely token each time (default {SAMPLING['temperature']})")
    p.add_argument("--top-k", type=_at_least(1), help=f"with --sample: among the K most likely (default {SAMPLING['top_k']})")
    p.add_argument("--seed", type=int, help=f"with --sample: the sampler's seed (default {SAMPLING['seed']})")
    args = p.parse_args(argv)
    for dest, default in SAMPLING.items():
        if getattr(args, dest) is not None and args.sample is None:
            p.error(f"--{dest.replace('_', '-')} is read only with --sample PROMPT")
        if getattr(args, dest) is not None and dest in ("top_k", "seed") and args.temperature == 0:
            p.error(f"--{dest.replace('_', '-')} is not read with --temperature 0 (the most likely token each time)")
        if getattr(args, dest) is None:
            setattr(args, dest, default)
    try:
        check_writable_dir("--out", args.out)
        checkpoint, chosen = resolve_checkpoint(args.checkpoint, args.trial)
        read = read_checkpoint(checkpoint)
        tokenizer = None
        if args.sample is not None:  # before anything is written: the run's tokenizer and a prompt it encodes
            from smet_lab.data import build_tokenizer

            tokenizer = build_tokenizer(read[0].data.tokenizer)
            if not tokenizer.encode(args.sample):
                raise ExportError(f"--sample={args.sample!r} is not allowed: a prompt of at least one token")
        out = export(checkpoint, args.out, args.format, read=read)
    except ExportError as exc:
        print(f"smet_lab: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ConfigError as exc:
        print(f"smet_lab: error: {exc.key} {exc.value}: {exc.allowed}", file=sys.stderr)
        return EXIT_BAD_INPUT
    size = sum((out / name).stat().st_size for name in (WEIGHTS, MANIFEST))
    print(f"smet_lab: exported {checkpoint}{f' ({chosen})' if chosen else ''} as {args.format} to {out} "
          f"({size / 2**20:,.2f} MiB)")
    if args.eval:
        cfg, state, _ = read
        logged = [(r["step"], r["val/loss"]) for r in state["history"] if "val/loss" in r and r["step"] <= state["step"]]
        run = ""
        if logged and logged[-1][0] == state["step"]:
            run = f" (the run's val loss at this step: {logged[-1][1]:.6f})"
        elif logged:  # a checkpoint between evaluations: the run's number is of other weights
            run = (f" (the run last evaluated at step {logged[-1][0]}: {logged[-1][1]:.6f}; "
                   f"this checkpoint is step {state['step']})")
        print(f"smet_lab: val loss of the export: {evaluate_export(out, cfg, progress=print):.6f}{run}")
    if tokenizer is not None:
        how = (f"temperature {args.temperature:g}, top-k {args.top_k}, seed {args.seed}" if args.temperature
               else "the most likely token each time")
        print(f"smet_lab: sample ({args.tokens} tokens, {how}):")
        print(sample_text(load_export(out)[0], tokenizer, args.sample, args.tokens, args.temperature, args.top_k,
                          args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
