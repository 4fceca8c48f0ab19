"""The engine's paged KV cache: a sequence's cross-layer blocks (`PagedKv`, views of the arena handed out
by the KV policy) and where one forward pass writes and reads its rows' K and V (`KvBatch`: index tensors
built once per pass from the block tables, so batched attention does the same few device operations per
layer whatever the batch; blocks of different storages take a per-row fallback with the same result).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from tangram_sim.real.engine import EngineConfig

__all__ = ["KvBatch", "PagedKv"]


class PagedKv:
    """One sequence's KV cache: a list of cross-layer block views of the arena.

    `blocks` grows by appending (or is replaced by a new list); the block table that batched attention
    needs (`table`) is extended by the new blocks only. Overwriting an entry in place is not supported.
    """

    def __init__(self, block_tokens: int) -> None:
        self.block_tokens = block_tokens  # tokens per block T
        self.blocks: list[torch.Tensor] = []  # each [L, 2, T, KV, hd], a view of the arena
        self._seen: list[torch.Tensor] = self.blocks  # the list whose first len(_offsets) blocks are known
        self._offsets: list[int] = []  # element offset of each known block in its storage
        self._storage: tuple[Any, ...] | None = None  # what every known block shares, None: they do not

    @property
    def capacity(self) -> int:
        return len(self.blocks) * self.block_tokens

    def table(self) -> tuple[tuple[Any, ...] | None, list[int]]:
        """(storage key, element offset of each block): the key is None unless every block is a
        contiguous view of one storage, in which case it is (device, storage address, dtype, shape).

        Cached: a step costs Python work per new block, not per block held."""
        blocks, offsets = self.blocks, self._offsets
        if blocks is not self._seen or len(offsets) > len(blocks):
            self._seen = blocks  # a new list, or one that shrank: start over
            offsets.clear()
        for blk in blocks[len(offsets) :]:
            key = (blk.device, blk.untyped_storage().data_ptr(), blk.dtype, tuple(blk.shape))
            if not offsets:
                self._storage = key
            if key != self._storage or not blk.is_contiguous():
                self._storage = None
            offsets.append(blk.storage_offset())
        return (self._storage if blocks else None), offsets

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v: [S, KV, hd] at token positions start..start+S-1."""
        T = self.block_tokens
        pos, end = start, start + k.shape[0]
        if end > self.capacity:
            raise RuntimeError(f"KV holds {self.capacity} tokens, {end} needed (allocate blocks first)")
        while pos < end:
            b, s = divmod(pos, T)
            n = min(T - s, end - pos)
            block = self.blocks[b]
            block[layer, 0, s : s + n] = k[pos - start : pos - start + n]
            block[layer, 1, s : s + n] = v[pos - start : pos - start + n]
            pos += n

    def read(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of the first `length` tokens: [length, KV, hd] each (gathered from the blocks)."""
        used = self.blocks[: -(-length // self.block_tokens)]
        kv = torch.cat([blk[layer] for blk in used], dim=1) if len(used) > 1 else used[0][layer]
        return kv[0, :length], kv[1, :length]


class KvBatch:
    """Where one forward pass writes and reads the KV of its rows; built once, used by every layer.

    Row b holds `lengths[b]` new tokens at positions starts[b] .. ends[b] - 1 (ends = starts + lengths)
    and attends to keys 0 .. ends[b] - 1, padded to T = max(ends). When every block is a view of one
    storage, a token's K (or V) in layer l is `row` = KV * hd consecutive elements of that storage, so
    gathers and writes index a window view whose i-th row is elements i .. i + row - 1: one index per
    token instead of one per element. Rows of the window overlap, but the rows ever written are distinct
    tokens' K or V, which never share an element.
    """

    def __init__(
        self,
        c: EngineConfig,
        caches: Sequence[PagedKv],
        starts: Sequence[int],
        lengths: Sequence[int],
        S: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        B = len(caches)
        self.B, self.S = B, S  # rows, padded width
        self.caches, self.starts, self.lengths = caches, starts, lengths  # for the fallback
        ends = [s + n for s, n in zip(starts, lengths)]
        for cache, end in zip(caches, ends):
            if end > cache.capacity:
                raise RuntimeError(f"KV holds {cache.capacity} tokens, {end} needed (allocate blocks first)")
        self.T = T = max(ends)
        # few and cheap tensor ops: this runs once per step, and a small model's step is ~1 ms on a CPU
        t = torch.arange(T, device=device)
        last = torch.tensor([e - 1 for e in ends], device=device).view(B, 1)  # each row's last real token
        pos = last  # [B, S] position of each query (S = 1: a row's one token is its last)
        if S > 1:
            pos = torch.tensor(starts, device=device).view(B, 1) + torch.arange(S, device=device)
        # query s of row b sees keys 0 .. starts[b] + s, all real (< ends[b]) unless the query is padding,
        # whose output no real token reads; key 0 is always visible, so no row is empty (that gives NaN)
        hidden = t > pos.view(B, S, 1)  # [B, S, T]
        G = c.heads // c.kv_heads
        if S > 1 and G > 1:  # the queries of Attention's grouped layout: G * S per KV head
            hidden = hidden.view(B, 1, S, T).expand(B, G, S, T).reshape(B, G * S, T)
        # additive, made once here rather than by SDPA in every layer
        self.mask = torch.zeros(B, 1, hidden.shape[1], T, dtype=dtype, device=device)
        self.mask.masked_fill_(hidden.unsqueeze(1), float("-inf"))
        self.valid: torch.Tensor | None = None  # rows of [B * S] holding real tokens, None: all
        if any(n != S for n in lengths):
            grid = torch.arange(S) < torch.tensor(lengths).view(B, 1)  # on the host: no device sync
            self.valid = grid.flatten().nonzero().squeeze(1).to(device)
        self.window: torch.Tensor | None = None
        tables = [cache.table() for cache in caches]
        key = tables[0][0]
        bt = caches[0].block_tokens
        if (
            key is None
            or key[3] != c.kv_block_shape(bt)
            or any(k != key for k, _ in tables)
            or any(cc.block_tokens != bt for cc in caches)
        ):
            return  # fallback: per-row writes and reads
        first = caches[0].blocks[0]
        row = c.kv_heads * c.head_dim
        n = first.untyped_storage().nbytes() // first.element_size()
        self.window = first.as_strided((n - row + 1, row), (1, 1), 0)
        self.layer_stride = 2 * bt * row  # elements from one layer of a block to the next
        nb = max(len(o) for _, o in tables)
        table = torch.tensor([o + [0] * (nb - len(o)) for _, o in tables], device=device)  # [B, nb]
        p = torch.minimum(t, last)  # [B, T]; padded keys read the row's last real token, never garbage
        keys = table.gather(1, p // bt) + p % bt * row  # element offset of each key's K in layer 0
        self.read = torch.stack((keys, keys + bt * row), dim=1).view(-1)  # [B * 2 * T]: K and V rows
        new = keys.gather(1, pos if self.valid is None else pos.clamp(max=T - 1)).view(-1)  # [B * S]
        if self.valid is not None:
            new = new.index_select(0, self.valid)
        self.write = torch.stack((new, new + bt * row), dim=1).view(-1)  # [N * 2]

    def unpack(self, t: torch.Tensor) -> torch.Tensor:
        """Packed rows [N, ...] (the real tokens, `valid`) to the padded grid [B, S, ...], zeros elsewhere."""
        out = t.new_zeros(self.B * self.S, *t.shape[1:])
        return out.index_copy_(0, self.valid, t).view(self.B, self.S, *t.shape[1:])

    def store_and_gather(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the rows' new k, v [B, S, KV, hd] (real tokens only); return K, V [B, KV, T, hd]."""
        B, S, KV, hd = k.shape
        T = self.T
        if self.window is not None:
            off = layer * self.layer_stride
            new = torch.stack((k, v), dim=2).view(B * S, 2 * KV * hd)
            if self.valid is not None:
                new = new.index_select(0, self.valid)
            # index_copy_ / index_select: a row copy per index (advanced indexing is ~10x slower on the CPU)
            self.window.index_copy_(0, self.write + off, new.view(-1, KV * hd).to(self.window.dtype))
            kv = self.window.index_select(0, self.read + off).to(k.dtype).view(B, 2, T, KV, hd)
            return kv[:, 0].transpose(1, 2), kv[:, 1].transpose(1, 2)
        kk = k.new_zeros(B, T, KV, hd)
        vv = v.new_zeros(B, T, KV, hd)
        for b, (cache, start, n) in enumerate(zip(self.caches, self.starts, self.lengths)):
            cache.write(layer, start, k[b, :n], v[b, :n])
            kk[b, : start + n], vv[b, : start + n] = cache.read(layer, start + n)
        return kk.transpose(1, 2), vv.transpose(1, 2)
