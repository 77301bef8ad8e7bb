"""One batch, decoded to the end: what :func:`sparse2dense.generate` and the benchmark do with an engine.

:func:`sparse2dense.generate` submits its whole batch as one group, prefills it (:meth:`BatchRun.prefill`)
and decodes until every row is done (:meth:`BatchRun.decode`). The benchmark decodes the same
prefill several ways: :meth:`BatchRun.snapshot` after prefill, then per method :meth:`BatchRun.restore`,
perhaps :meth:`BatchRun.reconfigure` and :meth:`BatchRun.select`, and :meth:`BatchRun.decode`.
The prompt's K/V are never overwritten by decoding, and after a snapshot compaction swaps rows
instead of copying them, so every decode starts from byte-identical caches.
"""

from __future__ import annotations

import time

import torch

from .attention import attention_routed
from .config import AUTO, StdConfig
from .stats import StdOutput, StdStats, summarize

_KEPT_STATS = ("time_prefill", "time_selection", "n_candidates", "n_selected", "draft_cache_mb", "n_visual", "n_text",
               "budget", "policy", "draft_dtype", "draft_weights_mb", "batch_size", "prompt_len")
_SLOT_STATE = ("lo", "dense_len", "draft_len", "last", "prompt_end", "n_gen", "limit", "active", "finished", "tokens",
               "candidates", "keep")


