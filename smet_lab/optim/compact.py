"""optim.state="compact": gradients and moments exist only for active blocks.

All sparse layers share one flat buffer per quantity, shaped [active blocks, block_size] in slot order
(layer after layer; within a layer, ascending block id):

    grad, exp_avg, exp_avg_sq : float32 [K, B]
    cohort                    : uint8   [K]   which topology update grew the block (0 = active since
                                              the start); only when reset_step or a warm-up needs it
    births                    : int64   [C]   the global step of each cohort's update (C <= 256)
    positions                 : the topology's chunked position list (uint8 per active block + int16
                                per 256 blocks; see smet_lab.sparse.layer), shared, not copied

At block size 1 that is 12 + 1 + 1 (+ 2/256/d) bytes per active weight: 14.03 B at density 0.25,
0.292 x dense Adam's 12 B per weight (the released SMET layout, int32 index + int16 step, is 18 B).

The local step follows from the cohort: t_i = global_step - births[cohort_i] (= steps since regrowth,
counting the current one; = the global step for blocks active from the start), and so does the
warm-up min(1, t_i / W). Coefficients are computed once per cohort (a table of <= 256 float32 values per
step, made for many steps at once) and gathered per block. Cohort ids are recycled at topology updates:
a cohort with no members left is freed, and a cohort whose age reaches `merge_age` is merged into
id 0. merge_age is max(W, T) with T the smallest t from which float32 1 - b1^t and 1 - b2^t are
exactly 1 (17,321 for b2 = 0.999; only W without reset_step), so from then on the cohort's bias
corrections and warm-up are exactly those of id 0 (1.0) and the merge changes no bit of any update.
If more than 255 cohorts are ever alive at once (update_every * 255 < merge_age), the id tensor widens
to int16 (then int32): still exact, 1 byte more.

The sparse layers' weights live in one flat buffer, each parameter a view of its rows: the active
values [K, B] in slot order (compact weights), or the dense weights' blocks layer after layer (dense
weights), so the descent is one op per chunk of layers (one for the tiny model). With dense weights each
layer's rows start at CHUNK x its first chunk of the topology's flat position store (< CHUNK rows of
padding per layer), so one decode of the store (SparseTopology.padded_ids, O(active)) gives the rows of
a whole chunk of layers: it is decoded at the chunk's first gradient, each gradient hook gathers with
its layer's part shifted to the layer's own ids (the C kernel's helpers do both in one pass each, see
smet_lab.optim.fused), and the chunk's single index_add_ (or the fused step) uses it as it is
(transient: 4 B per active weight of the chunk, from the chunk's first backward hook to its descent).
A topology update moves surviving entries to their new slots with one O(active) gather per buffer
and chunk of layers; no dense-size tensor is built.
"""

from __future__ import annotations

import math

import torch

from smet_lab.optim.sparse_state import SparseState, nbytes
from smet_lab.sparse.ids import moved_from
from smet_lab.sparse.layer import CHUNK, SparseLayer
from smet_lab.sparse.updater import RegrowEvent

COHORT_DTYPES = (torch.uint8, torch.int16, torch.int32)  # widened only when ids run out
NEVER = 2 ** 62
TABLE_WINDOW = 8192  # steps x cohorts of coefficient tables made at once (8-128 steps, <= 96 KiB)


def row_view(blocks: torch.Tensor) -> torch.Tensor:
    """A [n, B] block view as index_select/index_add_ run it fastest: 1-D when B = 1 (the 2-D form
    with rows of one element is ~15x slower on CPU)."""
    return blocks.view(-1) if blocks.shape[1] == 1 else blocks


def bias_correction_saturation(beta: float) -> int:
    """Smallest t such that the step's float32 `1 - beta ** t` is exactly 1.0 for every t' >= t
    (evaluated with the same torch expression the step uses; NEVER if beyond 2^24 steps)."""
    if beta == 0.0:
        return 1
    estimate = math.ceil(25 * math.log(2) / -math.log(beta))
    hi = min(2 * estimate + 64, 2 ** 24)
    t = torch.arange(1, hi + 1, dtype=torch.float32)
    not_one = ((1 - beta ** t) != 1.0).nonzero()
    if not_one.numel() and int(not_one[-1]) == hi - 1:
        return NEVER
    return int(not_one[-1]) + 2 if not_one.numel() else 1


