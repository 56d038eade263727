"""One sparse layer: its weight and its active blocks, kept as a chunked position list.

A sparse layer's weight is kept in one of two ways (`sparsity.weights`):

    dense    a dense tensor whose inactive entries are exactly zero (the forward is a plain matmul)
    compact  only the active blocks' values, [k, B] in slot order; the dense weight exists only
             inside one layer's forward and backward (smet_lab.sparse.compact_linear)

The active blocks (B consecutive weights of the row-major flattened weight each) are stored as a
*chunked position list*:

    offsets : uint8 [k]            id % 256 of every active block, in ascending id order
    counts  : int16 [ceil(n/256)]  how many active blocks each chunk of 256 consecutive blocks holds

i.e. 1 byte per active block + 2 bytes per 256 blocks (1.03 B per active block at density 0.25, B=1),
instead of an int32 id per active block. `block_ids()` (int32 ids, ascending) *derives* them on
demand in O(active) work and allocates each time: repeat each chunk's index by its count, times 256,
plus the offsets. Writing into that tensor changes nothing; call `set_block_ids(ids)` or
`replace(old, new)` to change the topology. A SparseTopology (smet_lab.sparse.topology) keeps all its
layers' lists in one flat store (each layer's offsets and counts are views), so it decodes and
replaces a run of layers in one pass.

The slot order that the compact optimizer state follows is the ascending block-id order. A topology
update therefore moves surviving entries between slots; `replace` returns where the new blocks land
and the optimizer re-orders its per-slot state with an O(active) gather (no dense-size tensors).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from smet_lab.sparse.ids import blocks_taken, flatnonzero, moved_from

CHUNK_BITS = 8
CHUNK = 1 << CHUNK_BITS  # blocks per chunk: an in-chunk offset fits in a uint8


def decode(offsets: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """int32 ids from a chunked position list (see the module docstring): chunk j's blocks are
    CHUNK * j + offset. O(k), a new tensor."""
    chunk_of = torch.repeat_interleave(counts.int(), output_size=offsets.numel())  # int32 chunk per block
    return chunk_of.mul_(CHUNK).add_(offsets)


def encode(sorted_ids: torch.Tensor, n_chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked position list (uint8 offsets, int16 counts) of ascending ids in n_chunks chunks."""
    counts = torch.bincount(sorted_ids >> CHUNK_BITS, minlength=n_chunks)
    return (sorted_ids & (CHUNK - 1)).to(torch.uint8), counts.to(torch.int16)


