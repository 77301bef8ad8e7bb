"""Drafter selection: which prompt KV entries the sparse drafter keeps, per layer and KV head.

After prefill, every **kept** prompt token stays in the draft cache, and the remaining budget is
filled with the best-scoring **candidates**:

* ``paper`` policy: a candidate's score is the attention it receives from the scoring queries (the
  latest kept tokens: the question, the instruction) averaged over those queries and summed over
  the query heads that share its KV head (GQA).
* ``last`` policy: the same score, from the queries of the last few prompt tokens only (whatever
  they are), as SnapKV-style observation windows do.
* ``streaming`` policy: a candidate's score is its column, so the most recent candidates are kept
  (with the leading sink tokens being kept tokens, this is StreamingLLM's sinks + window).

Scores are computed from query states captured during prefill (:class:`ScoreQueryCapture`), one row
at a time, so no ``prompt_len x prompt_len`` matrix is ever built and prefill itself runs on the
fast SDPA path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kv import KVBuffer


class ScoreQueryCapture:
    """Keeps the query states of the scoring tokens while prefill runs chunk by chunk.

    Args:
        q_cols: LongTensor ``[B, M]``: prompt column of each scoring query, -1 for none.
        layers, q_heads, head_dim: model shape.
    """

    def __init__(self, q_cols: torch.Tensor, layers: int, q_heads: int, head_dim: int, dtype, device):
        self.q_cols = q_cols
        self.valid = q_cols >= 0
        b, m = q_cols.shape
        self.store = torch.zeros(layers, b, q_heads, m, head_dim, dtype=dtype, device=device)
        self._inside: torch.Tensor | None = None
        self._local: torch.Tensor | None = None

    def begin_chunk(self, start: int, length: int) -> None:
        inside = self.valid & (self.q_cols >= start) & (self.q_cols < start + length)
        self._inside = inside if bool(inside.any()) else None
        self._local = (self.q_cols - start).clamp(0, length - 1)

    def __call__(self, layer_idx: int, query: torch.Tensor) -> None:
        """Store the scoring rows of ``query`` ``[B, Hq, T, D]`` for this layer."""
        if self._inside is None:
            return
        b, hq, _, d = query.shape
        idx = self._local[:, None, :, None].expand(b, hq, -1, d)
        picked = query.gather(2, idx)
        store = self.store[layer_idx]
        store.copy_(torch.where(self._inside[:, None, :, None], picked, store))


def scoring_columns(keep: torch.Tensor, max_queries: int) -> torch.Tensor:
    """The latest ``max_queries`` kept columns of each row.

    Args:
        keep: bool ``[B, P]``: kept (never-dropped, non-padding) prompt tokens.

    Returns:
        LongTensor ``[B, M]`` of columns, ascending, padded with -1 (M >= 1).
    """
    rows = [torch.nonzero(row, as_tuple=False).flatten()[-max_queries:] for row in keep]
    m = max(1, max(len(r) for r in rows))
    out = torch.full((keep.shape[0], m), -1, dtype=torch.long, device=keep.device)
    for b, r in enumerate(rows):
        out[b, : len(r)] = r
    return out


def attention_scores(
    queries: torch.Tensor, keys: torch.Tensor, q_cols: torch.Tensor, lo: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Mean attention each key receives from the scoring queries, summed over each GQA group.

    Args:
        queries: ``[B, Hq, M, D]`` (RoPE applied), keys: ``[B, Hkv, P, D]`` (RoPE applied).
        q_cols: LongTensor ``[B, M]``: each query's column (-1: unused slot).
        lo: LongTensor ``[B]``: first non-padding column.

    Returns:
        float32 ``[B, Hkv, P]``.
    """
    b, hq, m, d = queries.shape
    hkv, p = keys.shape[1], keys.shape[2]
    g = hq // hkv
    out = torch.zeros(b, hkv, p, dtype=torch.float32, device=keys.device)
    cols = torch.arange(p, device=keys.device)
    for row in range(b):  # one row at a time bounds memory to [Hkv, G*M, P]
        valid = q_cols[row] >= 0
        n_valid = int(valid.sum())
        if n_valid == 0:
            continue
        qc = q_cols[row][valid]  # [Mv]
        q = queries[row][:, valid].reshape(hkv, g * n_valid, d).float()
        s = torch.matmul(q, keys[row].float().transpose(-1, -2)) * scaling  # [Hkv, G*Mv, P]
        allowed = (cols >= lo[row]) & (cols.unsqueeze(0) <= qc.unsqueeze(1))  # [Mv, P]
        s = s.view(hkv, g, n_valid, p).masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(s, dim=-1)
        out[row] = probs.sum(dim=(1, 2)) / n_valid
    return out


