"""The engine's bookkeeping: requests in, rows out, and what happens between two rounds.

At each :meth:`Scheduler.step`:

1. **admit**: cancellations take effect; the first waiting request is prefilled into the slot after
   the batch (one chunk per step while other rows decode; all of it when none do) and joins the
   batch when its prefill is done, with its first token and its drafter selection;
2. **round**: one draft -> verify -> accept -> commit round for every decoding row
   (:meth:`sparse2dense.Engine._round`);
3. **retire**: rows that stopped get their handles finished; once enough have, a compaction moves
   rows from the back of the batch into their slots (``stats.compactions``), and the auto
   controller rescales its costs to the new batch.

:class:`~sparse2dense.Engine` subclasses this and supplies the round and the drafter selection.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import torch

from .adapters import get_adapter
from .attention import attention_routed
from .config import AUTO, StdConfig
from .drafter import free_memory_bytes
from .drafting import SparseDrafter, drafter_weights
from .forward import Runner, batch_view
from .intake import SAMPLING_SETTINGS, request_group
from .kv import BufferCache, KVBuffer
from .prefill import PrefillJob
from .requests import Handle
from .slots import Slots
from .stats import StdStats
from .tokens import TokenChooser

DEFAULT_MAX_SEQ_LEN = 8192


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return value


class Scheduler:
    """State of an engine and everything but the round; see the module docstring and :class:`~sparse2dense.Engine`."""

    def __init__(self, model, *, max_batch: int = 8, budget: int | str = 1024, gamma: int | str = 9,
                 draft_dtype=None, config: StdConfig | None = None, max_seq_len: int | None = None,
                 max_new_tokens: int | None = None, tokenizer=None, prefill_tokens_per_step: int = 512,
                 speculate_while_prefilling: bool = False, _batch: int | None = None):
        cfg = config if config is not None else StdConfig(budget=budget, gamma=gamma, draft_dtype=draft_dtype)
        self.model, self.cfg, self.tokenizer = model, cfg, tokenizer
        self.adapter = a = get_adapter(model)
        param = next(model.parameters())
        self.device = param.device
        self.max_batch = _positive("max_batch", max_batch)
        limit = a.max_positions
        self.max_seq_len = _positive("max_seq_len", max_seq_len or min(limit or DEFAULT_MAX_SEQ_LEN, DEFAULT_MAX_SEQ_LEN))
        if limit is not None and self.max_seq_len > limit and _batch is None:  # generate() checks real tokens
            raise ValueError(f"max_seq_len={self.max_seq_len} exceeds the model's context of {limit} tokens.")
        self.max_new_tokens = min(_positive("max_new_tokens", max_new_tokens or self.max_seq_len), self.max_seq_len)
        self.prefill_tokens_per_step = _positive("prefill_tokens_per_step", prefill_tokens_per_step)
        self.speculate_while_prefilling = bool(speculate_while_prefilling)
        # generate(): one batch; budget="auto" and draft_dtype="auto" see its size, and the drafter's
        # buffer is the first selection itself (sized to it).
        self.budget_batch = _batch
        self.buffer_gamma = cfg.max_gamma  # the longest draft the buffers have room for
        capacity = self.max_seq_len + cfg.max_gamma + 2
        self._check_memory(capacity)
        self.runner = Runner(model, a)
        self.dense = KVBuffer.empty(a.num_layers, self.max_batch, a.num_kv_heads, capacity, a.head_dim, param.dtype,
                                    self.device)
        self.cache = BufferCache(a.num_layers)
        self.slots = Slots(self.max_batch, capacity, self.device)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.chooser = TokenChooser(self.slots, head.weight.shape[0] if head is not None else a.text_config.vocab_size)
        attn = next((m for m in model.modules() if hasattr(m, "scaling") and hasattr(m, "layer_idx")), None)
        self.scaling = getattr(attn, "scaling", a.head_dim**-0.5)
        self.stats = StdStats(batch_size=_batch or 0, gamma=cfg.max_gamma, policy=cfg.policy,
                              gamma_mode="auto" if cfg.auto_gamma else "fixed")
        self.waiting: deque = deque()
        self.job: PrefillJob | None = None
        self.groups: list = []  # groups with rows in the slots
        self.controller = None
        self.arms: list = []
        self.gamma: int | None = None  # the decoding draft length (None: not set up yet)
        self.score_policies: set[str] | None = None  # policies prefill captures queries for (bench)
        self.keep_capture = False  # keep the prefill's captured queries for another selection (bench)
        self.select_on_join = True  # build a joining row's drafter selection (the bench times its own)
        self.keep_stopped_rows = False  # compaction swaps rows (restore() puts every prompt back)
        self.no_drafter_reason = ""
        self._lock = threading.Lock()
        self._cancel: set[int] = set()
        self._reset_counters()
        self.drafter: SparseDrafter | None = None
        if _batch is None:
            self._make_drafter(fits_budget=False, base=self._draft_base() if cfg.speculative else None)

    # ------------------------------------------------------------------ construction helpers
    def _draft_base(self) -> int:
        """Prompt entries per row the drafter's buffer holds (a row's best ones, if it selects more)."""
        cfg, kept = self.cfg, self.cfg.sink_tokens + self.cfg.keep_last
        if cfg.budget != AUTO:
            return max(int(cfg.budget), kept)
        return (1024 if self.max_batch <= 1 else 256) + max(256, kept)

    def _check_memory(self, capacity: int) -> None:
        a, elem = self.adapter, next(self.model.parameters()).element_size()
        per_column = 2 * a.num_layers * a.num_kv_heads * a.head_dim * elem
        need = per_column * self.max_batch * (capacity + (self.max_new_tokens + 1300 if self.cfg.speculative else 0))
        free = free_memory_bytes(self.device)
        if free is not None and need > free:
            raise ValueError(f"the KV buffers for max_batch={self.max_batch} x max_seq_len={self.max_seq_len} need "
                             f"{need / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB free; lower either.")

    def _make_drafter(self, fits_budget: bool, base: int | None) -> None:
        weights, name, mb = drafter_weights(self.model, self.cfg, self.budget_batch or self.max_batch, fits_budget)
        self.stats.draft_dtype, self.stats.draft_weights_mb = name, mb
        generated = self.max_new_tokens + self.buffer_gamma + 2
        self.drafter = SparseDrafter(self.runner, self.slots, self.cache, weights, generated, base, self.dense)

    def _reset_counters(self) -> None:
        g = self.buffer_gamma
        self.accept_at, self.draft_at = [0] * g, [0] * g
        self.row_rounds = self.committed = 0

    def dense_view(self) -> KVBuffer:
        return batch_view(self.dense, 0, self.slots.n)

    # ------------------------------------------------------------------ public API
    def submit(self, input_ids: torch.Tensor, *, max_new_tokens: int, eos_token_id=None, pad_token_id=None,
               do_sample: bool = False, seed: int | None = None, temperature: float | None = None,
               top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
               repetition_penalty: float | None = None, logits_processor=None, stopping_criteria=None,
               stop_strings=None, streamer=None, callback=None, context_mask=None, **model_inputs) -> Handle:
        """Queue one request; it joins the batch at a coming round boundary. Thread-safe.

        Args:
            input_ids: LongTensor ``[L]`` or ``[1, L]``.
            max_new_tokens: tokens to generate (at least 1).
            eos_token_id, pad_token_id: as in ``model.generate`` (default: the model's).
            do_sample, temperature, top_k, top_p, min_p, repetition_penalty: as in
                ``model.generate``. A sampled request draws from exactly dense sampling's
                distribution; ``seed`` (default: one drawn from the global RNG) reproduces its
                tokens whatever else runs in the batch.
            logits_processor, stopping_criteria: transformers lists for this request alone.
            stop_strings: stop after one of these strings (needs the engine's ``tokenizer``).
            streamer: a transformers streamer (``put``/``end``); callback: ``callback(handle, new_ids)``
                after each round that commits tokens, and once with ``[]`` when the request ends.
            context_mask: bool ``[L]``: prompt tokens the drafter may drop (default: the adapter's).
            **model_inputs: the model's multimodal inputs (pixel values, grids, ...) for this request.

        Returns:
            a :class:`~sparse2dense.requests.Handle`.
        """
        settings = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                        repetition_penalty=repetition_penalty)
        assert tuple(settings) == SAMPLING_SETTINGS
        group = request_group(self, input_ids, max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                              do_sample=do_sample, seed=seed, logits_processor=logits_processor,
                              stopping_criteria=stopping_criteria, stop_strings=stop_strings, streamer=streamer,
                              callback=callback, context_mask=context_mask, settings=settings,
                              model_inputs=model_inputs)
        return self.submit_group(group).handles[0]

    def submit_group(self, group):
        """Queue a :class:`~sparse2dense.requests.Group` (what :func:`sparse2dense.generate` submits)."""
        if group.size > self.max_batch:
            raise ValueError(f"a batch of {group.size} rows exceeds max_batch={self.max_batch}.")
        with self._lock:
            self.waiting.append(group)
        return group

    def cancel(self, handle: Handle) -> None:
        """Stop ``handle``'s request at the next round boundary (``finish_reason="cancelled"``). Thread-safe."""
        with self._lock:
            self._cancel.add(handle.id)

    def abort(self, message: str) -> None:
        """End every request, waiting or running, with ``finish_reason="error"`` and ``message``."""
        with self._lock:
            groups, self.waiting = list(self.waiting), deque()
        groups += ([self.job.group] if self.job is not None else []) + list(self.groups)
        self.job, self.groups = None, []
        for group in groups:
            for h in group.handles:
                if not h.done:
                    h.error = h.error or message
                    self._close(h, "error", group)
        self.slots.active.zero_()
        self.slots.shrink(0)

    def pending(self) -> bool:
        """Whether anything is waiting, prefilling or decoding."""
        return bool(self.waiting) or self.job is not None or self._decoding()

    def step(self) -> None:
        """Admit waiting requests, then run one round for every decoding row (see the module docstring)."""
        with torch.inference_mode(), attention_routed(self.model):
            self._admit()
            if self._decoding():
                if self.gamma is None:
                    self._setup(self.cfg.gamma)
                self._round()
                self._retire()

    def run(self) -> None:
        """Step until every submitted request is done."""
        while self.pending():
            self.step()

    # ------------------------------------------------------------------ admission
    def _decoding(self) -> bool:
        return bool(self.slots.active[: self.slots.n].any())

    def _take_cancellations(self) -> None:
        with self._lock:
            ids, self._cancel = self._cancel, set()
            for group in [g for g in self.waiting if any(h.id in ids for h in g.handles)]:
                self.waiting.remove(group)
                for h in group.handles:
                    self._close(h, "cancelled", group)
        if self.job is not None and any(h.id in ids for h in self.job.group.handles):
            for h in self.job.group.handles:
                self._close(h, "cancelled", self.job.group)
            self.job = None
        s = self.slots
        for r in range(s.n):
            if s.active[r] and s.rows[r][0].handles[s.rows[r][1]].id in ids:
                s.active[r] = False
                s.rows[r][0].handles[s.rows[r][1]].finish_reason = "cancelled"
        self._retire()

    def _admit(self) -> None:
        """Prefill waiting requests into the slots after the batch, up to ``prefill_tokens_per_step``
        prompt tokens while rows decode (a prefill in progress runs to its end when none do)."""
        if self._cancel:
            self._take_cancellations()
        left = self.prefill_tokens_per_step
        while left > 0:
            if self.job is None:
                if not self.waiting:
                    return
                group = self.waiting[0]
                if self.slots.holes() and self._compactable():
                    self._compact()
                if self.slots.n + group.size > self.slots.size:
                    return  # full: it waits for rows to leave
                with self._lock:
                    self.waiting.popleft()
                self.job = self._start_prefill(group, self.slots.n)
            decoding, before = self._decoding(), self.job.done_tokens
            try:
                while not self.job.step(max(left, 128) if decoding else None) and not decoding:
                    pass
            except (ValueError, RuntimeError, IndexError, TypeError) as exc:
                if self.budget_batch is not None:
                    raise  # generate(): the caller's own inputs; let it see the model's error
                self._fail(self.job.group, exc)  # a request whose inputs the model rejects; the rest go on
                self.job = None
                continue
            left -= self.job.done_tokens - before
            if not self.job.done:
                return
            job, self.job = self.job, None
            self._join(job)

    def _start_prefill(self, group, start: int) -> PrefillJob:
        ids, valid = group.input_ids.to(self.device), group.attention_mask.to(self.device).bool()
        if group.context_mask is not None:
            candidates = group.context_mask.to(self.device).bool() & valid
        else:
            candidates = self.adapter.candidate_mask(ids, valid, self.cfg)
        keep = valid & ~candidates
        visual = self.adapter.visual_mask(ids)
        visual = visual & valid if visual is not None else torch.zeros_like(valid)
        self.stats.n_visual += visual.sum(dim=1).tolist()
        self.stats.n_text += (valid & ~visual).sum(dim=1).tolist()
        policies = (self.score_policies or {self.cfg.policy}) if self.cfg.speculative else set()
        job = PrefillJob(self.runner, self.dense, group, start, self.cfg, keep, policies)
        job.candidates, job.keep = candidates, keep
        group.prefilled = job
        now = time.perf_counter()
        for h in group.handles:
            h.stats.time_queued = now - h.submitted_at
            h.stats.prompt_tokens = h.prompt_len
        return job

    def _join(self, job: PrefillJob) -> None:
        """A finished prefill: first tokens, drafter selection, and the rows join the batch."""
        group, start, k, s = job.group, job.start, job.group.size, self.slots
        self.stats.time_prefill += job.seconds
        first = self.chooser.first(group, job.logits)
        s.place(group, start, job.candidates, job.keep, job.offsets)
        s.last[start : start + k] = first
        s.commit(first.unsqueeze(1), torch.ones(k, dtype=torch.long), start=start)
        self.groups.append(group)
        now = time.perf_counter()
        for h in group.handles:
            h.stats.time_prefill = job.seconds
            h.stats.time_first_token = now - h.submitted_at
        budget = self._budget(job.keep, job.candidates, self.budget_batch or self.max_batch)
        if self.budget_batch is not None:
            self.stats.budget = budget
            fits = bool((job.keep.sum(dim=1) + job.candidates.sum(dim=1) <= budget).all())
            self._make_drafter(fits_budget=fits, base=None)
        live = bool(s.active[start : start + k].any())
        if self.select_on_join and self.cfg.speculative and live and not self._drop_dense_drafter(group, budget):
            self._select(group, start, keep_capture=self.keep_capture)
        s.join(k)
        self.cache.seq_length = int(s.dense_len[: s.n].max())
        if self.controller is not None:
            self.controller.batch_changed()
        self._retire(compact=False)  # rows done at their first token leave after the next round

    def _drop_dense_drafter(self, group, budget: int) -> bool:
        """``generate()`` with ``gamma="auto"``: no drafter when it would be the dense model itself (the
        model's own weights over every prompt entry); says why in ``no_drafter_reason``."""
        if self.budget_batch is None or not self.cfg.auto_gamma:
            return False
        job = group.prefilled
        if not all(m is self.model for _, m in self.drafter.weights):
            return False
        if not bool((job.keep.sum(dim=1) + job.candidates.sum(dim=1) <= budget).all()):
            return False
        self.no_drafter_reason = (
            f"the prompt ({group.width} tokens) fits the drafter budget ({budget}): "
            "a drafter would cost as much as dense decoding")
        return True

    def _selected(self, group, sel, budget: int, policy: str, seconds: float) -> None:
        """Stats of a selection just installed."""
        self.stats.policy = policy
        self.stats.n_candidates += sel.n_candidates.tolist()
        self.stats.n_selected += sel.n_selected.tolist()
        self.stats.draft_cache_mb = self.drafter.nbytes() / 2**20
        self.stats.time_selection += seconds
        for h, c, n in zip(group.handles, sel.n_candidates.tolist(), sel.n_selected.tolist()):
            h.stats.n_candidates, h.stats.n_selected = c, min(n, self.drafter.base)

    # ------------------------------------------------------------------ leaving
    def _close(self, handle: Handle, reason: str | None, group=None) -> None:
        handle.done = True
        handle.finish_reason = handle.finish_reason or reason or "length"
        st = handle.stats
        st.new_tokens = len(handle.tokens)
        st.time_total = time.perf_counter() - handle.submitted_at
        st.finish()
        self.chooser.forget(handle.id)
        if group is not None and group.callback is not None:
            group.callback(handle, [])  # the end of the request

    def _fail(self, group, exc: BaseException) -> None:
        """A request whose prefill raised: it ends with ``finish_reason="error"``; nothing else changes."""
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        for h in group.handles:
            h.error = f"the model could not run this request's inputs: {message}"
            self._close(h, "error", group)

    def _retire(self, compact: bool = True) -> None:
        """Finish the handles of rows that stopped; compact the batch once enough have."""
        s = self.slots
        for group in self.groups:
            s.limit_unpadded(group)
        for r in range(s.n):
            if s.rows[r] is None or s.active[r]:
                continue
            group, i = s.rows[r]
            if not group.handles[i].done:
                self._close(group.handles[i], None, group)
                if group.done and group.streamer is not None:
                    group.streamer.end()
        self.groups = [g for g in self.groups if not g.done]
        n_done = s.holes()
        if compact and self.job is None and n_done and self._compactable():
            if n_done == s.n and self.budget_batch is None:
                s.shrink(0)  # everyone left: nothing to move
            elif n_done < s.n and n_done >= max(1, s.n // 8):
                self._compact()

    def _compactable(self) -> bool:
        return all(s_row[0].compactable for s_row in self.slots.rows[: self.slots.n] if s_row is not None)

    def _compact(self) -> None:
        """Drop the stopped rows from the batch: live rows from the back take their slots."""
        s = self.slots
        moves, m = s.moves()
        used = int(s.dense_len[: s.n].max())
        for hole, mover in moves:
            self.move_row(self.dense, hole, mover, used, self.keep_stopped_rows)
            if self.drafter.ready:
                self.drafter.move_row(hole, mover, self.keep_stopped_rows, self.move_row)
            s.move(hole, mover, self.keep_stopped_rows)
        s.shrink(m)
        if m:
            self.cache.seq_length = int(s.dense_len[:m].max())
        self.stats.compactions += 1
        if self.controller is not None:
            self.controller.batch_changed()