def swap_blocks(n_blocks: int, active: torch.Tensor, old: torch.Tensor,
                new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 (ids, ranks): the ascending ids of `active` without `old` and with `new`, and where each of
    `new` lands among them. O(len + n_blocks), no sort: through a transient 1-byte-per-block map and its
    int32 running count (5 B per block)."""
    taken = blocks_taken(n_blocks, active).index_fill_(0, old, False).index_fill_(0, new, True)
    ranks = taken.cumsum(0, dtype=torch.int32).index_select(0, new).long() - 1
    return flatnonzero(taken), ranks


class SparseLayer:
    """One sparse weight and its active blocks (chunked position list, see the module docstring).

    `param` is what the optimizer trains: the dense weight, or with compact weights the active values
    [k, B] (then `compact` is True and `shape` is the dense weight's shape)."""

    def __init__(self, name: str, param: nn.Parameter, block_size: int, block_ids: torch.Tensor):
        self.name = name
        self.param = param
        self.shape = param.shape
        self.compact = False
        self.block_size = block_size
        self.n_chunks = -(-self.n_blocks // CHUNK)
        self.in_store = False  # True once offsets and counts are views of a SparseTopology's flat store
        self.set_block_ids(block_ids)
        self._dense_grad_hooks: OrderedDict = OrderedDict()  # RemovableHandle needs a weak-referenceable dict

    def __repr__(self) -> str:
        return f"SparseLayer({self.name!r}, {tuple(self.shape)}, block_size={self.block_size}, n_active={self.n_active})"

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def n_blocks(self) -> int:
        return self.numel // self.block_size

    @property
    def n_active(self) -> int:
        return self.offsets.numel()

    @property
    def density(self) -> float:
        return self.n_active / self.n_blocks

    # ------------------------------------------------------------------------ position store
    def block_ids(self) -> torch.Tensor:
        """int32 [k]: the active block ids in ascending (= slot) order; derived (a new tensor), O(k)."""
        return decode(self.offsets, self.counts)

    def set_block_ids(self, ids: torch.Tensor) -> None:
        """Set the active blocks (any order, distinct ids)."""
        ids = ids.to(device=self.param.device, dtype=torch.long).sort().values
        if ids.numel() and (ids[0] < 0 or ids[-1] >= self.n_blocks or (ids[1:] == ids[:-1]).any()):
            raise ValueError(f"{self.name}: active block ids must be distinct and in [0, {self.n_blocks})")
        self._encode(ids)

    def _encode(self, sorted_ids: torch.Tensor) -> None:
        offsets, counts = encode(sorted_ids, self.n_chunks)
        if not self.in_store:
            self.offsets, self.counts = offsets, counts
        elif offsets.numel() != self.n_active:
            raise ValueError(f"{self.name}: a layer of a topology keeps its number of active blocks "
                             f"({self.n_active}), got {offsets.numel()}")
        else:  # in place: they are views of the topology's flat position store
            self.offsets.copy_(offsets)
            self.counts.copy_(counts)

    def index_bytes(self) -> int:
        """Bytes of the persistent position store (offsets + chunk counts)."""
        return self.offsets.numel() * self.offsets.element_size() + self.counts.numel() * self.counts.element_size()

    @torch.no_grad()
    def replace(self, old_blocks: torch.Tensor, new_blocks: torch.Tensor, old_slots: torch.Tensor | None = None,
                active: torch.Tensor | None = None, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Deactivate `old_blocks` (active; `old_slots` = their positions in block_ids(), if known) and activate
        `new_blocks` (as many, inactive, distinct; check=False trusts the caller on all this); `active`:
        block_ids() as int64 if the caller has them. The pruned weights are removed and the regrown ones
        start at zero (compact weights follow the new slot order). Returns int32 (slots, old_slots): the
        positions in the new block_ids() that hold `new_blocks` (in their order), and the positions
        `old_blocks` held in the old one. Surviving blocks keep their relative order, so the two determine
        where every survivor moved (`moved_from`). O(k + n_blocks), no sort (swap_blocks: 5 B per block,
        one layer at a time). SparseTopology.replace does this for several layers at once."""
        ids = self.block_ids().long() if active is None else active
        device = ids.device
        old_blocks, new_blocks = old_blocks.to(device, torch.long), new_blocks.to(device, torch.long)
        if old_slots is None:
            old_slots = torch.searchsorted(ids, old_blocks)
        old_slots = old_slots.to(device, torch.long)
        if check and (old_blocks.numel() != new_blocks.numel() or not bool((ids[old_slots] == old_blocks).all())):
            raise ValueError(f"{self.name}: old_blocks must be active blocks, as many as new_blocks")
        new_ids, slots = swap_blocks(self.n_blocks, ids, old_blocks, new_blocks)
        if check and new_ids.numel() != ids.numel():
            raise ValueError(f"{self.name}: new_blocks must be distinct and inactive")
        del ids
        self._encode(new_ids)
        self.follow(old_blocks, new_blocks, old_slots, slots)
        return slots.int(), old_slots.int()

    @torch.no_grad()
    def follow(self, old_blocks: torch.Tensor, new_blocks: torch.Tensor, old_slots: torch.Tensor,
               slots: torch.Tensor) -> None:
        """The weights follow a replace (int64 arguments, see there): dense weights zero the pruned and
        regrown blocks; compact values move to the new slot order, the regrown at zero."""
        if not self.compact:
            self.zero_blocks(torch.cat([old_blocks, new_blocks]))
            return
        values = self.param.detach()
        values.copy_(values.index_select(0, moved_from(self.n_active, old_slots, slots).clamp_(min=0)))
        values.index_fill_(0, slots, 0.0)

    @torch.no_grad()
    def zero_blocks(self, ids: torch.Tensor) -> None:
        """Set the weights of blocks `ids` to zero (dense weights)."""
        flat = self.blocks()
        (flat.view(-1) if self.block_size == 1 else flat).index_fill_(0, ids.to(flat.device, torch.long), 0.0)

    def gather(self, tensor: torch.Tensor | None = None, ids: torch.Tensor | None = None) -> torch.Tensor:
        """[len(ids), B] values of the weight (or a dense-shaped tensor) at blocks `ids` (default: the
        active blocks, in slot order). Inactive blocks read as zero."""
        if tensor is None and self.compact:
            values = self.param.detach()
            if ids is None:
                return values
            active = self.block_ids().long()  # never empty: a layer keeps >= 1 active block
            ids = ids.to(active.device, torch.long)
            slots = torch.searchsorted(active, ids).clamp_(max=active.numel() - 1)
            return values.index_select(0, slots) * (active[slots] == ids).unsqueeze(1)
        blocks = self.blocks(tensor)
        ids = self.block_ids() if ids is None else ids
        if self.block_size == 1:  # 1-D index_select is ~2x faster than over rows of one element
            return blocks.view(-1).index_select(0, ids).unsqueeze(1)
        return blocks.index_select(0, ids)

    def materialize(self, values: torch.Tensor | None = None, ids: torch.Tensor | None = None) -> torch.Tensor:
        """A new dense weight tensor: `values` ([k, B], default the layer's own) at the active blocks
        (`ids`: block_ids() as int64, if the caller has them), zeros elsewhere."""
        values = self.param.detach() if values is None else values
        dense = values.new_zeros(self.n_blocks, self.block_size)
        ids = self.block_ids().long() if ids is None else ids
        if self.block_size == 1:  # 1-D index_copy_ is faster than over rows of one element
            dense.view(-1).index_copy_(0, ids, values.view(-1))
        else:
            dense.index_copy_(0, ids, values)
        return dense.view(self.shape)

    # --------------------------------------------------------------------------------- views
    def blocks(self, tensor: torch.Tensor | None = None) -> torch.Tensor:
        """View of the weight (or a same-shaped tensor) as [n_blocks, block_size]."""
        if tensor is None and self.compact:
            raise RuntimeError(f"{self.name} keeps compact weights: there is no dense weight to view")
        return (self.param.detach() if tensor is None else tensor).view(-1, self.block_size)

    # ------------------------------------------------------------------------ dense gradient
    def register_dense_grad_hook(self, fn) -> RemovableHandle:
        """Call fn(dense weight gradient) whenever backward forms it (once per micro-batch), dense or
        compact weights alike; the hook may not modify it."""
        if not self.compact:
            return self.param.register_hook(fn)
        handle = RemovableHandle(self._dense_grad_hooks)
        self._dense_grad_hooks[handle.id] = fn
        return handle

    def dense_grad_formed(self, grad: torch.Tensor) -> None:
        """Compact weights: backward formed this layer's dense weight gradient."""
        for fn in self._dense_grad_hooks.values():
            fn(grad)

    def make_compact(self) -> nn.Parameter:
        """Switch to compact weights: `param` becomes the active values (a new parameter, the dense
        weight is no longer referenced here). Returns it."""
        if not self.compact:
            self.param = nn.Parameter(self.gather().clone())
            self.compact = True
        return self.param

    def active_mask(self) -> torch.Tensor:
        """Dense bool mask [n_blocks] (transient; used by tests, masked baselines and reports)."""
        mask = torch.zeros(self.n_blocks, dtype=torch.bool, device=self.offsets.device)
        mask[self.block_ids().long()] = True
        return mask

    @torch.no_grad()
    def apply_mask(self) -> None:
        """Zero every inactive entry (the invariant the optimizer relies on); compact weights have none."""
        if self.compact:
            return
        keep = self.active_mask().unsqueeze(1)
        self.blocks().mul_(keep)
