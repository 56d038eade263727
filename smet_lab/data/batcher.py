"""Deterministic, resumable batching over a 1-D token stream.

The stream is cut into non-overlapping windows of seq_len+1 tokens (stride seq_len, so each
window's last token is the next window's first). Epoch e visits the windows in a permutation drawn
from a generator seeded by (seed, e); batches are consecutive slices of the endless sequence
perm_0 ++ perm_1 ++ ..., so a batch may straddle an epoch boundary and every epoch covers every
window exactly once. The position is just (epoch, cursor), which makes resuming exact.

With several processes (`rank`, `world`), every process walks the same global sequence and keeps its
equal share of each batch's rows, so the position, and a checkpoint, do not depend on the world size.
"""

from __future__ import annotations

import torch

from smet_lab.config import ConfigError


def _check_stream(tokens: torch.Tensor, seq_len: int, stream: str = "token") -> int:
    """The number of seq_len+1 token windows of the stream; ConfigError when it has none."""
    if tokens.dim() != 1:
        raise ConfigError("data", tuple(tokens.shape), "a 1-D token stream")
    if seq_len < 1 or len(tokens) < seq_len + 1:
        raise ConfigError("model.seq_len", seq_len,
                          f"between 1 and {len(tokens) - 1} (the {stream} stream has {len(tokens)} tokens)")
    return (len(tokens) - 1) // seq_len


def _check_batch(batch_size: int, n_windows: int, seq_len: int) -> None:
    if not 1 <= batch_size <= n_windows:
        raise ConfigError("train.batch_size", batch_size,
                          f"between 1 and {n_windows} (the number of seq_len+1={seq_len + 1} token windows)")


def check_streams(train: torch.Tensor, val: torch.Tensor, seq_len: int, batch_size: int) -> None:
    """What TokenBatcher and fixed_batches would refuse, checked on a loaded corpus before a run starts."""
    _check_batch(batch_size, _check_stream(train, seq_len, "training"), seq_len)
    _check_stream(val, seq_len, "validation")


def _windows(tokens: torch.Tensor, seq_len: int, device) -> torch.Tensor:
    """[n_windows, seq_len+1] view of the stream (kept in its compact dtype, moved to device once)."""
    _check_stream(tokens, seq_len)
    return tokens.to(device).unfold(0, seq_len + 1, seq_len)


def _split(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.long()
    return w[:, :-1], w[:, 1:]


class TokenBatcher:
    def __init__(self, tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int, device="cpu",
                 rank: int = 0, world: int = 1):
        # The stream stays where it is (RAM, or the corpus cache's pages); each batch goes to the device,
        # so a paper-scale corpus (GBs of tokens) takes no GPU memory.
        self.windows, self.device = _windows(tokens, seq_len, "cpu"), torch.device(device)
        self.n_windows = len(self.windows)
        _check_batch(batch_size, self.n_windows, seq_len)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.epoch, self.cursor = 0, 0
        share = batch_size // world
        self.rows = slice(rank * share, (rank + 1) * share) if world > 1 else None
        self._perm_epoch, self._perm = None, None

    def _order(self) -> torch.Tensor:
        if self._perm_epoch != self.epoch:  # cache one permutation; recomputed only on epoch change
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
            self._perm = torch.randperm(self.n_windows, generator=g)
            self._perm_epoch = self.epoch
        return self._perm

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) LongTensors [batch_size, seq_len] on the device (this process's rows of them when
        several share the batch); y is x shifted by one token."""
        idx, need = [], self.batch_size
        while need:
            take = self._order()[self.cursor : self.cursor + need]
            idx.append(take)
            need -= len(take)
            self.cursor += len(take)
            if self.cursor == self.n_windows:
                self.epoch, self.cursor = self.epoch + 1, 0
        idx = torch.cat(idx)
        return _split(self.windows[idx if self.rows is None else idx[self.rows]].to(self.device))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        epoch, cursor = int(state["epoch"]), int(state["cursor"])
        if epoch < 0 or not 0 <= cursor < self.n_windows:
            raise ConfigError("train.resume_from", state, f"a batcher position with 0 <= cursor < {self.n_windows}")
        self.epoch, self.cursor = epoch, cursor

    @staticmethod
    def fixed_batches(tokens: torch.Tensor, batch_size: int, seq_len: int, n_batches: int,
                      device="cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The same evaluation batches every time: windows evenly spaced over the stream, no
        randomness. A short stream gives fewer (and possibly smaller) batches, but at least one."""
        windows = _windows(tokens, seq_len, device)
        n = len(windows)
        batch_size = min(batch_size, n)
        n_batches = max(1, min(n_batches, n // batch_size))
        k = n_batches * batch_size
        idx = torch.arange(k, device=windows.device) * n // k
        return [_split(windows[chunk]) for chunk in idx.split(batch_size)]
