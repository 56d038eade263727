"""Data parallelism for one run on torch.distributed (gloo on CPU, NCCL on CUDA).

No DDP wrapper: DDP all-reduces dense `.grad` buckets, but SMETAdam gathers each sparse weight's
gradient into its compact buffer during backward and drops the dense one, so DDP would average the
wrong tensors. Instead every rank runs its share of each global batch, accumulates locally, and the
trainer all-reduces the optimizer's gradient buffers (compact sparse gradients ++ dense parameters'
gradients ++ the loss) in one fused collective per optimizer step (`World.average`), before clipping.
Every rank then takes the same step, so weights, optimizer state and topology stay identical without
any broadcast; `World.check_same` verifies the topology after every update.

`World()` is the single process (size 1): every method is then a no-op, so a one-process run is
exactly the code path it always was.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from smet_lab.config import ConfigError

# One collective's largest flat buffer (float32 entries); larger gradient sets go in several buckets.
BUCKET_ENTRIES = 1 << 24
# A collective that waits longer than this ends the run (a dead or stuck rank), never a hang.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
BACKENDS = ("auto", "gloo", "nccl")


class PeerLost(RuntimeError):
    """A collective failed: another process of the run stopped (its error is in the launcher's output)
    or did not answer within COLLECTIVE_TIMEOUT."""


def _collective(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PeerLost(f"process {dist.get_rank()} of {dist.get_world_size()}: a collective failed ({first}); "
                       "another process of this run stopped or timed out, its error is in the launcher's "
                       "output") from None


class RankMismatch(RuntimeError):
    """The ranks' replicated state diverged (a rule that draws from an unseeded or per-rank RNG)."""


def launched_world_size() -> int:
    """The world size a launcher (torchrun, Ray Train) announces in the environment; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def check_world(batch_size: int, world_size: int, backend: str, device: str, origin: str = "WORLD_SIZE") -> None:
    """What a run on `world_size` processes (`origin` says who set that number) needs of its config."""
    if backend not in BACKENDS:
        raise ConfigError("train.dist_backend", backend, "one of " + ", ".join(BACKENDS))
    if backend == "nccl" and (device == "cpu" or not torch.cuda.is_available()):
        raise ConfigError("train.dist_backend", backend, "NCCL needs CUDA devices (train.device=cuda on a GPU "
                          "machine); use gloo or auto on CPU")
    if world_size > 1 and batch_size % world_size:
        raise ConfigError("train.batch_size", batch_size, f"a multiple of {world_size}, the number of processes "
                          f"({origin}): it is the global batch and each process takes an equal share")


def init_from_env(backend: str = "auto") -> "World":
    """Join the process group a launcher described in the environment (RANK, WORLD_SIZE, MASTER_ADDR,
    ...); the CUDA device is LOCAL_RANK's. A no-op World when there is no launcher."""
    if launched_world_size() <= 1 and not dist.is_initialized():
        return World()
    cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    return World.current()


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @classmethod
    def current(cls) -> "World":
        """The process group this process belongs to (initialised by torchrun's CLI path or Ray Train)."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def average(self, tensors: list[torch.Tensor]) -> int:
        """Average `tensors` in place over the ranks: consecutive tensors are packed into flat buffers of
        at most BUCKET_ENTRIES, one collective each (llama_20m with the byte tokenizer: one; llama_130m
        with T5's 32k vocabulary at density 0.25: five, the embeddings being most of it). Returns the
        bytes sent per rank."""
        tensors = [t for t in tensors if t.numel()]
        if self.size == 1 or not tensors:
            return 0
        sent = 0
        for bucket in _buckets(tensors):
            flat = bucket[0].view(-1) if len(bucket) == 1 else torch.cat([t.reshape(-1) for t in bucket])
            _collective(dist.all_reduce, flat)
            flat.div_(self.size)
            if len(bucket) > 1:
                for t, part in zip(bucket, flat.split([t.numel() for t in bucket])):
                    t.copy_(part.view_as(t))
            sent += flat.numel() * flat.element_size()
        return sent

    def sum_loss(self, batches, loss_of) -> float:
        """sum over `batches` of the batch's mean loss, each rank taking its rows (any batch size: a
        rank may have none), as one all-reduce: the same number on every rank."""
        first = batches[0][0]
        per_batch = torch.zeros(len(batches), dtype=torch.float64, device=first.device)
        for i, (x, y) in enumerate(batches):
            lo, hi = self.rank * len(x) // self.size, (self.rank + 1) * len(x) // self.size
            if hi > lo:
                per_batch[i] = loss_of(x[lo:hi], y[lo:hi]) * (hi - lo) / len(x)
        _collective(dist.all_reduce, per_batch)
        return float(per_batch.sum())

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any (a stop request reaches one process first)."""
        if self.size == 1:
            return bool(flag)
        t = torch.tensor([float(bool(flag))], device=_device())
        _collective(dist.all_reduce, t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def check_same(self, what: str, values: torch.Tensor) -> None:
        """Raise RankMismatch on every rank unless `values` (int64) are equal on all ranks."""
        if self.size == 1:
            return
        both = torch.cat([values, -values]).to(device=_device(), dtype=torch.int64)
        _collective(dist.all_reduce, both, op=dist.ReduceOp.MAX)
        n = values.numel()
        if not torch.equal(both[:n], -both[n:]):
            raise RankMismatch(f"{what} differs between the {self.size} processes (replicated state diverged: "
                               "a rule or extension that draws from an unseeded or per-process random source?)")


def _device() -> torch.device:
    """Where a small control tensor must live for the group's backend (NCCL: the current GPU)."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _buckets(tensors: list[torch.Tensor]):
    bucket, size = [], 0
    for t in tensors:
        if bucket and size + t.numel() > BUCKET_ENTRIES:
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel()
    if bucket:
        yield bucket


def topology_checksum(topology) -> torch.Tensor:
    """Per sparse layer: number of active blocks, sum of their ids and of (id^2 mod a prime)
    (int64, exact): equal topologies give equal sums, a changed block changes them."""
    out = []
    for layer in topology.layers:
        ids = layer.block_ids().long().cpu()
        out += [ids.numel(), int(ids.sum()), int((ids * ids % 2_147_483_647).sum())]
    return torch.tensor(out, dtype=torch.int64)