class BatchRun:
    """Methods of :class:`~sparse2dense.Engine` for one batch decoded to the end (see the module docstring)."""

    def prefill(self) -> None:
        """Prefill every waiting group to completion (no decoding in between)."""
        with torch.inference_mode(), attention_routed(self.model):
            while self.waiting or self.job is not None:
                self._admit()

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
        with torch.inference_mode(), attention_routed(self.model):
            self._setup(gamma)
            if sparse_only and not self.drafter.ready:
                raise ValueError("sparse-only decoding needs a drafter (gamma > 0 when the run was prepared).")
            while self._decoding():
                self._sparse_round() if sparse_only else self._round()
                self._retire()
        self.stats.time_decode = time.perf_counter() - t_start
        self._summarize_auto(gamma)

    def _sparse_round(self) -> None:
        """Drafter-only decoding: each sparse step's choice is committed as it is (lossy)."""
        s, n = self.slots, self.slots.n
        self.chooser.refresh()
        t0 = time.perf_counter()
        drafts, _ = self.drafter.draft(1, self.chooser)
        self.stats.time_draft += time.perf_counter() - t0
        was_active = s.active[:n].clone()
        appended = s.commit(drafts, torch.ones(n, dtype=torch.long))
        live = was_active.to(s.device).long()
        s.draft_len[:n] += live
        s.dense_len[:n] += live  # positions advance as if committed densely
        s.last[:n] = torch.where(live.bool(), drafts[:, 0], s.last[:n])
        self.stats.rounds += 1
        self.row_rounds += int(was_active.sum())
        self.committed += int(appended.sum())

    def _summarize_auto(self, gamma) -> None:
        ctl, st = self.controller, self.stats
        if ctl is not None:
            summary = ctl.summary()
            st.auto = summary
            if summary["speculative_rounds"] == 0:
                st.speculation = "off"
                st.fallback_reason = ctl.reason or (
                    "measured draft and verify costs: no draft length was expected to beat dense decoding")
            elif summary["dense_rounds"] > ctl.first_dense_rounds:  # they measure the dense step
                st.speculation = "partial"
                st.fallback_reason = (
                    "dense decoding was expected to be faster in some rounds (measured costs and acceptance)")
        elif gamma == 0:
            st.speculation = "off"

    def output(self, group) -> StdOutput:
        """``group``'s rows laid out like ``model.generate``: ``[k, P + new]`` with the stats."""
        lengths = [len(h.tokens) for h in group.handles]
        done = all(f is not None for f in group.finish_len)
        new = max(group.finish_len) if done else max(lengths)
        seq = torch.full((group.size, group.width + new), group.pad_id, dtype=torch.long, device=group.input_ids.device)
        seq[:, : group.width] = group.input_ids
        for row, h in enumerate(group.handles):
            tokens = h.tokens[:new]
            seq[row, group.width : group.width + len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        st = self.stats
        st.batch_size, st.prompt_len = group.size, group.width
        st.new_tokens = sum(min(n, new) for n in lengths)
        st.dense_cache_mb = self.dense.nbytes() / 2**20
        summarize(st, self.committed, self.row_rounds, self.accept_at, self.draft_at)
        return StdOutput(seq, st)

    # ------------------------------------------------------------------ the benchmark's reuse of one prefill
    def select(self, policy: str | None = None) -> None:
        """(Re)build the drafter's selection of the batch's group with ``policy`` (default: the
        config's); with ``gamma="auto"`` none where it would be the dense model (as ``generate``)."""
        group = self.slots.rows[0][0]
        self.drafter.buffer = None  # release the previous draft buffer first
        self.stats.n_candidates, self.stats.n_selected, self.stats.time_selection = [], [], 0.0
        job = group.prefilled
        budget = self._budget(job.keep, job.candidates, self.budget_batch or self.max_batch)
        self.stats.budget = budget
        if self._drop_dense_drafter(group, budget):
            return
        with torch.inference_mode():
            self._select(group, 0, policy, keep_capture=True)

    def reconfigure(self, cfg: StdConfig, weights=None) -> None:
        """Decode the next time with ``cfg`` and drafter ``weights`` ``[(name, module)]`` (default: as
        ``generate`` picks them for ``cfg``); :meth:`select` then builds the selection."""
        if cfg.max_gamma > self.buffer_gamma:
            raise ValueError(f"gamma up to {cfg.max_gamma} needs buffers made for it; these fit {self.buffer_gamma}.")
        self.cfg = cfg
        job = self.slots.rows[0][0].prefilled
        budget = self._budget(job.keep, job.candidates, self.budget_batch or self.max_batch)
        fits = bool((job.keep.sum(dim=1) + job.candidates.sum(dim=1) <= budget).all())
        self._make_drafter(fits_budget=fits, base=None)
        if weights is not None:
            self.drafter.weights, self.drafter.module = weights, weights[0][1]
            own = weights[0][1] is self.model
            self.stats.draft_dtype = None if own else weights[-1][0]
            if own:
                self.stats.draft_weights_mb = 0.0

    def snapshot(self) -> dict:
        """State right after prefill; :meth:`restore` rewinds to it."""
        self.keep_stopped_rows = True
        s = self.slots
        snap = {name: getattr(s, name).clone() for name in _SLOT_STATE}
        snap["rows"], snap["n"] = list(s.rows), s.n
        snap["offsets"] = s.offsets.clone() if s.offsets is not None else None
        snap["handles"] = [(h, list(h.tokens), h.finish_reason) for g in self.groups for h in g.handles]
        snap["groups"] = [(g, list(g.finish_len)) for g in self.groups]
        return snap

    def restore(self, snap: dict) -> None:
        with torch.inference_mode():
            self._restore(snap)

    def _restore(self, snap: dict) -> None:
        s = self.slots
        # where[i]: the slot that now holds the row the snapshot had in slot i (compaction swapped them)
        where = torch.tensor([s.rows.index(row) for row in snap["rows"][: s.size]], device=s.device)
        if not torch.equal(where.cpu(), torch.arange(len(where))):
            for buf in [self.dense] + ([self.drafter.buffer] if self.drafter.ready else []):
                for t in (buf.k, buf.v):
                    t.copy_(t[:, where])
            for t in (self.drafter.n_selected, self.drafter.n_candidates):
                t.copy_(t[where])
        for name in _SLOT_STATE:
            getattr(s, name).copy_(snap[name])
        if snap["offsets"] is not None:
            s.offsets.copy_(snap["offsets"])
        s.rows, s.n = list(snap["rows"]), snap["n"]
        s._changed()
        for h, tokens, reason in snap["handles"]:
            h.tokens[:], h.finish_reason, h.done = tokens, reason, False
        self.groups = [g for g, _ in snap["groups"]]
        for g, finish in snap["groups"]:
            g.finish_len[:], g.limited = finish, False
        self.cache.seq_length = int(s.dense_len[: s.n].max())
        self._reset_counters()
        kept = {k: getattr(self.stats, k) for k in _KEPT_STATS}
        self.stats = StdStats(gamma=self.cfg.max_gamma, gamma_mode="auto" if self.cfg.gamma == AUTO else "fixed", **kept)
        self.controller, self.gamma = None, None