@dataclass(slots=True)
class Selection:
    """Result of building the draft cache.

    Attributes:
        buffer: the draft KV buffer; columns ``[base - n_selected[b], base)`` hold row b's selected
            prompt entries in ascending score (kept tokens last, next to the generated region),
            columns from ``base`` the committed generated tokens. A smaller budget is then a later
            first column: ``[base - n, base)`` are the ``n`` best entries (see :meth:`first_column`).
        n_selected: LongTensor ``[B]``: prompt entries kept per row (same for every layer and head).
        base: first column of the generated region (``max(n_selected)``).
        n_candidates: LongTensor ``[B]``: droppable prompt tokens per row.
        scores: float32 ``[L, B, Hkv, P]`` candidate scores when kept for re-selection, else None.
    """

    buffer: KVBuffer
    n_selected: torch.Tensor
    base: int
    n_candidates: torch.Tensor
    scores: torch.Tensor | None = None

    def first_column(self, n_keep: torch.Tensor | None = None, n_candidates: int | None = None) -> torch.Tensor:
        """Each row's first readable column when the drafter reads its ``n_keep`` ``[B]`` kept tokens and
        at most ``n_candidates`` of its best candidates (None: the whole selection). LongTensor ``[B]``."""
        n = self.n_selected
        if n_candidates is not None and n_keep is not None:
            n = torch.minimum(n, n_keep + n_candidates)
        return self.base - n


def gather_selection(dense: KVBuffer, sel: Selection, layer: int, score: torch.Tensor,
                     candidates: torch.Tensor, keep: torch.Tensor) -> None:
    """Copy one layer's best-scoring prompt entries into ``sel.buffer`` columns ``[0, sel.base)``.

    Args:
        score: float ``[B, Hkv, P]``: higher is better; only candidates compete, kept tokens always
            win. The generated region of the draft buffer is left untouched.
    """
    d = dense.k.shape[-1]
    p = score.shape[-1]
    score = score.clone()
    score.masked_fill_(~candidates[:, :p].unsqueeze(1), float("-inf"))
    score.masked_fill_(keep[:, :p].unsqueeze(1), float("inf"))
    # Ascending order: row b's n_sel[b] selected entries end at column base, the best candidates
    # and then the kept entries last; the columns before them are padding the drafter never reads.
    k = min(sel.base, p)
    idx = score.topk(k, dim=-1, sorted=True).indices.flip(-1)  # [B, Hkv, k]
    gather_idx = idx.unsqueeze(-1).expand(-1, -1, -1, d)
    sel.buffer.k[layer][:, :, sel.base - k : sel.base] = dense.k[layer].gather(2, gather_idx)
    sel.buffer.v[layer][:, :, sel.base - k : sel.base] = dense.v[layer].gather(2, gather_idx)


def build_draft_cache(
    dense: KVBuffer,
    prompt_len: int,
    lo: torch.Tensor,
    candidates: torch.Tensor,
    keep: torch.Tensor,
    budget: int,
    policy: str,
    capture: ScoreQueryCapture | None,
    scaling: float,
    extra_capacity: int,
    dtype: torch.dtype | None = None,
    keep_scores: bool = False,
) -> Selection:
    """Gather each layer's selected prompt K/V into a compact, preallocated draft buffer.

    Args:
        dense: the dense buffer after prefill.
        lo: LongTensor ``[B]``: first non-padding column per row.
        candidates: bool ``[B, P]``: droppable prompt tokens. keep: bool ``[B, P]``: always kept.
        budget: prompt entries per layer/head (kept tokens count against it first).
        policy: ``"paper"``/``"last"`` score with the captured queries; ``"streaming"`` by recency.
        capture: query states of the scoring tokens (needed by ``paper`` and ``last``).
        extra_capacity: columns reserved after the selection for generated tokens.
        dtype: the draft buffer's dtype (default: the dense buffer's).
        keep_scores: keep the scores in the result (for re-selection during decoding).
    """
    n_layers, b, hkv, _, d = dense.k.shape
    n_keep = keep.sum(dim=1)
    n_cand = candidates.sum(dim=1)
    n_sel = n_keep + torch.minimum((budget - n_keep).clamp(min=0), n_cand)
    base = int(n_sel.max())
    draft = KVBuffer.empty(n_layers, b, hkv, base + extra_capacity, d, dtype or dense.k.dtype, dense.k.device)
    sel = Selection(draft, n_sel, base, n_cand)
    if base == 0:
        return sel
    if keep_scores:
        sel.scores = torch.zeros(n_layers, b, hkv, prompt_len, dtype=torch.float32, device=dense.k.device)
    for layer in range(n_layers):
        keys = dense.k[layer][:, :, :prompt_len]
        if policy in ("paper", "last") and capture is not None:
            score = attention_scores(capture.store[layer], keys, capture.q_cols, lo, scaling)
        else:  # recency: the latest candidates score highest
            score = torch.arange(prompt_len, device=keep.device, dtype=torch.float32).repeat(b, hkv, 1)
        if keep_scores:
            sel.scores[layer] = score
        gather_selection(dense, sel, layer, score, candidates, keep)
    return sel
