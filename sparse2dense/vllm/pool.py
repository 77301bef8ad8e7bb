"""The drafter's own small paged KV cache: each request's selected prompt entries, then its
committed generated tokens, then the current round's drafts.

It has the layout of vLLM's CPU cache (:mod:`.paged`), so draft steps run on vLLM's own attention
kernel. Blocks come from a free list sized once at start; a request takes blocks as its draft
cache grows and gives them back when it leaves. Rolling back rejected drafts is moving a length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .paged import split_caches


@dataclass(slots=True)
class DraftRow:
    """One request's draft cache.

    Attributes:
        blocks: pool block ids, in column order.
        n_selected: columns ``[0, n_selected)`` hold the selected prompt entries (per KV head).
        prompt_len: the request's prompt length; column ``n_selected + (p - prompt_len)`` holds
            generated position ``p``.
        committed: positions ``< committed`` are in the cache with the verifier's K/V.
        last_drafts: drafts proposed last round (for acceptance counts).
    """

    blocks: list[int]
    n_selected: int
    prompt_len: int
    committed: int
    last_drafts: int = 0
    stats: dict = field(default_factory=lambda: {"drafted": 0, "accepted": 0, "rounds": 0})

    def column(self, position: int) -> int:
        return self.n_selected + position - self.prompt_len


class DraftPool:
    """``num_blocks`` blocks of ``block_size`` entries for every attention layer.

    Attributes:
        kv: list of per-layer tensors ``[num_blocks, Hkv, block_size, 2 * D]``.
    """

    def __init__(self, num_layers: int, num_blocks: int, num_kv_heads: int, block_size: int,
                 head_size: int, dtype: torch.dtype) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.kv = [torch.zeros(num_blocks, num_kv_heads, block_size, 2 * head_size, dtype=dtype)
                   for _ in range(num_layers)]
        self.caches = [split_caches(kv) for kv in self.kv]  # (key_cache, value_cache) per layer
        self.free = list(range(num_blocks - 1, -1, -1))
        self.rows: dict[str, DraftRow] = {}

    def blocks_for(self, columns: int) -> int:
        return -(-columns // self.block_size)

    def open(self, req_id: str, n_selected: int, prompt_len: int) -> DraftRow | None:
        """A new row with room for its selection, or None when the pool is full."""
        self.close(req_id)
        need = self.blocks_for(n_selected)
        if need > len(self.free):
            return None
        row = DraftRow([self.free.pop() for _ in range(need)], n_selected, prompt_len, prompt_len)
        self.rows[req_id] = row
        return row

    def reserve(self, row: DraftRow, columns: int) -> bool:
        """Grow ``row`` to hold ``columns`` columns; False (nothing taken) when the pool is short."""
        need = self.blocks_for(columns) - len(row.blocks)
        if need <= 0:
            return True
        if need > len(self.free):
            return False
        row.blocks.extend(self.free.pop() for _ in range(need))
        return True

    def close(self, req_id: str) -> None:
        row = self.rows.pop(req_id, None)
        if row is not None:
            self.free.extend(row.blocks)

    def slots(self, row: DraftRow, columns: torch.Tensor) -> torch.Tensor:
        """Pool slots ``[N]`` of ``row``'s ``columns`` ``[N]``."""
        table = torch.tensor(row.blocks, dtype=torch.long)
        return table[columns // self.block_size] * self.block_size + columns % self.block_size

    def block_table(self, rows: list[DraftRow]) -> torch.Tensor:
        """int32 ``[R, max_blocks]`` block table of ``rows`` (padded with block 0)."""
        width = max(len(r.blocks) for r in rows)
        table = torch.zeros(len(rows), width, dtype=torch.int32)
        for i, r in enumerate(rows):
            table[i, : len(r.blocks)] = torch.tensor(r.blocks, dtype=torch.int32)
        return table
