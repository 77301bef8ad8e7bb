"""Preallocated KV buffers and the per-forward plan that says where to write and what to read.

Two buffers live side by side during a generation:

* the **dense** buffer ``[layers, batch, kv_heads, prompt_len + new + gamma + 2, head_dim]`` holds the
  whole left-padded prompt and every committed token. Row ``b`` owns columns ``[pad_b, length_b)``;
  column ``c`` of row ``b`` is at RoPE position ``c - pad_b``. Committing or rolling back a round is
  moving ``length_b``: rejected drafts stay in the buffer and are overwritten by the next round.
* the **draft** buffer ``[layers, batch, kv_heads, n_selected + new + gamma + 2, head_dim]`` holds the
  selected prompt entries (different per layer and KV head) in the columns just before
  ``base = n_selected_max``, the best ones last, and from column ``base`` the dense K/V of every
  committed token. A draft pass may start reading at a later column to read fewer, better entries.

A transformers model writes K/V through ``Cache.update``; :class:`BufferCache` routes that write to
the buffer chosen by the active :class:`ForwardPlan`, and the attention function registered in
:mod:`sparse2dense.attention` reads the same plan for its mask. Nothing is concatenated or copied per
step except the new tokens' K/V.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache


@dataclass(slots=True)
class KVBuffer:
    """K and V for all layers: each ``[layers, batch, kv_heads, capacity, head_dim]``."""

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def empty(cls, layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int, dtype, device) -> "KVBuffer":
        shape = (layers, batch, kv_heads, capacity, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


@dataclass(slots=True)
class ForwardPlan:
    """Where one forward pass writes its K/V and which cached entries each query may read.

    Attributes:
        buffer: the buffer this pass reads and writes.
        write_col: first column written, per row: LongTensor ``[batch]``; ``write_col_int`` is set
            instead (and used on the fast path) when every row writes at the same column.
        q_len: query tokens per row in this pass (T).
        span: columns ``[start, span)`` are what attention reads; covers every row's last query column.
        mask: additive float mask ``[batch, 1, 1, T, span - start]`` (0 or -inf) over those columns,
            or None when every query may read every one of them causally (batch 1, no padding).
        mask_sliding: the same for sliding-window layers; None when ``window`` is None or the window
            covers the whole span (then ``mask`` serves both).
        window: the model's sliding-window size, or None.
        prefill: True for prompt passes: attention uses SDPA (long query blocks).
        sdpa_causal: prefill fast path: no padding and the block starts at column 0.
        capture: optional prefill hook that receives ``(layer_idx, query [B, Hq, T, D])``.
        start: first column attention reads (draft passes reading a smaller budget); write columns
            stay absolute.
    """

    buffer: KVBuffer
    write_col: torch.Tensor | None
    write_col_int: int | None
    q_len: int
    span: int
    mask: torch.Tensor | None
    mask_sliding: torch.Tensor | None = None
    window: int | None = None
    prefill: bool = False
    sdpa_causal: bool = False
    capture: object | None = None
    start: int = 0
    _write_idx: tuple | None = field(default=None)
    _tail: object = field(default=None)  # batch-1 causal tail of ``mask`` (False: not applicable)
    _grouped: tuple | None = field(default=None)  # (mask, group, mask in the grouped-query layout)

    def causal_tail(self) -> torch.Tensor | None:
        """At batch 1: the mask's last ``T`` columns ``[T, T]`` when every earlier column is open."""
        if self._tail is None:
            self._tail = False
            width = self.span - self.start
            if self.mask is not None and self.mask.shape[0] == 1 and width > self.q_len:
                m = self.mask[0, 0, 0]
                if bool(torch.isfinite(m[:, : width - self.q_len]).all()):
                    self._tail = m[:, width - self.q_len :]
        return None if self._tail is False else self._tail

    def grouped_mask(self, mask: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
        """``mask`` ``[B, 1, 1, T, S]`` laid out for ``group`` query heads stacked per KV head:
        ``[B, 1, group * T, S]`` in ``dtype``. Built once per forward pass and shared by every layer."""
        if self._grouped is None or self._grouped[0] is not mask or self._grouped[1] != (group, dtype):
            b, _, _, t, s = mask.shape
            grouped = mask.expand(b, 1, group, t, s).reshape(b, 1, group * t, s).to(dtype)
            self._grouped = (mask, (group, dtype), grouped)
        return self._grouped[2]

    def write(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``key``/``value`` ``[B, Hkv, T, D]`` and return the readable columns ``[B, Hkv, span - start, D]``."""
        k_layer = self.buffer.k[layer_idx]
        v_layer = self.buffer.v[layer_idx]
        if key.dtype != k_layer.dtype:  # a lower-precision drafter writing the model-precision cache
            key, value = key.to(k_layer.dtype), value.to(k_layer.dtype)
        if self.write_col_int is not None:
            c = self.write_col_int
            k_layer[:, :, c : c + self.q_len].copy_(key)
            v_layer[:, :, c : c + self.q_len].copy_(value)
        else:
            if self._write_idx is None:
                batch = key.shape[0]
                rows = torch.arange(batch, device=key.device).unsqueeze(1)
                cols = self.write_col.unsqueeze(1) + torch.arange(self.q_len, device=key.device).unsqueeze(0)
                self._write_idx = (rows, cols)
            rows, cols = self._write_idx
            # Advanced indices split by a slice put the indexed dims first: [B, T, Hkv, D].
            k_layer[rows, :, cols] = key.transpose(1, 2)
            v_layer[rows, :, cols] = value.transpose(1, 2)
        return k_layer[:, :, self.start : self.span], v_layer[:, :, self.start : self.span]


_ACTIVE_PLAN: contextvars.ContextVar[ForwardPlan | None] = contextvars.ContextVar("sparse2dense_plan", default=None)


def active_plan() -> ForwardPlan:
    plan = _ACTIVE_PLAN.get()
    if plan is None:
        raise RuntimeError("sparse2dense attention was called outside a sparse2dense forward pass.")
    return plan


class use_plan:
    """Context manager that makes ``plan`` the target of cache writes and attention reads."""

    def __init__(self, plan: ForwardPlan):
        self.plan = plan
        self.token = None

    def __enter__(self) -> ForwardPlan:
        self.token = _ACTIVE_PLAN.set(self.plan)
        return self.plan

    def __exit__(self, *exc) -> None:
        _ACTIVE_PLAN.reset(self.token)


class BufferCache(Cache):
    """A transformers ``Cache`` whose ``update`` writes into the active plan's buffer in place.

    The model code only calls ``update`` (and, in some models, ``get_seq_length``); masks are built
    by sparse2dense itself, so transformers' mask helpers are bypassed.
    """

    is_compileable = False

    def __init__(self, num_layers: int):
        super().__init__(layers=[])
        self.num_layers = num_layers
        self.seq_length = 0  # what get_seq_length reports; set by the engine (max committed length)

    def __len__(self) -> int:
        return self.num_layers

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None, *args, **kwargs):
        return active_plan().write(layer_idx, key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seq_length

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * self.num_layers

    @property
    def is_linear(self) -> list[bool]:
        return [False] * self.num_layers

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * self.num_layers


def build_mask(
    lo: torch.Tensor,
    q_cols: torch.Tensor,
    span: int,
    window: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Additive attention mask for a block of queries over cached columns.

    Query ``i`` of row ``b`` sits at column ``q_cols[b, i]`` and may read column ``j`` when
    ``lo[b] <= j <= q_cols[b, i]`` and (for sliding-window layers) ``q_cols[b, i] - j < window``.
    A query may always read itself, so padding queries never see an empty row (which would turn
    into NaN).

    Args:
        lo: LongTensor ``[B]``: first readable column per row.
        q_cols: LongTensor ``[B, T]``: the column of each query.
        span: number of columns the attention reads.
        window: sliding-window size, or None.

    Returns:
        Float tensor ``[B, 1, 1, T, span]`` holding 0 where allowed and -inf elsewhere.
    """
    j = torch.arange(span, device=q_cols.device)
    qc = q_cols.unsqueeze(-1)  # [B, T, 1]
    allowed = (j >= lo.view(-1, 1, 1)) & (j <= qc)
    if window is not None:
        allowed &= (qc - j) < window
    allowed |= j == qc
    mask = torch.zeros(allowed.shape, dtype=dtype, device=q_cols.device)
    mask.masked_fill_(~allowed, float("-inf"))
    return mask[:, None, None]
