"""The Sparse-to-Dense decoding loop.

Data flows one way: inputs -> adapter -> prefill (dense KV) -> selection (draft KV) -> rounds ->
sequences and stats. Each round is::

    1. draft   gamma tokens, one sparse forward each (attention over the draft buffer only)
    2. verify  [last, d_1..d_gamma] in one dense forward (attention over the dense buffer)
    3. accept  the longest prefix of drafts that matches dense argmax, plus one bonus token
    4. commit  move each row's dense length; copy the committed tokens' exact K/V into the draft buffer

The output is exactly what greedy dense decoding produces: every emitted token is a dense argmax.
With ``gamma=0`` the loop is plain dense decoding on the same preallocated buffers.
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from .acceptance import greedy_accept, speculative_sample
from .adapters import Adapter, get_adapter
from .adaptive import GammaController, auto_budget, budget_variants
from .attention import attention_routed
from .config import AUTO, StdConfig
from .drafter import copy_size_estimate, fast_bf16, free_memory_bytes, make_drafter
from .lean import EXACT, LeanDecoder, lean_decoder, supports_exact, supports_lean, weight_format_supported
from .kv import BufferCache, ForwardPlan, KVBuffer, build_mask, use_plan
from .selection import (
    ScoreQueryCapture, Selection, attention_scores, build_draft_cache, gather_selection, scoring_columns,
)


@dataclass
class StdStats:
    """Statistics of one generation call (all rows together).

    ``mean_accepted_per_round`` counts committed tokens per row-round, the bonus token included,
    so plain dense decoding scores 1.0 and a perfect drafter scores ``gamma + 1``.
    """

    batch_size: int = 0
    prompt_len: int = 0
    new_tokens: int = 0  # tokens generated, summed over rows (padding after EOS excluded)
    rounds: int = 0  # verify passes after prefill
    drafted: int = 0  # draft tokens proposed, summed over active rows
    accepted: int = 0  # draft tokens accepted, summed over active rows
    mean_accepted_per_round: float = 0.0
    acceptance_rate: float = 0.0
    per_position_acceptance: list[float] = field(default_factory=list)  # P(d_i accepted | d_i drafted)
    gamma: int = 0  # the fixed draft length, or the largest one gamma="auto" may choose
    gamma_mode: str = "fixed"  # "fixed" or "auto"
    budget: int = 0  # the budget used (resolved when budget="auto")
    policy: str = "paper"
    draft_dtype: str | None = None  # the drafter's weight precision when it differs from the model's
    draft_weights_mb: float = 0.0  # memory of the drafter's own weight copy (0: shares the model's)
    speculation: str = "on"  # "on", "off" (dense decoding only) or "partial" (auto turned it off at times)
    fallback_reason: str = ""  # why speculation was turned off, when it was
    auto: dict = field(default_factory=dict)  # gamma="auto": rounds, dense rounds, mean gamma, costs
    reselections: int = 0  # times the drafter's selection was refreshed during decoding
    compactions: int = 0  # times rows that had stopped were dropped from the forward passes
    # One entry per round: [rows decoded, draft length, draft seconds, verify seconds].
    round_log: list[list[float]] = field(default_factory=list)
    n_visual: list[int] = field(default_factory=list)  # visual (image/video) prompt tokens per row
    n_text: list[int] = field(default_factory=list)  # other non-padding prompt tokens per row
    n_candidates: list[int] = field(default_factory=list)  # droppable prompt tokens per row
    n_selected: list[int] = field(default_factory=list)  # prompt KV entries the drafter keeps per row
    dense_cache_mb: float = 0.0
    draft_cache_mb: float = 0.0
    time_prefill: float = 0.0
    time_selection: float = 0.0
    time_draft: float = 0.0
    time_verify: float = 0.0
    time_decode: float = 0.0  # everything after prefill and selection
    time_total: float = 0.0
    tokens_per_second: float = 0.0  # new_tokens / time_decode

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StdOutput:
    """``sequences``: LongTensor ``[B, prompt_len + new]`` laid out like ``model.generate``."""

    sequences: torch.Tensor
    stats: StdStats


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten().tolist()]
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


class _Run:
    """State of one generation call. Created by :func:`generate`; not part of the public API."""

    def __init__(
        self,
        model,
        adapter: Adapter,
        cfg: StdConfig,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        eos_ids: list[int],
        pad_id: int,
        context_mask: torch.Tensor | None,
        logits_processor,
        stopping_criteria,
        streamer,
        model_inputs: dict,
        progress: Callable[[str, int, int], None] | None,
        do_sample: bool = False,
        generator: torch.Generator | None = None,
        prompt_position_ids: torch.Tensor | None = None,
    ):
        self.model = model
        self.adapter = adapter
        self.cfg = cfg
        self.device = input_ids.device
        self.input_ids = input_ids
        self.batch, self.prompt_len = input_ids.shape
        self.max_new = max_new_tokens
        self.eos_ids = set(eos_ids)
        self.pad_id = pad_id
        self.processors = logits_processor if logits_processor else None
        self.stopping = stopping_criteria if stopping_criteria else None
        self.streamer = streamer
        self.model_inputs = model_inputs
        self.progress = progress
        self.do_sample = do_sample
        self.generator = generator
        self.window = adapter.sliding_window
        self.max_gamma = cfg.max_gamma
        self.stats = StdStats(batch_size=self.batch, prompt_len=self.prompt_len, gamma=self.max_gamma,
                              gamma_mode="auto" if cfg.auto_gamma else "fixed", policy=cfg.policy)

        valid = attention_mask.bool()
        self.valid = valid
        self.attention_mask = attention_mask
        self.pad = (~valid).sum(dim=1)  # [B] left padding per row
        self.no_pad = bool((self.pad == 0).all())
        if context_mask is not None:
            self.candidates = context_mask.to(self.device).bool() & valid
        else:
            self.candidates = adapter.candidate_mask(input_ids, valid, cfg)
        self.keep = valid & ~self.candidates
        visual = adapter.visual_mask(input_ids)
        visual = visual & valid if visual is not None else torch.zeros_like(valid)
        self.stats.n_visual = visual.sum(dim=1).tolist()
        self.stats.n_text = (valid & ~visual).sum(dim=1).tolist()
        self.budget = self.auto_budget() if cfg.budget == AUTO else int(cfg.budget)
        self.stats.budget = self.budget

        dtype = next(model.parameters()).dtype
        # Decode-time passes of the model's own weights (verification, dense steps, drafting at the
        # model's precision) run the exact lean forward where the family has one: the same logits,
        # bit for bit, in fewer ops. Prefill keeps the model's forward.
        self.exact: LeanDecoder | None = lean_decoder(model, EXACT) if supports_exact(model) else None
        self.drafters = self._drafters(model, dtype)  # [(name, module)]
        self.drafter = self.drafters[0][1]
        self.controller: GammaController | None = None
        capacity = self.prompt_len + max_new_tokens + self.max_gamma + 2
        self.dense = KVBuffer.empty(
            adapter.num_layers, self.batch, adapter.num_kv_heads, capacity, adapter.head_dim, dtype, self.device
        )
        self.cache = BufferCache(adapter.num_layers)
        self.selection: Selection | None = None
        self.prompt_position_ids = prompt_position_ids  # as prepared by generate(), if given

        # Output tokens: seq[b, :prompt_len + n_gen[b]] is row b's prefix so far.
        self.seq = torch.full((self.batch, capacity), pad_id, dtype=torch.long, device=self.device)
        self.seq[:, : self.prompt_len] = input_ids
        self.n_gen = torch.zeros(self.batch, dtype=torch.long)  # host-side counters
        # transformers pads rows that finished early only when an EOS id is configured; without one,
        # a row stopped by a stopping criterion keeps generating until every row has stopped.
        self.pad_finished = bool(eos_ids)
        self.finished = torch.zeros(self.batch, dtype=torch.bool)  # generate()'s "unfinished == 0"
        self.finish_len = torch.zeros(self.batch, dtype=torch.long)
        self.row_limit = torch.full((self.batch,), max_new_tokens, dtype=torch.long)
        self.committed = 0  # tokens committed by decode rounds (bonus tokens included)
        self.dense_len = torch.full((self.batch,), self.prompt_len, dtype=torch.long, device=self.device)
        self.draft_len = torch.zeros(self.batch, dtype=torch.long, device=self.device)
        self.active = torch.ones(self.batch, dtype=torch.bool)
        self.last = torch.zeros(self.batch, dtype=torch.long, device=self.device)
        self.accept_at = [0] * self.max_gamma
        self.draft_at = [0] * self.max_gamma
        self.row_rounds = 0  # (row, round) pairs in which the row was still generating
        self.reselect_queries: torch.Tensor | None = None  # [L, B, Hq, 1, D] when re-selecting
        # gamma="auto": the drafters it chooses from, as (name, module, candidates read or None for the
        # whole selection, index of the same weights' whole-selection arm or None); see _auto_arms.
        self.arms: list[tuple[str, Any, int | None, int | None]] = []
        self.draft_lo: torch.Tensor | None = None  # [B] first draft column this round (None: whole selection)
        self.no_drafter_reason = ""
        # Batch compaction (see _maybe_compact): current row i holds original row row_ids[i] and
        # sits in slot i of both KV buffers; the full-batch tensors wait in _full meanwhile.
        self.row_ids = torch.arange(self.batch)
        self._full: dict | None = None
        self._slot_rows: torch.Tensor | None = None  # original row in each buffer slot, once moved
        # After snapshot(), stopped rows' K/V swap places with the rows that take their slots, so that
        # restore() can put every prompt back; otherwise a live row's K/V is just copied over.
        self.keep_stopped_rows = False
        # Rows are only dropped where nothing sees the batch as a whole: logits processors may
        # address rows by index, and sampling draws random numbers for every row of the batch.
        self.can_compact = self.processors is None and not do_sample
        self.score_policies: set[str] | None = None  # policies prefill captures queries for
        self.capture = None
        self.scaling = adapter.head_dim**-0.5

    def _drafters(self, model, dtype) -> list[tuple[str, Any]]:
        """The drafters this run may use: the model itself and/or a cheaper weight copy."""
        cfg = self.cfg
        own = [(str(dtype).removeprefix("torch."), model)]
        wanted = cfg.draft_dtype
        if wanted is None and cfg.auto_gamma:
            wanted = AUTO  # gamma="auto" picks the drafter's weights too, unless told otherwise
        if not cfg.speculative or wanted is None or wanted == dtype:
            return own
        if wanted == AUTO:
            wanted = self._auto_precision(model, dtype)
            if wanted is None:
                return own
        name, drafter, nbytes = make_drafter(model, wanted)
        self.stats.draft_dtype = name
        self.stats.draft_weights_mb = nbytes / 2**20
        low = [(name, drafter)]
        # gamma="auto" also measures the model's own weights, and uses the faster per round, where
        # the copy may not pay: float copies (bf16 products at batch 1 are slower than fp32 on CPUs
        # measured so far) and int4 (lower acceptance). int8 drafted as well as fp32 and cost less
        # at every batch size auto picks it for, so probing fp32 would only cost rounds. Nor is the
        # model's own drafter probed where it would keep every prompt entry (it would be the dense
        # model, at a dense step's cost).
        if cfg.auto_gamma and name != "int8" and not self.fits_budget():
            return own + low
        return low

    def _auto_precision(self, model, dtype) -> torch.dtype | str | None:
        """``draft_dtype="auto"``: the cheaper drafter weights this model, device and batch can use.

        Weight-only int8 where the lean forward and its kernel exist (CPU) up to batch 4, else bf16
        where the hardware multiplies it natively. From `python -m sparse2dense.bench.kernels` (the
        MLP products of SmolLM2-135M, 2-core Xeon with AMX), int8 vs bf16: 6.4 vs 15.2 ms at 1 row,
        8.6 vs 11.8 at 4, 15.2 vs 11.5 at 8, 23.4 vs 12.1 at 16. int8 drafts kept fp32's acceptance
        in the README's sweeps; int4 (cheaper still) lost about half of it, so it is not picked.
        Either only when free memory holds the copy twice over; None keeps the model's own weights.
        """
        if dtype != torch.float32:
            return None
        bf16_ok = fast_bf16(self.device)
        if supports_lean(model) and weight_format_supported("int8", self.device) and (self.batch <= 4 or not bf16_ok):
            wanted, size = "int8", copy_size_estimate(model, torch.int8)
        elif bf16_ok and (self.cfg.auto_gamma or self.batch >= 4):
            # At batch 1-3 a bf16 step through the model's own forward is not cheaper on CPUs measured so far.
            wanted, size = torch.bfloat16, copy_size_estimate(model, torch.bfloat16)
        else:
            return None
        free = free_memory_bytes(self.device)
        return None if free is not None and free < 2 * size else wanted

    # ----------------------------------------------------------------------------- forward passes
    def _forward(self, plan: ForwardPlan, ids: torch.Tensor, positions: torch.Tensor, all_logits: bool,
                 position_ids_ready: bool = False, model=None, **extra):
        """Run the model (or ``model``, e.g. the drafter) on ``ids`` ``[B, T]`` at text positions
        ``positions`` ``[B, T]``.

        With ``position_ids_ready`` the positions are already in the model's format (e.g. M-RoPE).
        """
        if not position_ids_ready:
            positions = self.adapter.position_ids(positions)
        if (model is None or model is self.model) and self.exact is not None and not plan.prefill and not extra:
            model = self.exact
        with use_plan(plan):
            if isinstance(model, LeanDecoder):
                return model(ids, positions, all_logits)
            out = (model or self.model)(
                input_ids=ids,
                position_ids=positions,
                past_key_values=self.cache,
                use_cache=True,
                logits_to_keep=0 if all_logits else 1,
                **extra,
            )
        return out.logits.float()

    def _masks(self, lo, q_cols, span):
        mask = build_mask(lo, q_cols, span)
        sliding = None
        if self.window is not None and self.window < span:
            sliding = build_mask(lo, q_cols, span, window=self.window)
        return mask, sliding

    def prefill(self) -> None:
        """Dense forward over the prompt in chunks; fills the dense buffer and picks the first token."""
        t0 = time.perf_counter()
        p, b = self.prompt_len, self.batch
        capture = None
        policies = self.score_policies or {self.cfg.policy}
        if self.cfg.speculative and policies & {"paper", "last"}:
            q_cols = self._scoring_queries(policies)
            capture = ScoreQueryCapture(
                q_cols, self.adapter.num_layers, self.adapter.num_q_heads, self.adapter.head_dim,
                self.dense.k.dtype, self.device,
            )
        self.capture = capture
        chunk = p if not self.adapter.chunked_prefill else self.cfg.prefill_chunk
        cols = torch.arange(p, device=self.device)
        positions = (cols.unsqueeze(0) - self.pad.unsqueeze(1)).clamp(min=0)  # [B, P]
        logits = None
        for start in range(0, p, chunk):
            end = min(p, start + chunk)
            t = end - start
            causal = self.no_pad and start == 0 and (self.window is None or self.window >= end)
            mask = sliding = None
            if not causal:
                q_cols = cols[start:end].unsqueeze(0).expand(b, t)
                mask, sliding = self._masks(self.pad, q_cols, end)
            plan = ForwardPlan(
                buffer=self.dense, write_col=None, write_col_int=start, q_len=t, span=end, mask=mask,
                mask_sliding=sliding, window=self.window, prefill=True, sdpa_causal=causal, capture=capture,
            )
            if capture is not None:
                capture.begin_chunk(start, t)
            if start == 0:
                extra = self.adapter.prefill_kwargs(self.model_inputs)
                if self.prompt_position_ids is not None:
                    pos_ids = self.adapter.adopt_position_ids(self.prompt_position_ids.to(self.device))
                else:
                    pos_ids = self.adapter.prefill_position_ids(self.input_ids, self.attention_mask,
                                                                self.model_inputs, positions)
            else:
                extra = {}
                pos_ids = self.adapter.position_ids(positions)
            logits = self._forward(plan, self.input_ids[:, start:end], pos_ids[..., start:end], False,
                                   position_ids_ready=True, **extra)
            if self.progress is not None:
                self.progress("prefill", end, p)
        self.cache.seq_length = p
        scores = self._process(logits, torch.zeros(b, 0, dtype=torch.long, device=self.device))[:, 0]
        first = self._choose(scores)
        self.stats.time_prefill = time.perf_counter() - t0
        self.last = first
        self._commit(first.unsqueeze(1), torch.ones(b, dtype=torch.long))

    def _scoring_queries(self, policies: set[str]) -> torch.Tensor:
        """Prompt columns whose queries prefill captures: ``[B, M]``, -1 for unused slots.

        The union of what each policy in ``policies`` scores with; :meth:`select` later keeps only
        the columns of the policy it builds (so one prefill can serve several policies).
        """
        sets = []
        if "paper" in policies:
            sets.append(scoring_columns(self.keep, self.cfg.max_score_queries))
        if "last" in policies:
            sets.append(scoring_columns(self.valid, self.cfg.observe_last))
        if len(sets) == 1:
            return sets[0]
        rows = [torch.unique(torch.cat([c[b][c[b] >= 0] for c in sets])) for b in range(self.batch)]
        out = torch.full((self.batch, max(len(r) for r in rows)), -1, dtype=torch.long, device=self.device)
        for b, r in enumerate(rows):
            out[b, : len(r)] = r
        return out

    def _policy_capture(self, policy: str):
        """The captured queries that ``policy`` scores with (a view of the prefill capture)."""
        cap = self.capture
        if cap is None or policy == "streaming":
            return None
        if policy == "paper":
            mine = scoring_columns(self.keep, self.cfg.max_score_queries)
        else:
            mine = scoring_columns(self.valid, self.cfg.observe_last)
        wanted = (cap.q_cols.unsqueeze(-1) == mine.unsqueeze(1)).any(-1) & (cap.q_cols >= 0)  # [B, M]
        return SimpleNamespace(store=cap.store, q_cols=torch.where(wanted, cap.q_cols, -1))

    def select(self, policy: str | None = None, keep_capture: bool = False) -> None:
        """Build the drafter's compact KV cache from the dense buffer.

        Args:
            policy: selection policy (default: the config's); others need their queries captured
                during prefill (see ``score_policies``).
            keep_capture: keep the prefill's captured queries for another :meth:`select`.
        """
        t0 = time.perf_counter()
        policy = policy or self.cfg.policy
        scaling = getattr(self.text_attn_module(), "scaling", self.adapter.head_dim**-0.5)
        self.scaling = scaling
        self.selection = None  # release the previous draft buffer first
        self.selection = build_draft_cache(
            self.dense, self.prompt_len, self.pad, self.candidates, self.keep, self.budget, policy,
            self._policy_capture(policy), scaling, extra_capacity=self.max_new + self.max_gamma + 2,
            keep_scores=self.cfg.reselect_every > 0 and policy != "streaming",
        )
        if not keep_capture:
            self.capture = None
        self.stats.policy = policy
        self.stats.n_candidates = self.selection.n_candidates.tolist()
        self.stats.n_selected = self.selection.n_selected.tolist()
        self.stats.draft_cache_mb = self.selection.buffer.nbytes() / 2**20
        self.stats.time_selection = time.perf_counter() - t0

    def maybe_select(self) -> None:
        """Build the drafter unless it cannot help; says why in ``no_drafter_reason``.

        A drafter is skipped for ``gamma=0``, and for ``gamma="auto"`` when it would keep every
        prompt entry at the model's own precision (it would be the dense model, at the same cost).
        """
        cfg = self.cfg
        if not cfg.speculative:
            return
        if cfg.auto_gamma and self.drop_dense_drafter():
            return
        self.select()

    def auto_budget(self) -> int:
        """The budget ``budget="auto"`` gives this batch (the largest of its rows')."""
        n_keep, n_cand = self.keep.sum(dim=1).tolist(), self.candidates.sum(dim=1).tolist()
        return max(auto_budget(k, c, self.batch) for k, c in zip(n_keep, n_cand))

    def fits_budget(self) -> bool:
        """Whether every row's whole prompt fits the drafter budget (the drafter would drop nothing)."""
        return bool((self.keep.sum(dim=1) + self.candidates.sum(dim=1) <= self.budget).all())

    def drop_dense_drafter(self) -> bool:
        """Drop the drafter when it would be the dense model itself (every drafter uses the model's
        weights and every row's prompt fits the budget); says why in ``no_drafter_reason``."""
        if not all(d is self.model for _, d in self.drafters):
            return False
        if not self.fits_budget():
            return False
        self.selection = None
        self.no_drafter_reason = (
            f"the prompt ({self.prompt_len} tokens) fits the drafter budget ({self.budget}): "
            "a drafter would cost as much as dense decoding")
        return True

    def text_attn_module(self):
        for module in self.model.modules():
            if hasattr(module, "scaling") and hasattr(module, "layer_idx"):
                return module
        return None

    def _draft(self, g: int, give_up_s: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Propose ``g`` tokens per row with the sparse drafter.

        Returns ``(drafts [B, g'], q)``: when sampling, ``q`` ``[B, g', V]`` holds the distributions
        the drafts were drawn from; for greedy decoding it is None. ``g' = g`` unless ``give_up_s`` is
        given and the first step took longer than that many seconds; then ``g' = 1``.
        """
        t_start = time.perf_counter()
        sel = self.selection
        b = self.batch
        tok = self.last
        drafts: list[torch.Tensor] = []
        q: list[torch.Tensor] = []
        # Row r reads its selected entries from column lo[r] on (see Selection) and then its
        # generated region; the pass reads from the smallest lo. A single row reads unmasked.
        lo = self.draft_lo if self.draft_lo is not None else sel.first_column()
        start = int(lo.min())
        uniform = b == 1
        for i in range(g):
            col = sel.base + self.draft_len + i  # [B]
            span = int(col.max()) + 1
            if uniform:
                mask = None
                write_int = int(col[0])
            else:
                mask = build_mask(lo - start, (col - start).unsqueeze(1), span - start)
                write_int = None
            # The drafter ignores sliding windows (its columns are not positions); it only proposes.
            plan = ForwardPlan(
                buffer=sel.buffer, write_col=None if uniform else col, write_col_int=write_int, q_len=1, span=span,
                mask=mask, window=self.window, start=start,
            )
            positions = (self.dense_len - self.pad + i).unsqueeze(1)
            logits = self._forward(plan, tok.unsqueeze(1), positions, False, model=self.drafter)
            if self.processors is not None:
                prefix = torch.stack(drafts, dim=1) if drafts else tok.new_zeros(b, 0)
                scores = self._process(logits, prefix, draft_offset=True)[:, 0]
            else:
                scores = logits[:, 0]
            if self.do_sample:
                probs = torch.softmax(scores, dim=-1)
                q.append(probs)
                tok = torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
            else:
                tok = scores.argmax(dim=-1)
            drafts.append(tok)
            if give_up_s is not None and i == 0:
                if tok.is_cuda:
                    torch.cuda.synchronize(tok.device)  # time the step, not its launch
                if time.perf_counter() - t_start > give_up_s:
                    break
        out = torch.stack(drafts, dim=1) if drafts else tok.new_zeros(b, 0)
        return out, (torch.stack(q, dim=1) if q else None)

    def _verify(self, drafts: torch.Tensor) -> torch.Tensor:
        """Dense pass over ``[last, d_1..d_g]``.

        Returns dense greedy choices ``[B, g + 1]`` or, when sampling, the dense distributions
        ``[B, g + 1, V]``.
        """
        b, g = drafts.shape
        t = g + 1
        block = torch.cat([self.last.unsqueeze(1), drafts], dim=1)
        col = self.dense_len  # [B]
        q_cols = col.unsqueeze(1) + torch.arange(t, device=self.device)
        span = int(col.max()) + t
        uniform = b == 1 or bool((col == col[0]).all())
        if uniform and self.no_pad and t == 1 and (self.window is None or self.window >= span):
            mask = sliding = None
        else:
            mask, sliding = self._masks(self.pad, q_cols, span)
        plan = ForwardPlan(
            buffer=self.dense, write_col=None if uniform else col, write_col_int=int(col[0]) if uniform else None,
            q_len=t, span=span, mask=mask, mask_sliding=sliding, window=self.window,
            capture=self._capture_last_query if self.reselect_queries is not None else None,
        )
        positions = q_cols - self.pad.unsqueeze(1)
        logits = self._forward(plan, block, positions, True)
        scores = self._process(logits, drafts)
        return torch.softmax(scores, dim=-1) if self.do_sample else scores.argmax(dim=-1)

    # ----------------------------------------------------------------------------- token choice
    def _process(self, logits: torch.Tensor, drafts: torch.Tensor, draft_offset: bool = False) -> torch.Tensor:
        """Apply the logits processors at each of the ``T`` positions of ``logits`` ``[B, T, V]``.

        Position ``i`` of row ``b`` is processed with the prefix that dense decoding would have
        there: the committed tokens, then ``drafts[b, :i]`` (for a draft step, all of ``drafts``).
        Processors see the whole batch, as in ``generate``; rows whose prefixes have the same length
        share one call. Returns float32 scores ``[B, T, V]`` (the logits themselves without
        processors).
        """
        if self.processors is None:
            return logits
        b, t, _ = logits.shape
        k = drafts.shape[1]
        base = self.prompt_len + self.n_gen  # [B] host
        ext = self.seq.clone()
        if k:
            cols = base.to(self.device).unsqueeze(1) + torch.arange(k, device=self.device)
            ext.scatter_(1, cols, drafts)
        out = logits.clone()
        live = self.active
        for i in range(t):
            lens = base + (k if draft_offset else i)
            for length in sorted(set(lens[live].tolist())):
                rows = ((lens == length) & live).to(self.device)
                scores = self.processors(ext[:, :length], logits[:, i].clone())
                out[rows, i] = scores[rows].float()
        return out

    def _choose(self, scores: torch.Tensor) -> torch.Tensor:
        """One token per row from processed scores ``[B, V]``: argmax, or a sample when sampling."""
        if self.do_sample:
            return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=self.generator).squeeze(1)
        return scores.argmax(dim=-1)

    # ----------------------------------------------------------------------------- commit
    def _commit(self, block: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """Append ``block[b, :count[b]]`` to each active row, honouring EOS, length and stop criteria.

        Returns the number of tokens actually appended per row (host LongTensor ``[B]``).
        """
        block_host = block.cpu()
        appended = torch.zeros(self.batch, dtype=torch.long)
        for row in range(self.batch):
            if not self.active[row]:
                continue
            start = self.prompt_len + int(self.n_gen[row])
            n = min(int(count[row]), int(self.row_limit[row] - self.n_gen[row]))
            tokens = block_host[row, :n].tolist()
            self.seq[row, start : start + n] = block[row, :n]
            kept = 0
            for tok in tokens:
                kept += 1
                if self.finished[row]:
                    continue  # finished without padding: keeps generating real tokens
                hit_eos = tok in self.eos_ids
                hit_stop = (not hit_eos and self.stopping is not None
                            and bool(self.stopping(self.seq[row : row + 1, : start + kept], None).any()))
                if hit_eos or hit_stop:
                    self.finished[row] = True
                    self.finish_len[row] = int(self.n_gen[row]) + kept
                    if hit_eos or self.pad_finished:
                        self.active[row] = False
                        break
            if kept < n:
                self.seq[row, start + kept : start + n] = self.pad_id
            self.n_gen[row] += kept
            appended[row] = kept
            if int(self.n_gen[row]) >= int(self.row_limit[row]):
                self.active[row] = False
                if not self.finished[row]:
                    self.finished[row] = True
                    self.finish_len[row] = int(self.n_gen[row])
        if self.streamer is not None and appended[0] > 0:
            self.streamer.put(block_host[0, : int(appended[0])])
        return appended

    # ----------------------------------------------------------------------------- the loop
    def snapshot(self) -> dict:
        """State right after prefill; :meth:`restore` rewinds to it (the prompt's K/V are never
        overwritten by decoding, so a second decode from the same prefill is exact)."""
        self.keep_stopped_rows = True
        return {
            "seq": self.seq.clone(), "n_gen": self.n_gen.clone(), "dense_len": self.dense_len.clone(),
            "draft_len": self.draft_len.clone(), "active": self.active.clone(), "last": self.last.clone(),
            "finished": self.finished.clone(), "finish_len": self.finish_len.clone(),
            "row_limit": self.row_limit.clone(),
        }

    # ----------------------------------------------------------------------------- batch compaction
    _ROW_STATE = ("seq", "n_gen", "finished", "finish_len", "row_limit", "dense_len", "draft_len", "active",
                  "last", "pad", "valid", "attention_mask", "candidates", "keep", "input_ids", "row_ids")

    def _maybe_compact(self) -> None:
        """Drop rows that have stopped from the forward passes once enough of them have.

        A batch decodes until its slowest row is done; without this, every pass keeps reading the
        weights, K/V and attention of rows that finished rounds ago. Live rows keep their buffer
        slots where they can; a live row from the back takes the slot of a stopped row in front
        (after :meth:`snapshot` their K/V swap, so :meth:`restore` can put every row back).
        """
        if not self.can_compact:
            return
        n_done = int((~self.active).sum())
        if n_done == 0 or n_done == self.batch or n_done < max(1, self.batch // 8):
            return
        self._compact(self.active.clone())

    def _compact(self, keep: torch.Tensor) -> None:
        """Keep the rows where ``keep`` (bool ``[batch]``, host) is True; see :meth:`_maybe_compact`."""
        n = int(keep.sum())
        if self._full is None:
            self._full = {name: getattr(self, name) for name in self._ROW_STATE}
            self._full["dense"] = self.dense
            self._full["adapter"] = {name: getattr(self.adapter, name) for name in self.adapter.row_state}
            self._slot_rows = torch.arange(self.batch)
            sel = self.selection
            if sel is not None:
                self._full["selection"] = (sel.buffer, sel.n_selected, sel.n_candidates, sel.scores)
        # Rows that leave write their final state into the full-batch tensors.
        gone = torch.nonzero(~keep).flatten()
        self._park(gone)
        holes = [i for i in gone.tolist() if i < n]
        movers = [j for j in torch.nonzero(keep).flatten().tolist() if j >= n]
        order = list(range(n))
        for hole, mover in zip(holes, movers):
            order[hole] = mover
        idx = torch.tensor(order)
        used = int(self.dense_len.max())
        dense = self._full["dense"]
        draft = self._full["selection"][0] if self.selection is not None else None
        draft_used = self.selection.base + int(self.draft_len.max()) if draft is not None else 0
        swap = self.keep_stopped_rows
        for hole, mover in zip(holes, movers):
            _move_row(dense, hole, mover, used, swap)
            if draft is not None:
                _move_row(draft, hole, mover, draft_used, swap)
            self._slot_rows[[hole, mover]] = self._slot_rows[[mover, hole]]
        for name in self._ROW_STATE:
            value = getattr(self, name)
            setattr(self, name, value[idx.to(value.device)])
        dev_idx = idx.to(self.device)
        for name in self.adapter.row_state:
            value = getattr(self.adapter, name)
            if isinstance(value, torch.Tensor) and value.shape[0] == self.batch:
                setattr(self.adapter, name, value[idx.to(value.device)])
        self.dense = KVBuffer(dense.k[:, :n], dense.v[:, :n])
        if self.selection is not None:
            sel = self.selection
            sel.buffer = KVBuffer(draft.k[:, :n], draft.v[:, :n])
            sel.n_selected, sel.n_candidates = sel.n_selected[dev_idx], sel.n_candidates[dev_idx]
            if sel.scores is not None:
                sel.scores = sel.scores[:, dev_idx]
        if self.reselect_queries is not None:
            self.reselect_queries = self.reselect_queries[:, dev_idx].contiguous()
        self.batch = n
        self.no_pad = bool((self.pad == 0).all())
        self.cache.seq_length = int(self.dense_len.max())
        self.stats.compactions += 1
        if self.controller is not None:
            self.controller.batch_changed()

    def _park(self, rows: torch.Tensor) -> None:
        """Write current rows ``rows`` (host LongTensor) into the full-batch tensors."""
        ids = self.row_ids[rows]
        for name in self._ROW_STATE:
            full, value = self._full[name], getattr(self, name)
            full[ids.to(full.device)] = value[rows.to(value.device)]

    def _uncompact(self) -> None:
        """Bring back the full batch (every row in its original place) after decoding."""
        if self._full is None:
            return
        self._park(torch.arange(self.batch))
        for name in self._ROW_STATE:
            setattr(self, name, self._full[name])
        self.dense = self._full["dense"]
        for name, value in self._full["adapter"].items():
            setattr(self.adapter, name, value)
        if "selection" in self._full:
            sel = self.selection
            sel.buffer, sel.n_selected, sel.n_candidates, sel.scores = self._full["selection"]
        self.batch = len(self._full["row_ids"])
        self.no_pad = bool((self.pad == 0).all())
        self.reselect_queries = None
        self._full = None

    def _unpermute_buffers(self) -> None:
        """Put every row's K/V back in its own buffer slot (after compaction moved some)."""
        slots = self._slot_rows
        self._slot_rows = None
        if slots is None or bool((slots == torch.arange(len(slots))).all()):
            return
        where = torch.argsort(slots).to(self.device)  # where[r]: the slot holding row r
        buffers = [self.dense] + ([self.selection.buffer] if self.selection is not None else [])
        for buf in buffers:
            for t in (buf.k, buf.v):
                t.copy_(t[:, where])

    def restore(self, snap: dict) -> None:
        self._unpermute_buffers()
        for key, value in snap.items():
            getattr(self, key).copy_(value)
        self.cache.seq_length = self.prompt_len
        self.accept_at = [0] * self.max_gamma
        self.draft_at = [0] * self.max_gamma
        self.row_rounds = 0
        self.committed = 0
        kept = {k: getattr(self.stats, k) for k in ("time_prefill", "time_selection", "n_candidates", "n_selected",
                                                      "draft_cache_mb", "n_visual", "n_text", "budget", "policy",
                                                      "draft_dtype", "draft_weights_mb")}
        self.stats = StdStats(batch_size=self.batch, prompt_len=self.prompt_len, gamma=self.max_gamma,
                              gamma_mode="auto" if self.cfg.auto_gamma else "fixed", **kept)

    def decode(self, gamma: int | str | None = None, sparse_only: bool = False) -> None:
        """Run rounds until every row is done.

        Args:
            gamma: draft length (default: the config's); 0 decodes densely (one token per pass);
                ``"auto"`` lets :class:`~sparse2dense.adaptive.GammaController` choose per round.
            sparse_only: decode with the drafter alone, without verification. Lossy: for measuring
                what skipping verification would cost, never for output.
        """
        t_start = time.perf_counter()
        gamma = self.cfg.gamma if gamma is None else gamma
        self.controller = None
        self.draft_lo = None
        if gamma == "auto":
            self.arms = self._auto_arms()
            self.controller = GammaController(drafters=tuple(a[0] for a in self.arms),
                                              parents=tuple(a[3] for a in self.arms),
                                              pools=self._acceptance_pools(), max_gamma=self.max_gamma)
            self.stats.gamma_mode = "auto"
            if self.selection is None:
                self.controller.speculate = False
                self.controller.reason = self.no_drafter_reason or "no drafter"
            gamma = self.max_gamma
        elif self.selection is None:
            gamma = 0
        self.stats.gamma = gamma
        if sparse_only:
            if self.selection is None:
                raise ValueError("sparse-only decoding needs a drafter (gamma > 0 when the run was prepared).")
            self._sparse_rounds()
        else:
            self._reselect_setup(gamma)
            self._rounds(gamma)
            if not self.pad_finished and bool(self.active.any()):
                # generate() stops when its last row stops; rows that stopped earlier without padding
                # continue to that same length.
                final = int(self.finish_len.max())
                if self._full is not None:
                    final = max(final, int(self._full["finish_len"].max()))
                self.row_limit.fill_(final)
                self.active &= self.n_gen < final
                self._rounds(gamma, until_all_done=True)
        self.stats.time_decode = time.perf_counter() - t_start
        self._uncompact()
        if self.controller is not None:
            summary = self.controller.summary()
            self.stats.auto = summary
            if summary["speculative_rounds"] == 0:
                self.stats.speculation = "off"
                self.stats.fallback_reason = self.controller.reason or (
                    "measured draft and verify costs: no draft length was expected to beat dense decoding")
            elif summary["dense_rounds"] > self.controller.first_dense_rounds:  # they measure the dense step
                self.stats.speculation = "partial"
                self.stats.fallback_reason = (
                    "dense decoding was expected to be faster in some rounds (measured costs and acceptance)")
        elif gamma == 0:
            self.stats.speculation = "off"

    def _auto_arms(self) -> list[tuple[str, Any, int | None, int | None]]:
        """The drafters ``gamma="auto"`` chooses from: each drafter reading the whole selection and,
        with ``budget="auto"``, reading only its best entries (:func:`~sparse2dense.adaptive.budget_variants`).

        A smaller budget costs no second selection: the selection is laid out best-last, so reading
        fewer entries is starting at a later column. A variant is named ``"<drafter>@<entries>"``.
        """
        arms = [(name, module, None, None) for name, module in self.drafters]
        sel = self.selection
        if sel is None or self.cfg.budget != AUTO:
            return arms
        whole = sel.first_column()
        for cands in budget_variants(self.batch):
            lo = self._draft_start(cands)
            if bool((lo == whole).all()):
                continue  # the selection holds no more than this
            for parent, (name, module) in enumerate(self.drafters):
                arms.append((f"{name}@{int((sel.base - lo).max())}", module, cands, parent))
        return arms

    def _acceptance_pools(self) -> tuple[int, ...]:
        """Per arm of :attr:`arms`, the first arm that drafts alike (see ``GammaController.pools``):
        float copies of the same weights (e.g. the model's fp32 and a bf16 copy) reading the same
        entries. Integer copies draft measurably differently (int4 accepts less), so keep their own."""
        keys = []
        for i, (_, _, cands, parent) in enumerate(self.arms):
            name = self.drafters[i if parent is None else parent][0]
            dtype = getattr(torch, name, None)
            weights = "float" if isinstance(dtype, torch.dtype) and dtype.is_floating_point else name
            keys.append((cands, weights))
        return tuple(keys.index(k) for k in keys)

    def _draft_start(self, cands: int) -> torch.Tensor:
        """LongTensor ``[B]``: each row's first draft column when it reads its kept tokens and its
        ``cands`` best candidates (recomputed per round: batch compaction moves rows)."""
        return self.selection.first_column(self.keep.sum(dim=1), cands)

    def _rounds(self, gamma: int, until_all_done: bool = False) -> None:
        """Draft -> verify -> accept -> commit until every row has finished."""
        ctl = self.controller
        while bool((self.active if until_all_done else self.active & ~self.finished).any()):
            room = int((self.row_limit - self.n_gen)[self.active].max())
            arm = 0
            if ctl is not None:
                arm, g = ctl.next_round(room)
                _, self.drafter, cands, _ = self.arms[arm]
                self.draft_lo = self._draft_start(cands) if g > 0 and cands is not None else None
            else:
                g = max(0, min(gamma, room - 1))  # drafts beyond the last allowed token are wasted
            n_batch = self.batch
            # 1. draft
            t0 = time.perf_counter()
            if g > 0:
                give_up = ctl.give_up_after(arm) if ctl is not None and g > 1 else None
                drafts, q = self._draft(g, give_up)
                if drafts.shape[1] < g:
                    ctl.cut_short(arm)
                    g = drafts.shape[1]
            else:
                drafts, q = self.last.new_zeros(self.batch, 0), None
            t1 = time.perf_counter()
            # 2. verify
            target = self._verify(drafts)
            t2 = time.perf_counter()
            # 3. accept: greedy prefix match, or the speculative-sampling rule
            if self.do_sample:
                if q is None:
                    q = target.new_zeros(self.batch, 0, target.shape[-1])
                n_acc, bonus = speculative_sample(drafts, q, target, self.generator)
            else:
                n_acc, bonus = greedy_accept(drafts, target)
            # 4. commit: the committed block is d_1..d_n then the bonus token
            block = torch.cat([drafts, bonus.unsqueeze(1)], dim=1)
            block.scatter_(1, n_acc.unsqueeze(1), bonus.unsqueeze(1))
            was_active = self.active.clone()
            n_acc_host = n_acc.cpu()
            appended = self._commit(block, n_acc_host + 1)
            self._advance(n_acc, bonus, g)
            # statistics: verification outcomes per position, committed tokens per row-round
            n_acc_host = n_acc_host[was_active]
            n_active = int(was_active.sum())
            self.stats.rounds += 1
            self.row_rounds += n_active
            self.stats.drafted += g * n_active
            self.stats.accepted += int(torch.minimum(n_acc_host, appended[was_active]).sum())
            self.committed += int(appended.sum())
            for i in range(g):
                self.draft_at[i] += n_active
                self.accept_at[i] += int((n_acc_host > i).sum())
            self.stats.time_draft += t1 - t0
            self.stats.time_verify += t2 - t1
            if ctl is not None:
                ctl.observe(arm, g, t1 - t0, t2 - t1, n_acc_host.tolist())
            if self.reselect_queries is not None:
                self._reselect_round(was_active)
            self.stats.round_log.append([n_batch, g, round(t1 - t0, 6), round(t2 - t1, 6)])
            self._maybe_compact()

    def _sparse_rounds(self) -> None:
        """Drafter-only decoding: each sparse step's argmax is committed as it is (lossy)."""
        while bool((self.active & ~self.finished).any()):
            t0 = time.perf_counter()
            drafts, _ = self._draft(1)
            self.stats.time_draft += time.perf_counter() - t0
            was_active = self.active.clone()
            appended = self._commit(drafts, torch.ones(self.batch, dtype=torch.long))
            live = was_active.to(self.device)
            self.draft_len += live.long()
            self.dense_len += live.long()  # positions advance as if committed densely
            self.last = torch.where(live, drafts[:, 0], self.last)
            self.stats.rounds += 1
            self.row_rounds += int(was_active.sum())
            self.committed += int(appended.sum())

    # ----------------------------------------------------------------------------- re-selection
    def _reselect_setup(self, gamma) -> None:
        """Prepare re-selection from the verifier's queries when the config asks for it."""
        every = self.cfg.reselect_every
        self.reselect_queries = None
        if every <= 0 or self.selection is None or gamma == 0 or self.selection.scores is None:
            return
        a = self.adapter
        self.reselect_queries = torch.zeros(a.num_layers, self.batch, a.num_q_heads, 1, a.head_dim,
                                            dtype=self.dense.k.dtype, device=self.device)
        self._reselect_count = 0

    def _capture_last_query(self, layer_idx: int, query: torch.Tensor) -> None:
        """Verify-pass hook: keep the query of each row's last committed token (block position 0)."""
        self.reselect_queries[layer_idx].copy_(query[:, :, :1])

    def _reselect_round(self, rows: torch.Tensor) -> None:
        """Fold this round's verifier queries into the candidate scores; re-gather every N rounds.

        ``rows``: bool ``[B]``, rows whose queries were captured this round (host).
        """
        sel = self.selection
        q_cols = torch.full((self.batch, 1), self.prompt_len - 1, dtype=torch.long, device=self.device)
        q_cols[~rows.to(self.device)] = -1
        weight = 0.1  # new evidence per round against the running score
        for layer in range(self.adapter.num_layers):
            keys = self.dense.k[layer][:, :, : self.prompt_len]
            fresh = attention_scores(self.reselect_queries[layer], keys, q_cols, self.pad, self.scaling)
            sel.scores[layer].mul_(1 - weight).add_(fresh, alpha=weight)
        self._reselect_count += 1
        if self._reselect_count % self.cfg.reselect_every == 0:
            for layer in range(self.adapter.num_layers):
                gather_selection(self.dense, sel, layer, sel.scores[layer], self.candidates, self.keep)
            self.stats.reselections += 1

    def _advance(self, n_acc: torch.Tensor, bonus: torch.Tensor, g: int) -> None:
        """Move the committed lengths and refresh the drafter's view of the committed tokens.

        Rows still generating committed ``n_acc + 1`` tokens; rows that just stopped keep their
        lengths (their buffers are no longer read).
        """
        live = self.active.to(self.device)
        step = torch.where(live, n_acc + 1, torch.zeros_like(n_acc))
        old_dense = self.dense_len.clone()
        self.dense_len += step
        self.last = torch.where(live, bonus, self.last)
        if self.selection is not None:
            # Copy the verify pass's exact K/V for [last, d_1..d_g] into the draft buffer; only the
            # first n_acc + 1 of them count (draft_len), the rest are overwritten later.
            sel = self.selection
            t = g + 1
            rows = torch.arange(self.batch, device=self.device).unsqueeze(1)
            src = old_dense.unsqueeze(1) + torch.arange(t, device=self.device)
            dst = sel.base + self.draft_len.unsqueeze(1) + torch.arange(t, device=self.device)
            sel.buffer.k[:, rows, :, dst] = self.dense.k[:, rows, :, src]
            sel.buffer.v[:, rows, :, dst] = self.dense.v[:, rows, :, src]
            self.draft_len += step
        self.cache.seq_length = int(self.dense_len.max())

    def output(self) -> StdOutput:
        new = int(self.finish_len.max()) if bool(self.finished.all()) else int(self.n_gen.max())
        sequences = self.seq[:, : self.prompt_len + new].clone()
        s = self.stats
        s.new_tokens = int(self.n_gen.clamp(max=new).sum())
        s.mean_accepted_per_round = self.committed / self.row_rounds if self.row_rounds else 1.0
        s.acceptance_rate = s.accepted / s.drafted if s.drafted else 0.0
        s.per_position_acceptance = [a / d if d else 0.0 for a, d in zip(self.accept_at[: s.gamma], self.draft_at[: s.gamma])]
        s.dense_cache_mb = self.dense.nbytes() / 2**20
        s.tokens_per_second = s.new_tokens / s.time_decode if s.time_decode > 0 else 0.0
        return StdOutput(sequences, s)


def _move_row(buf: KVBuffer, dst: int, src: int, cols: int, swap: bool) -> None:
    """Copy batch row ``src`` of ``buf`` into row ``dst`` over columns ``[0, cols)``; with ``swap``,
    row ``dst``'s old contents go to row ``src`` (three times the memory traffic of a copy)."""
    for t in (buf.k, buf.v):
        old = t[:, dst, :, :cols].clone() if swap else None
        t[:, dst, :, :cols] = t[:, src, :, :cols]
        if swap:
            t[:, src, :, :cols] = old


def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    budget: int | str = 1024,
    gamma: int | str = 9,
    draft_dtype: torch.dtype | str | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    context_mask: torch.Tensor | None = None,
    config: StdConfig | None = None,
    logits_processor=None,
    stopping_criteria=None,
    streamer=None,
    progress: Callable[[str, int, int], None] | None = None,
    stream_prompt: bool = True,
    do_sample: bool = False,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    generator: torch.Generator | None = None,
    stop_strings: str | list[str] | None = None,
    tokenizer=None,
    prompt_position_ids: torch.Tensor | None = None,
    **model_inputs,
) -> StdOutput:
    """Greedy Sparse-to-Dense decoding: the tokens of dense greedy decoding, produced faster.

    Args:
        model: a transformers causal LM (see :func:`sparse2dense.supported_models`).
        input_ids: LongTensor ``[B, P]``, left-padded when rows differ in length.
        attention_mask: ``[B, P]`` with 0 on left padding (default: all ones).
        max_new_tokens: tokens to generate per row (at least 1).
        budget: prompt KV entries per layer and KV head that the drafter reads, or ``"auto"``.
        gamma: draft tokens per round; 0 runs plain dense decoding on the same fast buffers;
            ``"auto"`` picks each round's draft length from measured costs and acceptance, and
            decodes densely when speculation cannot pay (``stats.speculation`` says which).
        draft_dtype: cheaper drafter weights: ``torch.bfloat16``/``torch.float16``, ``"int8"`` or
            ``"int4"`` (weight-only; Llama, Mistral, Qwen2, Qwen3 on CPU), or ``"auto"``. The verifier
            keeps the model's precision, so the output is unchanged (see :class:`StdConfig`).
        eos_token_id: token id(s) that end a row (default: the model's generation config).
        pad_token_id: fills rows that ended early (default: the model's, else the first EOS, else 0).
        context_mask: bool ``[B, P]``: prompt tokens the drafter may drop (default: the adapter's choice).
        config: a full :class:`StdConfig`; overrides ``budget`` and ``gamma`` when given.
        logits_processor, stopping_criteria, streamer: as in ``model.generate``.
        progress: optional callback ``(phase, done, total)`` for progress display.
        stream_prompt: put the prompt to ``streamer`` first, as ``model.generate`` does.
        do_sample: sample instead of greedy decoding. Speculative sampling keeps the output
            distribution exactly that of dense sampling with the same settings.
        temperature, top_k, top_p, min_p, repetition_penalty: as in ``model.generate``; unset values
            come from ``model.generation_config`` (transformers' own defaults include ``top_k=50``).
            Ignored when ``logits_processor`` is given.
        generator: optional ``torch.Generator`` for sampling; by default the global RNG is used, so
            ``torch.manual_seed`` makes runs repeat.
        stop_strings, tokenizer: stop a row as soon as its output contains one of the strings, at
            exactly the token ``model.generate(stop_strings=..., tokenizer=...)`` stops at.
        prompt_position_ids: the prompt's position ids as ``generate`` prepared them (last dim =
            prompt length); by default the adapter computes them.
        **model_inputs: extra model inputs (vision tensors for Video-LLMs).

    Returns:
        :class:`StdOutput` with ``.sequences`` ``[B, P + new]`` and ``.stats``.
    """
    t_total = time.perf_counter()
    cfg = config if config is not None else StdConfig(budget=budget, gamma=gamma, draft_dtype=draft_dtype)
    adapter = get_adapter(model)
    input_ids, attention_mask = _check_inputs(input_ids, attention_mask, max_new_tokens, adapter)
    eos_ids, pad_token_id = resolve_special_tokens(model, eos_token_id, pad_token_id)
    if context_mask is not None and tuple(context_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"context_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(context_mask.shape)}."
        )
    if stop_strings:
        if tokenizer is None:
            raise ValueError("stop_strings needs the model's tokenizer: pass tokenizer=...")
        from transformers import StoppingCriteriaList, StopStringCriteria

        criteria = StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings)
        stopping_criteria = StoppingCriteriaList([*(stopping_criteria or []), criteria])
    if logits_processor is None:
        logits_processor = _default_processors(
            model, input_ids, do_sample, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
            repetition_penalty=repetition_penalty,
        )
    if streamer is not None:
        if input_ids.shape[0] != 1:
            raise ValueError("streaming supports batch size 1 only, like transformers' streamers.")
        if stream_prompt:
            streamer.put(input_ids.cpu())
    run = _Run(
        model, adapter, cfg, input_ids, attention_mask, max_new_tokens, eos_ids, int(pad_token_id), context_mask,
        logits_processor, stopping_criteria, streamer, model_inputs, progress, do_sample=do_sample,
        generator=generator, prompt_position_ids=prompt_position_ids,
    )
    with torch.inference_mode(), attention_routed(model):
        run.prefill()
        if bool(run.active.any()):
            run.maybe_select()
        run.decode()
    if streamer is not None:
        streamer.end()
    out = run.output()
    out.stats.time_total = time.perf_counter() - t_total
    return out


def resolve_special_tokens(model, eos_token_id=None, pad_token_id=None) -> tuple[list[int], int]:
    """EOS ids and pad id: the given ones, else the model's generation config; pad falls back to
    the first EOS, else 0."""
    gen_cfg = getattr(model, "generation_config", None)
    if eos_token_id is None and gen_cfg is not None:
        eos_token_id = gen_cfg.eos_token_id
    eos_ids = _as_id_list(eos_token_id)
    if pad_token_id is None and gen_cfg is not None:
        pad_token_id = gen_cfg.pad_token_id
    if pad_token_id is None:
        pad_token_id = eos_ids[0] if eos_ids else 0
    return eos_ids, int(pad_token_id)


def _default_processors(model, input_ids, do_sample: bool, **settings):
    """The logits processors ``model.generate`` would build for these settings (None if none).

    Uses transformers' own builder so the processors, their order and their defaults (e.g.
    ``top_k=50`` when sampling) are exactly those of ``model.generate``.
    """
    import copy

    overrides = {k: v for k, v in settings.items() if v is not None}
    for name, value in overrides.items():
        _check_setting(name, value)
    if not do_sample and not overrides:
        return None
    base = getattr(model, "generation_config", None)
    if base is None or not hasattr(model, "_get_logits_processor"):
        raise ValueError("sampling settings need a transformers model with a generation_config.")
    gen_cfg = copy.deepcopy(base)
    gen_cfg.do_sample = do_sample
    for name, value in overrides.items():
        setattr(gen_cfg, name, value)
    procs = model._get_logits_processor(
        generation_config=gen_cfg, input_ids_seq_length=input_ids.shape[1], encoder_input_ids=input_ids,
        logits_processor=None, device=input_ids.device, model_kwargs={},
    )
    return procs if len(procs) else None


def _check_setting(name: str, value) -> None:
    if name == "top_k":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"top_k must be a non-negative integer, got {value!r}.")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}.")
    if name in ("temperature", "repetition_penalty") and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}.")
    if name in ("top_p", "min_p") and not 0 <= value <= 1:
        raise ValueError(f"{name} must be between 0 and 1, got {value}.")


def _check_inputs(input_ids, attention_mask, max_new_tokens, adapter: Adapter):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
        raise ValueError("input_ids must be an integer tensor of shape [batch, prompt_len].")
    if input_ids.ndim == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.ndim != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise ValueError(f"input_ids must have shape [batch, prompt_len] with both > 0, got {tuple(input_ids.shape)}.")
    input_ids = input_ids.long()
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    else:
        if attention_mask.ndim == 1:
            attention_mask = attention_mask.unsqueeze(0)
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}."
            )
        attention_mask = attention_mask.to(input_ids.device).long()
        if bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()):
            raise ValueError("batched prompts must be left-padded (tokenizer padding_side='left').")
        if bool((attention_mask.sum(dim=1) == 0).any()):
            raise ValueError("every row needs at least one non-padding token.")
    limit = adapter.max_positions
    longest = int(attention_mask.sum(dim=1).max())
    if limit is not None and longest + max_new_tokens > limit:
        raise ValueError(
            f"prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the model's context of {limit} tokens."
        )
    return input_ids, attention_mask
