"""The engine: requests join a running batch and leave it at round boundaries; each round is::

    1. draft   gamma tokens per row, one sparse forward each (attention over the draft buffer only)
    2. verify  [last, d_1..d_gamma] in one dense forward (attention over the dense buffer)
    3. accept  the longest prefix of drafts that dense decoding agrees with, plus one bonus token
    4. commit  move each row's dense length; copy the committed tokens' exact K/V to the draft buffer

Every emitted token is the verifier's choice, so the output is what dense decoding produces. With
``gamma=0`` the loop is plain dense decoding on the same preallocated buffers.

Data flows one way: a request (:mod:`~sparse2dense.requests`) -> prefill into a free slot
(:mod:`~sparse2dense.prefill`) -> selection (:mod:`~sparse2dense.selection`) -> rounds over the
batch (:mod:`~sparse2dense.slots`, :mod:`~sparse2dense.drafting`, :mod:`~sparse2dense.tokens`) ->
the request's handle. The rest of the engine (admission, leaving, the auto controller's arms,
stats) lives in :class:`~sparse2dense.scheduler.Scheduler`, which this class extends.
"""

from __future__ import annotations

import time

import torch

from .acceptance import greedy_accept, speculative_sample
from .adaptive import GammaController, acceptance_pools, auto_budget, budget_variants
from .batchrun import BatchRun
from .config import AUTO
from .prefill import policy_capture
from .scheduler import Scheduler
from .selection import build_draft_cache

#: rounds a request-level engine keeps in ``stats.round_log`` (the oldest half goes past it)
ROUND_LOG_LIMIT = 10_000

__all__ = ["Engine", "auto_budget", "budget_variants", "build_draft_cache", "greedy_accept", "speculative_sample"]


def _move_row(buf, dst: int, src: int, cols: int, swap: bool) -> None:
    """Copy batch row ``src`` of ``buf`` into row ``dst`` over columns ``[0, cols)``; with ``swap``,
    row ``dst``'s old contents go to row ``src`` (three times the memory traffic of a copy)."""
    for t in (buf.k, buf.v):
        old = t[:, dst, :, :cols].clone() if swap else None
        t[:, dst, :, :cols] = t[:, src, :, :cols]
        if swap:
            t[:, src, :, :cols] = old


