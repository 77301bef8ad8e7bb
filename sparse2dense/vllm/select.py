"""Selection of the prompt KV entries a request's drafter keeps, from vLLM's paged cache.

As in the paper (and :mod:`sparse2dense.selection`), the candidates are scored by the attention
that the prompt's last tokens pay them during prefill, averaged over those queries and summed over
the query heads of each KV head (GQA). Sink tokens and the last prompt tokens are always kept.
Selection is per layer and per KV head.
"""

from __future__ import annotations

import torch

from . import paged
from .settings import DraftSettings


def prompt_keys(kv: torch.Tensor, block_table: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """The prompt's keys as ``[Hkv, D, P]``, gathered a whole block at a time."""
    bs = kv.shape[2]
    blocks = block_table[: -(-prompt_len // bs)]
    kt = paged.key_view(kv).index_select(0, blocks)  # [nb, Hkv, D, bs]
    nb, hk, d, _ = kt.shape
    return kt.permute(1, 2, 0, 3).reshape(hk, d, nb * bs)[:, :, :prompt_len]


def select_positions(query: torch.Tensor, keys_t: torch.Tensor, query_positions: torch.Tensor,
                     scale: float, settings: DraftSettings) -> torch.Tensor:
    """Prompt positions to keep, per KV head.

    Args:
        query: ``[W, Hq, D]``: queries (RoPE applied) of the scoring tokens.
        keys_t: ``[Hkv, D, P]``: the prompt's keys (RoPE applied), transposed.
        query_positions: LongTensor ``[W]``: each query's position (its causal horizon).

    Returns:
        LongTensor ``[Hkv, K]`` with ``K = min(budget, P)``, ascending per head.
    """
    w, hq, d = query.shape
    hk, _, p = keys_t.shape
    k = min(settings.budget, p)
    if k == p:
        return torch.arange(p).expand(hk, p).clone()
    g = hq // hk
    q = query.view(w, hk, g, d).permute(1, 2, 0, 3).reshape(hk, g * w, d)
    s = torch.matmul(q, keys_t).float() * scale  # [Hkv, G*W, P]
    allowed = torch.arange(p)[None, :] <= query_positions[:, None]  # [W, P]
    s = s.view(hk, g, w, p).masked_fill(~allowed, float("-inf"))
    score = torch.softmax(s, dim=-1).sum(dim=(1, 2))  # [Hkv, P]
    score[:, : settings.sink_tokens] = float("inf")
    score[:, max(0, p - settings.keep_last):] = float("inf")
    return score.topk(k, dim=-1).indices.sort(dim=-1).values


def select_into(pool_kv, slots: torch.Tensor, kv: torch.Tensor, block_table: torch.Tensor,
                query: torch.Tensor, query_positions: torch.Tensor, prompt_len: int, scale: float,
                settings: DraftSettings, isa: str) -> None:
    """Select one layer's entries of one request and write them into its draft cache.

    Args:
        pool_kv: the draft pool's ``(key_cache, value_cache)`` for this layer. slots: LongTensor
            ``[K]``: columns ``0..K-1`` of the request's draft cache.
        kv: vLLM's cache for this layer; block_table: the request's blocks.
        query: ``[W, Hq, D]`` scoring queries at ``query_positions`` ``[W]``.
    """
    chosen = select_positions(query, prompt_keys(kv, block_table, prompt_len), query_positions, scale, settings)
    k, v = paged.gather(kv, block_table, chosen)  # [K, Hkv, D] each
    paged.write(pool_kv, k, v, slots, isa)
