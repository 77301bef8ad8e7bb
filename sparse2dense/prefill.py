"""Prefill: a group's prompts into its slots of the dense buffer, chunk by chunk.

A :class:`PrefillJob` runs the model's own forward over the prompt in chunks of at most
``StdConfig.prefill_chunk`` tokens (one pass for Video-LLMs, whose vision features are merged into
the embeddings by the model's forward). The engine may run one chunk between two decoding rounds,
so a long prompt that joins a running batch delays each round by one chunk, not by the whole
prompt. While it runs, the queries of the scoring tokens are captured for the drafter's selection
(:class:`~sparse2dense.selection.ScoreQueryCapture`), so no ``P x P`` matrix is ever built.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import torch

from .config import StdConfig
from .forward import Runner, batch_view
from .kv import BufferCache, ForwardPlan, KVBuffer
from .requests import Group
from .selection import ScoreQueryCapture, scoring_columns


def scoring_queries(keep: torch.Tensor, valid: torch.Tensor, cfg: StdConfig, policies: set[str]) -> torch.Tensor:
    """Prompt columns whose queries prefill captures: ``[k, M]``, -1 for unused slots.

    The union of what each policy in ``policies`` scores with (``keep``, ``valid``: bool
    ``[k, P]``); :func:`policy_capture` later keeps only the columns of the policy it builds, so
    one prefill can serve several policies.
    """
    sets = []
    if "paper" in policies:
        sets.append(scoring_columns(keep, cfg.max_score_queries))
    if "last" in policies:
        sets.append(scoring_columns(valid, cfg.observe_last))
    if len(sets) == 1:
        return sets[0]
    rows = [torch.unique(torch.cat([c[b][c[b] >= 0] for c in sets])) for b in range(keep.shape[0])]
    out = torch.full((keep.shape[0], max(len(r) for r in rows)), -1, dtype=torch.long, device=keep.device)
    for b, r in enumerate(rows):
        out[b, : len(r)] = r
    return out


def policy_capture(capture, keep: torch.Tensor, valid: torch.Tensor, cfg: StdConfig, policy: str):
    """The captured queries that ``policy`` scores with (a view of the prefill capture), or None."""
    if capture is None or policy == "streaming":
        return None
    if policy == "paper":
        mine = scoring_columns(keep, cfg.max_score_queries)
    else:
        mine = scoring_columns(valid, cfg.observe_last)
    wanted = (capture.q_cols.unsqueeze(-1) == mine.unsqueeze(1)).any(-1) & (capture.q_cols >= 0)  # [k, M]
    return SimpleNamespace(store=capture.store, q_cols=torch.where(wanted, capture.q_cols, -1))


class PrefillJob:
    """Prefills ``group`` into slots ``[start, start + k)`` of ``dense``; see the module docstring.

    Args:
        keep: bool ``[k, P]``: prompt tokens the drafter always keeps (the scoring queries' source).
        policies: the selection policies whose scoring queries to capture (empty: none).
    """

    def __init__(self, runner: Runner, dense: KVBuffer, group: Group, start: int, cfg: StdConfig,
                 keep: torch.Tensor, policies: set[str]):
        self.runner, self.group, self.start, self.cfg = runner, group, start, cfg
        adapter = runner.adapter
        self.view = batch_view(dense, start, start + group.size)
        self.cache = BufferCache(adapter.num_layers)
        self.device = dense.k.device
        self.ids = group.input_ids.to(self.device)
        self.mask = group.attention_mask.to(self.device)
        self.pad = (self.mask == 0).sum(dim=1)  # [k] left padding per row
        self.no_pad = bool((self.pad == 0).all())
        self.capture = None
        if cfg.speculative and policies & {"paper", "last"}:
            q_cols = scoring_queries(keep, self.mask.bool(), cfg, policies)
            self.capture = ScoreQueryCapture(q_cols, adapter.num_layers, adapter.num_q_heads, adapter.head_dim,
                                             dense.k.dtype, self.device)
        self.done_tokens = 0
        self.logits: torch.Tensor | None = None  # [k, 1, V] at the last prompt position, when done
        self.offsets: torch.Tensor | None = None  # the adapter's per-row position offsets [k, 1]
        self.pos_ids: torch.Tensor | None = None
        self.seconds = 0.0

    @property
    def done(self) -> bool:
        return self.logits is not None

    def step(self, max_tokens: int | None = None) -> bool:
        """Run one chunk of at most ``max_tokens`` prompt tokens (None: ``prefill_chunk``); True when done."""
        t0 = time.perf_counter()
        adapter, group = self.runner.adapter, self.group
        k, p = self.ids.shape
        chunk = p if not adapter.chunked_prefill else min(self.cfg.prefill_chunk, max_tokens or self.cfg.prefill_chunk)
        start = self.done_tokens
        end = min(p, start + chunk)
        t = end - start
        cols = torch.arange(p, device=self.device)
        window = self.runner.window
        extra = {}
        if start == 0:
            positions = (cols.unsqueeze(0) - self.pad.unsqueeze(1)).clamp(min=0)  # [k, P]
            extra = adapter.prefill_kwargs(group.model_inputs)
            if group.prompt_position_ids is not None:
                self.pos_ids, self.offsets = adapter.adopt_position_ids(group.prompt_position_ids.to(self.device))
            else:
                self.pos_ids, self.offsets = adapter.prefill_position_ids(self.ids, self.mask, group.model_inputs,
                                                                          positions)
        causal = self.no_pad and start == 0 and (window is None or window >= end)
        mask = sliding = None
        if not causal:
            mask, sliding = self.runner.masks(self.pad, cols[start:end].unsqueeze(0).expand(k, t), end)
        plan = ForwardPlan(
            buffer=self.view, write_col=None, write_col_int=start, q_len=t, span=end, mask=mask,
            mask_sliding=sliding, window=window, prefill=True, sdpa_causal=causal, capture=self.capture,
        )
        if self.capture is not None:
            self.capture.begin_chunk(start, t)
        logits = self.runner.forward(plan, self.cache, self.ids[:, start:end], self.pos_ids[..., start:end], False,
                                     **extra)
        self.done_tokens = end
        if group.progress is not None:
            group.progress("prefill", end, p)
        if end == p:
            self.logits = logits
        self.seconds += time.perf_counter() - t0
        return self.done