class CompactState(SparseState):
    keeps_compact_weights = True

    def __init__(self, *args):
        super().__init__(*args)
        self.cohort = torch.zeros(self.offsets[-1], dtype=torch.uint8, device=self.device) \
            if self.needs_age else None
        self.births = torch.zeros(1, dtype=torch.int64) if self.needs_age else None
        self.merge_age = max(self.warmup_steps, *(map(bias_correction_saturation, self.betas)
                                                  if self.reset_step else [0]))
        self.table = self._window = None  # this step's coefficient rows; the tables of the steps around it
        self._betas = torch.tensor([[self.betas[0]], [self.betas[1]]])  # float32, as `b ** t` rounds them
        compact = [layer.compact for layer in self.layers]
        if any(compact) and not all(compact):
            raise ValueError("CompactState: every sparse layer keeps compact weights, or none does")
        self.values = self.dense = None  # the flat weights: compact values [K, B] or dense blocks [N, B]
        # Dense weights: the row of the flat buffer where each layer's blocks start, each layer padded to
        # whole chunks of the position store so that topology.padded_ids are rows of the buffer.
        self.block_base = [CHUNK * c for c in self.topology.chunk_start]
        # One int32 index per chunk of layers (<= ~STEP_CHUNK entries: small enough for the allocator to
        # reuse its memory every step), decoded in one pass at the chunk's first gradient, freed after
        # its descent.
        self._chunk_of = [c for c, (first, last) in enumerate(self.chunks) for _ in range(first, last)]
        self._index: list[torch.Tensor | None] = [None] * len(self.chunks)
        starts = [self.offsets[self.chunks[c][0]] for c in self._chunk_of]  # layer i's part of its chunk's index:
        self._in_index = [slice(self.offsets[i] - s0, self.offsets[i + 1] - s0) for i, s0 in enumerate(starts)]
        self._row_shape = (-1,) if self.grad.shape[1] == 1 else (-1, self.grad.shape[1])  # as _rows views
        self.fused = None  # SMETAdam's fused step (smet_lab.optim.fused), if any: its index helpers
        self._grad_out = [row_view(self.grad[self.rows(i)]) for i in range(len(self.layers))]  # views, made once
        if self.layers and all(compact):
            self.values = self._pack(self.offsets, [layer.n_active for layer in self.layers])
        elif self.layers:
            self.dense = self._pack(self.block_base, [layer.n_blocks for layer in self.layers])

    def _pack(self, starts: list[int], sizes: list[int]) -> torch.Tensor:
        """Move every layer's weight into one flat [rows, B] buffer (layer i's `sizes[i]` rows from row
        starts[i], its parameter a view of them) so that one op descends over all sparse layers. Same
        bytes (dense weights: + < CHUNK zero rows of padding per layer)."""
        flat = torch.zeros(starts[-1], self.grad.shape[1], dtype=self.layers[0].param.dtype, device=self.device)
        for i, layer in enumerate(self.layers):
            rows = flat[starts[i]:starts[i] + sizes[i]]
            rows.copy_(layer.param.detach().view(rows.shape))
            layer.param.data = rows.view(layer.param.shape)
        return flat

    def n_rows(self, layer: SparseLayer) -> int:
        return layer.n_active

    def gather(self, i: int, grad: torch.Tensor, fresh: bool) -> None:
        out = self._grad_out[i]
        grad = grad.view(self._row_shape)  # [k, B] (compact weights) or [n_blocks, B]; 1-D when B = 1
        if self.values is not None:  # the gradient of the values: already in slot order
            out.copy_(grad) if fresh else out.add_(grad)
            return
        c = self._chunk_of[i]
        if self._index[c] is None:
            self._decode(c)
        ids = self._index[c][self._in_index[i]]
        if self.fused is not None and self.fused.gather_rows(grad, ids, self.block_base[i], out, fresh):
            return
        if self.block_base[i]:  # the layer's own ids, a transient copy (fewer ops than shifting in place and back)
            ids = ids - self.block_base[i]
        torch.index_select(grad, 0, ids, out=out) if fresh else out.add_(grad.index_select(0, ids))

    def _decode(self, c: int) -> None:
        """Decode the active block ids of chunk c's layers, in one pass, into its index: their rows of the
        flat dense weights."""
        first, last = self.chunks[c]
        index = None if self.fused is None else self.fused.decode_rows(*self.topology.store(first, last),
                                                                       self.block_base[first])
        if index is None:
            index = self.topology.padded_ids(first, last)  # rows - block_base[first]
            if self.block_base[first]:
                index.add_(self.block_base[first])
        self._index[c] = index

    def step_index(self, first: int, last: int) -> torch.Tensor:
        """The rows of the flat dense weights that hold the active blocks of the chunk of layers
        first..last-1 (one of self.chunks)."""
        c = self._chunk_of[first]
        if self._index[c] is None:  # no gradient reached the chunk
            self._decode(c)
        return self._index[c]

    def _forget_index(self, chunks) -> None:
        for c in chunks:
            self._index[c] = None

    def forget_index(self, first: int) -> None:
        """After the descent of the chunk of layers that starts at `first` (its index dies with it)."""
        self._forget_index([self._chunk_of[first]])

    def descend(self, first: int, last: int, update: torch.Tensor, lr: float) -> None:
        if self.values is not None:
            self.values[self.span(first, last)].add_(update, alpha=-lr)
        else:
            row_view(self.dense).index_add_(0, self.step_index(first, last), row_view(update), alpha=-lr)
            self.forget_index(first)

    def weights(self, first: int, last: int) -> torch.Tensor:
        if self.values is not None:
            return self.values[self.span(first, last)]
        return self.dense.index_select(0, self.step_index(first, last))

    # ------------------------------------------------------------------------- local step
    def begin_step(self, step: int, warming: bool) -> None:
        self.step, self.warming = step, warming
        if self.cohort is None:
            self.table = None
            return
        if self._window is None or not 0 <= step - self._window[0] < len(self._window[3]):
            self._window = self._cohort_tables(step)
        first, rows1, rows2, warm, ones = self._window
        k = step - first
        self.table = (rows1[k], rows2[k], warm[k] if warming else None)  # 1-D [C] rows: contiguous gathers
        self.table_ones = (*ones[k][:2], ones[k][2] or not warming)

    def fused_table(self) -> torch.Tensor:
        """[3, C] (or [3, 1] without cohorts) for the fused step (smet_lab.optim.fused), after begin_step: per
        cohort the bias corrections (the global ones without reset_step) and the warm-up factor (1
        while not warming)."""
        bc1, bc2 = self.global_bias_corrections()
        if self.table is None:
            return torch.tensor([[bc1], [bc2], [1.0]], device=self.device)
        row1, row2, warm = self.table
        table = torch.stack([row1, row2, torch.ones_like(row1) if warm is None else warm])
        if not self.reset_step:
            table[0], table[1] = bc1, bc2
        return table

    def coefficients(self, sl: slice):
        if self.table is None:  # neither a local step nor a warm-up
            return (*self.global_bias_corrections(), None)
        one_cohort, cohort = self.table[0].numel() == 1, None

        def column(j: int):
            # A contiguous [n, 1] gather per coefficient; with a single cohort its value broadcasts, and a
            # column of ones is the float 1.0 (x / 1.0 == x): the same IEEE divisions either way.
            nonlocal cohort
            if self.table_ones[j]:
                return 1.0
            if one_cohort:
                return self.table[j][:1]
            if cohort is None:
                cohort = self.cohort[sl].long()  # (int64 converts ~4x faster than int32 from uint8 on CPU)
            return self.table[j].index_select(0, cohort).unsqueeze(1)  # (1-D: ~15x faster than [C, 1] rows)

        bc1, bc2 = (column(0), column(1)) if self.reset_step else self.global_bias_corrections()
        return bc1, bc2, column(2) if self.warming else None

    def _cohort_tables(self, first: int):
        """The per-cohort coefficients of the steps first, first + 1, ... (K ~ TABLE_WINDOW // C of them,
        computed at once and kept until the cohorts change): first, then per step k (views of [K, C]
        tables) the rows 1 - b1^t, 1 - b2^t and the warm-up factor min(1, t/W) (1 for id 0, i.e. blocks
        active from the start or merged, and for free ids), t = the local step, and which rows are all 1.
        warmup_kind="released": t is the released code's counter (local step + 1 for regrown cohorts,
        ids > 0) and id 0 is warmed too. A merge stays exact: at age >= merge_age >= W and T both
        counters give bias corrections and warm-up factors of exactly 1.
        Bit for bit the float32 torch ops over each step's C-vector of local steps: the powers are one
        pow over a [K, C] view whose rows TensorIterator cannot merge, so every row runs pow's
        vectorised and scalar lanes as a C-vector does. Per step this leaves no torch op on C values
        (~6 of them cost ~0.1 ms on the tiny model, as much as its step's arithmetic)."""
        released, W, C = self.warmup_kind == "released", self.warmup_steps, self.births.numel()
        steps = max(8, min(128, TABLE_WINDOW // C))
        ages = (first - self.births) + torch.arange(steps).unsqueeze(1)  # [K, C] int64
        if released:
            ages += torch.arange(C) > 0
        t = torch.empty(steps, C + 1)[:, :C].copy_(ages)  # a padding column: TensorIterator cannot merge rows
        bc = 1 - torch.pow(self._betas.view(2, 1, 1), t)
        warm = torch.ones_like(t)
        if W > 0:
            growing = (t < W) & ((self.births > 0) | released)
            warm = torch.where(growing, t / W, warm)
        ones = torch.stack([(bc[0] == 1).all(1), (bc[1] == 1).all(1), (warm == 1).all(1)], 1).tolist()
        bc, warm = bc.to(self.device), warm.to(self.device)
        return first, bc[0].unbind(), bc[1].unbind(), warm.unbind(), ones

    # --------------------------------------------------------------------------- regrowth
    def make_room(self, events: list[RegrowEvent]) -> torch.Tensor:
        """Permute the state from the old slot order to the new one: one O(k) gather per buffer and chunk
        of layers (survivors keep their relative order in every layer and each layer keeps its count,
        so the r-th surviving row of a chunk moves to its r-th surviving row). Events without
        `old_slots` have them derived, O(k log k). No dense-size tensor."""
        self._forget_index(range(len(self.chunks)))  # stale once the topology moves
        moves, rows = {}, []
        for e in events:
            base = self.offsets[e.layer]
            old = e.old_slots.to(self.device, torch.long) if e.old_slots is not None else self._old_slots(e)
            new = e.slots.to(self.device, torch.long) + base
            moves.setdefault(self._chunk_of[e.layer], []).append((old + base, new))
            rows.append(new)
        for c, pairs in moves.items():
            sl = self.span(*self.chunks[c])
            old, new = (torch.cat(part).sub_(sl.start) for part in zip(*pairs))
            source = moved_from(sl.stop - sl.start, old, new).clamp_(min=0)  # regrown rows: any, reset by regrow
            for buf in (self.grad, self.exp_avg, self.exp_avg_sq, self.cohort):
                if buf is not None:
                    buf[sl].copy_(buf[sl].index_select(0, source))
        return torch.cat(rows)

    def _old_slots(self, e: RegrowEvent) -> torch.Tensor:
        """Where e.old_blocks were in the layer's previous slot order (its new order is the topology's)."""
        ids = self.layers[e.layer].block_ids().long()
        slots = e.slots.to(self.device, torch.long)
        is_new = torch.zeros(ids.numel(), dtype=torch.bool, device=self.device).index_fill_(0, slots, True)
        old_blocks = e.old_blocks.to(self.device, torch.long)
        old_ids = torch.cat([ids[~is_new], old_blocks]).sort().values
        if old_ids.numel() != ids.numel() or not bool((ids[slots] == e.new_blocks.to(self.device)).all()):
            raise ValueError(f"regrow event for layer {self.layers[e.layer].name} does not match its topology")
        return torch.searchsorted(old_ids, old_blocks)

    def restart_clock(self, rows: torch.Tensor, step: int) -> None:
        if self.cohort is not None:
            self.cohort[rows] = 0  # counted in id 0 while ids are recycled, then given the new id
            new_id = self._new_cohort(step)  # may re-map or widen self.cohort
            self.cohort[rows] = new_id

    def _new_cohort(self, step: int) -> int:
        """A free cohort id for blocks grown at `step`. Recycles ids first: cohorts old enough to be
        exact copies of id 0 are merged into it, and cohorts without members are freed."""
        self._window = None  # the coefficient tables follow the births
        births = self.births
        ids = torch.arange(births.numel())
        merge = (ids > 0) & (births >= 0) & (step - births >= self.merge_age)
        if merge.any():
            remap = torch.where(merge, 0, ids).to(self.cohort.dtype).to(self.device)
            self.cohort = remap.index_select(0, self.cohort.int())
            births[merge] = -1
        members = torch.bincount(self.cohort.int(), minlength=births.numel()).cpu()
        births[(ids > 0) & (members == 0)] = -1
        free = ((ids > 0) & (births < 0)).nonzero()
        if free.numel():
            new = int(free[0])
        else:
            new = births.numel()
            if new > torch.iinfo(self.cohort.dtype).max:  # more live cohorts than ids: widen (exact)
                self.cohort = self.cohort.to(COHORT_DTYPES[COHORT_DTYPES.index(self.cohort.dtype) + 1])
            births = self.births = torch.cat([births, torch.full((1,), -1, dtype=torch.int64)])
        births[new] = step
        return new

    # ------------------------------------------------------------------------- accounting
    def bytes_by_role(self) -> dict[str, int]:
        return {**super().bytes_by_role(), "sparse/cohort": nbytes(self.cohort),
                "sparse/cohort_births": nbytes(self.births)}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "cohort": None if self.cohort is None else self.cohort.clone(),
                "births": None if self.births is None else self.births.clone()}

    def matches(self, state: dict) -> bool:
        return super().matches(state) and (state["cohort"] is None) == (self.cohort is None)

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.cohort is not None:
            self.cohort = state["cohort"].to(self.device).clone()  # its dtype may have widened
            self.births = state["births"].cpu().clone()
            self._window = None