class Engine(Scheduler, BatchRun):
    """Sparse-to-Dense decoding for a batch of requests that come and go.

    Example::

        engine = sparse2dense.Engine(model, max_batch=8, gamma="auto", budget="auto")
        a = engine.submit(tok("Hello", return_tensors="pt").input_ids, max_new_tokens=32)
        b = engine.submit(other_ids, max_new_tokens=64, do_sample=True, seed=7, temperature=0.7)
        engine.run()  # or call engine.step() from your own loop
        print(tok.decode(a.tokens), a.finish_reason, a.stats.acceptance_rate)

    Args:
        model: a transformers causal LM or Video-LLM (see :func:`sparse2dense.supported_models`).
        max_batch: rows decoded together; buffers are allocated for this many at construction.
        budget, gamma, draft_dtype: as in :func:`sparse2dense.generate` (``config`` overrides them).
        max_seq_len: prompt plus new tokens per request (default: the model's context, at most 8192).
        max_new_tokens: the most new tokens a request may ask for (default: ``max_seq_len``); sizes
            the drafter's buffer.
        tokenizer: needed for ``stop_strings``.
        prefill_tokens_per_step: prompt tokens a joining request prefills between two rounds while
            other rows decode (text models; a Video-LLM prompt is prefilled in one pass).
        speculate_while_prefilling: with ``gamma="auto"``, rounds that share a step with a prefill
            chunk are dense unless this is True (a costlier round would delay the joining
            request's first token and the queue behind it; measured in ``docs/serve.md``).

    Raises ``ValueError`` for a model or setting it cannot run, and
    :class:`~sparse2dense.requests.AdmissionError` from :meth:`submit` for a request that can
    never fit (it leaves running requests untouched).
    """

    def move_row(self, buf, dst: int, src: int, cols: int, swap: bool) -> None:
        """Compaction's row move (see :func:`_move_row`)."""
        _move_row(buf, dst, src, cols, swap)

    # ------------------------------------------------------------------ selection
    def _budget(self, keep, candidates, batch: int) -> int:
        """The drafter budget for rows with these masks (``budget="auto"``: the largest of theirs)."""
        if self.cfg.budget != AUTO:
            return int(self.cfg.budget)
        n_keep, n_cand = keep.sum(dim=1).tolist(), candidates.sum(dim=1).tolist()
        return max(auto_budget(k, c, batch) for k, c in zip(n_keep, n_cand))

    def _select(self, group, start: int, policy: str | None = None, keep_capture: bool = False) -> None:
        """Build the drafter's selection for ``group``'s rows in slots ``[start, start + k)``."""
        t0 = time.perf_counter()
        job = group.prefilled
        policy = policy or self.cfg.policy
        budget = self._budget(job.keep, job.candidates, self.budget_batch or group.size)
        capture = policy_capture(job.capture, job.keep, job.mask.bool(), self.cfg, policy)
        sel = build_draft_cache(
            job.view, group.width, job.pad, job.candidates, job.keep, budget, policy, capture, self.scaling,
            extra_capacity=0 if self.drafter.ready else self.drafter.generated,
            keep_scores=self.cfg.reselect_every > 0 and policy != "streaming",
        )
        self.drafter.install(sel, start)
        if not keep_capture:
            job.capture = None
        self._selected(group, sel, budget, policy, time.perf_counter() - t0)

    def _arms(self) -> list[tuple[str, object, int | None, int | None]]:
        """The drafters ``gamma="auto"`` chooses from: each weight set reading the whole selection
        and, with ``budget="auto"``, reading only its best entries (``"<weights>@<entries>"``).

        A smaller budget costs no second selection: the selection is laid out best-last, so reading
        fewer entries is starting at a later column.
        """
        weights = self.drafter.weights
        arms = [(name, module, None, None) for name, module in weights]
        if not self.drafter.ready or self.cfg.budget != AUTO or self.slots.n == 0:
            return arms
        whole = self.drafter.first_column()
        for cands in budget_variants(self.slots.n if self.budget_batch else self.max_batch):
            lo = self.drafter.first_column(cands)
            if bool((lo == whole).all()):
                continue  # the selection holds no more than this
            for parent, (name, module) in enumerate(weights):
                arms.append((f"{name}@{int((self.drafter.base - lo).max())}", module, cands, parent))
        return arms

    def _controller(self, arms) -> GammaController:
        return GammaController(drafters=tuple(a[0] for a in arms), parents=tuple(a[3] for a in arms),
                               pools=self._acceptance_pools(arms), max_gamma=self.cfg.max_gamma)

    # ------------------------------------------------------------------ planning and recording rounds
    def _setup(self, gamma) -> None:
        """Decoding settings: the draft length, or the auto controller and its arms."""
        self.controller, self.arms = None, []
        self.drafter.lo = None
        if gamma == AUTO:
            self.arms = self._arms()
            self.controller = self._controller(self.arms)
            self.stats.gamma_mode = "auto"
            if not self.drafter.ready:
                self.controller.speculate = False
                self.controller.reason = self.no_drafter_reason or "no drafter"
            gamma = self.cfg.max_gamma
        elif not self.drafter.ready:
            gamma = 0
        self.gamma = self.stats.gamma = gamma
        a = self.adapter
        self.drafter.reselect_setup(self.cfg.reselect_every, gamma, a.num_q_heads, a.head_dim)

    def _acceptance_pools(self, arms) -> tuple[int, ...]:
        return acceptance_pools(arms, [name for name, _ in self.drafter.weights])

    def _plan_round(self) -> tuple[int, int, float | None]:
        """``(arm, draft length, give-up seconds)`` for the next round."""
        s, n, ctl = self.slots, self.slots.n, self.controller
        room = int((s.limit[:n] - s.n_gen[:n])[s.active[:n]].max())
        if ctl is None:
            return 0, max(0, min(self.gamma, room - 1)), None  # drafts past the last allowed token are wasted
        if self.job is not None and not self.speculate_while_prefilling:
            # A prompt is being prefilled a chunk per step: a costlier round would delay its first
            # token (and the queue behind it) more than its extra tokens gain, so rounds stay dense
            # until admission is done. Their costs still teach the controller the dense step.
            return 0, 0, None
        arm, g = ctl.next_round(room)
        _, self.drafter.module, cands, _ = self.arms[arm]
        self.drafter.lo = self.drafter.first_column(cands) if g > 0 and cands is not None else None
        return arm, g, ctl.give_up_after(arm) if g > 1 else None

    def _record(self, arm: int, g: int, draft_s: float, verify_s: float, n_acc: torch.Tensor,
                appended: torch.Tensor, was_active: torch.Tensor) -> None:
        """Round statistics: verification outcomes per position, committed tokens per row-round."""
        s, st = self.slots, self.stats
        n_batch = s.n
        accepted = torch.minimum(n_acc, appended)
        for r in torch.nonzero(was_active).flatten().tolist():
            group, i = s.rows[r]
            hs = group.handles[i].stats
            hs.rounds += 1
            hs.drafted += g
            hs.accepted += int(accepted[r])
            if g:
                hs.speculation = "on"
                name = self.arms[arm][0] if self.arms else self.drafter.weights[0][0]
                hs.drafters[name] = hs.drafters.get(name, 0) + 1
        n_acc = n_acc[was_active]
        n_active = int(was_active.sum())
        st.rounds += 1
        self.row_rounds += n_active
        st.drafted += g * n_active
        st.accepted += int(accepted[was_active].sum())
        self.committed += int(appended.sum())
        for i in range(g):
            self.draft_at[i] += n_active
            self.accept_at[i] += int((n_acc > i).sum())
        st.time_draft += draft_s
        st.time_verify += verify_s
        if self.controller is not None:
            self.controller.observe(arm, g, draft_s, verify_s, n_acc.tolist())
        if self.drafter.reselect_queries is not None:
            if self.drafter.reselect_round(self.dense, was_active, self.scaling):
                st.reselections += 1
        st.round_log.append([n_batch, g, round(draft_s, 6), round(verify_s, 6)])
        if self.budget_batch is None and len(st.round_log) > ROUND_LOG_LIMIT:  # a long-running engine
            del st.round_log[: ROUND_LOG_LIMIT // 2]

    # ------------------------------------------------------------------ the round
    def _round(self) -> None:
        """One draft -> verify -> accept -> commit round for every row of the decoding batch."""
        s, ctl, n = self.slots, self.controller, self.slots.n
        self.chooser.refresh()
        arm, g, give_up = self._plan_round()
        t0 = time.perf_counter()
        # 1. draft: g tokens per row from the sparse drafter (q: what sampled rows drew them from)
        drafts, q = self.drafter.draft(g, self.chooser, give_up) if g > 0 else (s.last[:n].new_zeros(n, 0), None)
        if drafts.shape[1] < g:
            ctl.cut_short(arm)
            g = drafts.shape[1]
        t1 = time.perf_counter()
        # 2. verify: one dense pass over [last, d_1..d_g]: the dense choice at every position
        capture = self.drafter.capture_last_query if self.drafter.reselect_queries is not None else None
        logits = self.runner.verify(self.dense_view(), self.cache, s, torch.cat([s.last[:n, None], drafts], 1), capture)
        target, p = self.chooser.pick(self.chooser.process(logits, drafts), s.n_gen[:n], draw=False)
        t2 = time.perf_counter()
        # 3. accept: the longest matching prefix plus a bonus token, or the speculative-sampling
        #    rule for rows that sample from a shared generator
        if self.chooser.all_shared:
            n_acc, bonus = speculative_sample(drafts, q if q is not None else p[:, :0], p, self.chooser.shared[0][0])
        else:
            n_acc, bonus = greedy_accept(drafts, target)
            for gen, rows in self.chooser.shared:
                q_rows = q[rows] if q is not None else p[rows][:, :0]
                n_acc[rows], bonus[rows] = speculative_sample(drafts[rows], q_rows, p[rows], gen)
        # 4. commit: d_1..d_n, then the bonus token; lengths move; the drafter gets the exact K/V
        block = torch.cat([drafts, bonus.unsqueeze(1)], dim=1)
        block.scatter_(1, n_acc.unsqueeze(1), bonus.unsqueeze(1))
        was_active = s.active[:n].clone()
        n_acc_host = n_acc.cpu()
        appended = s.commit(block, n_acc_host + 1)
        old, step = s.advance(n_acc, bonus)
        if self.drafter.ready:
            self.drafter.commit(self.dense, old, step, g)
        self.cache.seq_length = int(s.dense_len[:n].max())
        self._record(arm, g, t1 - t0, t2 - t1, n_acc_host, appended, was_active)
