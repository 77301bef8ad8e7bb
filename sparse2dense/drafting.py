"""The sparse drafter: the model's own weights (or a cheaper copy) attending to a selected part of
each row's prompt KV plus every token it has committed since.

One small interface for the engine:

* :func:`drafter_weights`: which weights draft (the model's, bf16, int8 or int4 copies);
* :meth:`SparseDrafter.install`: take a freshly built :class:`~sparse2dense.selection.Selection`
  (paper, last-tokens or streaming policy) for rows that joined;
* :meth:`SparseDrafter.draft`: ``g`` draft tokens for every batch row, one sparse forward each;
* :meth:`SparseDrafter.commit`: copy the verify pass's exact K/V of the committed tokens in;
* :meth:`SparseDrafter.reselect_round`: optional re-selection from the verifier's own queries.

The draft buffer ``[layers, slots, kv_heads, base + generated, head_dim]`` holds row ``s``'s
selected prompt entries in columns ``[base - n_selected[s], base)``, best last, and its committed
tokens from column ``base`` (see :mod:`sparse2dense.kv`). Reading fewer, better entries is
starting at a later column (``lo``).
"""

from __future__ import annotations

import time

import torch

from .config import AUTO, StdConfig
from .drafter import copy_size_estimate, fast_bf16, free_memory_bytes, make_drafter
from .forward import Runner, batch_view
from .kv import BufferCache, ForwardPlan, KVBuffer, build_mask
from .lean import supports_lean, weight_format_supported
from .selection import Selection, attention_scores, gather_selection


def auto_precision(model, cfg: StdConfig, batch: int, device) -> torch.dtype | str | None:
    """``draft_dtype="auto"``: the cheaper drafter weights this model, device and batch can use.

    Weight-only int8 where the lean forward and its kernel exist (CPU) up to batch 4, else bf16
    where the hardware multiplies it natively. From `python -m sparse2dense.bench.kernels` (the
    MLP products of SmolLM2-135M, 2-core Xeon with AMX), int8 vs bf16: 6.4 vs 15.2 ms at 1 row,
    8.6 vs 11.8 at 4, 15.2 vs 11.5 at 8, 23.4 vs 12.1 at 16. int8 drafts kept fp32's acceptance
    in the README's sweeps; int4 (cheaper still) lost about half of it, so it is not picked.
    Either only when free memory holds the copy twice over; None keeps the model's own weights.
    """
    if next(model.parameters()).dtype != torch.float32:
        return None
    bf16_ok = fast_bf16(device)
    if supports_lean(model) and weight_format_supported("int8", device) and (batch <= 4 or not bf16_ok):
        wanted, size = "int8", copy_size_estimate(model, torch.int8)
    elif bf16_ok and (cfg.auto_gamma or batch >= 4):
        # At batch 1-3 a bf16 step through the model's own forward is not cheaper on CPUs measured so far.
        wanted, size = torch.bfloat16, copy_size_estimate(model, torch.bfloat16)
    else:
        return None
    free = free_memory_bytes(device)
    return None if free is not None and free < 2 * size else wanted


def drafter_weights(model, cfg: StdConfig, batch: int, fits_budget: bool = False):
    """The drafters a run may use: ``([(name, module)], draft_dtype name or None, weight MB)``.

    ``fits_budget``: every prompt fits the drafter budget (the model's own drafter would keep
    everything, so ``gamma="auto"`` does not measure it next to a copy).
    """
    dtype = next(model.parameters()).dtype
    own = [(str(dtype).removeprefix("torch."), model)]
    wanted = cfg.draft_dtype
    if wanted is None and cfg.auto_gamma:
        wanted = AUTO  # gamma="auto" picks the drafter's weights too, unless told otherwise
    if not cfg.speculative or wanted is None or wanted == dtype:
        return own, None, 0.0
    if wanted == AUTO:
        wanted = auto_precision(model, cfg, batch, next(model.parameters()).device)
        if wanted is None:
            return own, None, 0.0
    name, drafter, nbytes = make_drafter(model, wanted)
    low = [(name, drafter)]
    # gamma="auto" also measures the model's own weights, and uses the faster per round, where the
    # copy may not pay: float copies (bf16 products at batch 1 are slower than fp32 on CPUs measured
    # so far) and int4 (lower acceptance). int8 drafted as well as fp32 and cost less at every batch
    # size auto picks it for, so probing fp32 would only cost rounds.
    if cfg.auto_gamma and name != "int8" and not fits_budget:
        return own + low, name, nbytes / 2**20
    return low, name, nbytes / 2**20


class SparseDrafter:
    """Drafting state of the engine's slots; see the module docstring.

    Args:
        runner: the engine's forward passes; slots: its :class:`~sparse2dense.slots.Slots`; cache:
            its ``BufferCache`` (draft passes report the batch's committed length, as verify passes do).
        weights: ``[(name, module)]``: the drafter weights (the first drafts unless told otherwise).
        generated: draft-buffer columns after ``base`` for committed tokens (and a round's drafts).
        base: prompt entries per row the buffer holds; None: taken from the first selection
            installed (which then becomes the buffer; :func:`sparse2dense.generate` does this).
    """

    def __init__(self, runner: Runner, slots, cache: BufferCache, weights, generated: int, base: int | None,
                 like: KVBuffer):
        self.runner, self.slots, self.cache, self.weights = runner, slots, cache, weights
        self.module = weights[0][1]
        self.generated = generated
        size = slots.size
        self.n_selected = torch.zeros(size, dtype=torch.long, device=slots.device)
        self.n_candidates = torch.zeros(size, dtype=torch.long, device=slots.device)
        self.base = base
        self.buffer: KVBuffer | None = None
        self.scores: torch.Tensor | None = None  # [L, slots, Hkv, W] candidate scores (re-selection)
        self.lo: torch.Tensor | None = None  # [n] first column this round (None: the whole selection)
        self.reselect_queries: torch.Tensor | None = None  # [L, slots, Hq, 1, D]
        self.reselect_count = 0
        if base is not None:
            layers, _, heads, _, dim = like.k.shape
            self.buffer = KVBuffer.empty(layers, size, heads, base + generated, dim, like.k.dtype, like.k.device)

    @property
    def ready(self) -> bool:
        return self.buffer is not None

    def nbytes(self) -> int:
        return self.buffer.nbytes() if self.buffer is not None else 0

    def view(self) -> KVBuffer:
        return batch_view(self.buffer, 0, self.slots.n)

    # ------------------------------------------------------------------ selection
    def install(self, sel: Selection, start: int) -> None:
        """Take ``sel`` (built for the rows now in slots ``[start, start + k)``) as their prompt entries.

        The first selection of a drafter without a buffer becomes the buffer (it was built with
        the generated columns); later ones are copied in, each row's best ``base`` entries.
        """
        k = sel.n_selected.shape[0]
        rows = slice(start, start + k)
        if self.buffer is None:
            self.buffer, self.base = sel.buffer, sel.base
            self.n_selected[rows], self.n_candidates[rows] = sel.n_selected, sel.n_candidates
            self.scores = sel.scores
            return
        n_sel = sel.n_selected.clamp(max=self.base)
        for i in range(k):
            m = int(n_sel[i])
            if m:
                for dst, src in ((self.buffer.k, sel.buffer.k), (self.buffer.v, sel.buffer.v)):
                    dst[:, start + i, :, self.base - m : self.base] = src[:, i, :, sel.base - m : sel.base]
        self.n_selected[rows], self.n_candidates[rows] = n_sel, sel.n_candidates
        if sel.scores is not None:
            if self.scores is None:
                layers, _, heads, _ = sel.scores.shape
                self.scores = torch.zeros(layers, self.slots.size, heads, self.slots.capacity,
                                          device=sel.scores.device)
            p = sel.scores.shape[-1]
            self.scores[:, rows] = 0
            self.scores[:, rows, :, :p] = sel.scores

    def first_column(self, n_candidates: int | None = None) -> torch.Tensor:
        """LongTensor ``[n]``: each batch row's first draft column when it reads its kept tokens and
        at most ``n_candidates`` of its best candidates (None: its whole selection)."""
        n = self.slots.n
        sel = self.n_selected[:n]
        if n_candidates is not None:
            sel = torch.minimum(sel, self.slots.keep[:n].sum(dim=1) + n_candidates)
        return self.base - sel

    # ------------------------------------------------------------------ drafting
    def draft(self, g: int, chooser, give_up_s: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Propose ``g`` tokens per batch row with :attr:`module`.

        Returns ``(drafts [n, g'], q)``: for ``shared`` sampling rows ``q`` ``[n, g', V]`` holds the
        distributions the drafts were drawn from (else None). ``g' = g`` unless ``give_up_s`` is
        given and the first step took longer than that many seconds; then ``g' = 1``.
        """
        t_start = time.perf_counter()
        s, n = self.slots, self.slots.n
        buf = self.view()
        tok = s.last[:n]
        drafts: list[torch.Tensor] = []
        q: list[torch.Tensor] = []
        # Row r reads its selected entries from column lo[r] on and then its generated region; the
        # pass reads from the smallest lo. A single row reads unmasked.
        lo = self.lo if self.lo is not None else self.first_column()
        start = int(lo.min())
        uniform = n == 1
        offsets = s.offsets[:n] if s.offsets is not None else None
        for i in range(g):
            col = self.base + s.draft_len[:n] + i  # [n]
            span = int(col.max()) + 1
            mask = None if uniform else build_mask(lo - start, (col - start).unsqueeze(1), span - start)
            # The drafter ignores sliding windows (its columns are not positions); it only proposes.
            plan = ForwardPlan(
                buffer=buf, write_col=None if uniform else col, write_col_int=int(col[0]) if uniform else None,
                q_len=1, span=span, mask=mask, window=self.runner.window, start=start,
            )
            positions = (s.dense_len[:n] - s.lo[:n] + i).unsqueeze(1)
            logits = self.runner.forward(plan, self.cache, tok.unsqueeze(1),
                                         self.runner.adapter.position_ids(positions, offsets), False,
                                         model=self.module)
            if chooser.plain:
                tok, probs = logits[:, 0].argmax(dim=-1), None
            else:
                prefix = torch.stack(drafts, dim=1) if drafts else tok.new_zeros(n, 0)
                picked, probs = chooser.pick(chooser.process(logits, prefix, draft_offset=True), s.n_gen[:n] + i)
                tok = picked[:, 0]
            if probs is not None:
                q.append(probs[:, 0])
            drafts.append(tok)
            if give_up_s is not None and i == 0:
                if tok.is_cuda:
                    torch.cuda.synchronize(tok.device)  # time the step, not its launch
                if time.perf_counter() - t_start > give_up_s:
                    break
        out = torch.stack(drafts, dim=1) if drafts else tok.new_zeros(n, 0)
        return out, (torch.stack(q, dim=1) if q else None)

    def commit(self, dense: KVBuffer, old_len: torch.Tensor, step: torch.Tensor, g: int) -> None:
        """Copy the verify pass's exact K/V of ``[last, d_1..d_g]`` into the draft buffer; the first
        ``step`` ``[n]`` of them are committed (``draft_len`` moves), the rest are overwritten later."""
        s, n, t = self.slots, self.slots.n, g + 1
        rows = torch.arange(n, device=s.device).unsqueeze(1)
        src = old_len.unsqueeze(1) + torch.arange(t, device=s.device)
        dst = self.base + s.draft_len[:n].unsqueeze(1) + torch.arange(t, device=s.device)
        self.buffer.k[:, rows, :, dst] = dense.k[:, rows, :, src]
        self.buffer.v[:, rows, :, dst] = dense.v[:, rows, :, src]
        s.draft_len[:n] += step

    # ------------------------------------------------------------------ re-selection
    def reselect_setup(self, every: int, gamma: int, num_q_heads: int, head_dim: int) -> None:
        """Prepare re-selection every ``every`` rounds from the verifier's queries (0: never)."""
        self.reselect_queries = None
        self.reselect_every = every
        if every <= 0 or self.buffer is None or gamma == 0 or self.scores is None:
            return
        layers = self.buffer.k.shape[0]
        self.reselect_queries = torch.zeros(layers, self.slots.size, num_q_heads, 1, head_dim,
                                            dtype=self.buffer.k.dtype, device=self.buffer.k.device)
        self.reselect_count = 0

    def capture_last_query(self, layer_idx: int, query: torch.Tensor) -> None:
        """Verify-pass hook: keep the query of each row's last committed token (block position 0)."""
        self.reselect_queries[layer_idx][: query.shape[0]].copy_(query[:, :, :1])

    def reselect_round(self, dense: KVBuffer, rows: torch.Tensor, scaling: float) -> bool:
        """Fold this round's verifier queries into the candidate scores; re-gather every N rounds.

        ``rows``: bool ``[n]`` (host): rows whose queries were captured this round. Returns whether
        the selection was gathered anew.
        """
        s, n = self.slots, self.slots.n
        width = int(s.prompt_end[:n].max())
        q_cols = (s.prompt_end[:n] - 1).to(s.device).unsqueeze(1).clone()
        q_cols[~rows.to(s.device)] = -1
        weight = 0.1  # new evidence per round against the running score
        for layer in range(self.buffer.k.shape[0]):
            keys = dense.k[layer][:n, :, :width]
            fresh = attention_scores(self.reselect_queries[layer][:n], keys, q_cols, s.lo[:n], scaling)
            self.scores[layer][:n, :, :width].mul_(1 - weight).add_(fresh, alpha=weight)
        self.reselect_count += 1
        if self.reselect_count % self.reselect_every:
            return False
        sel = Selection(self.view(), self.n_selected[:n], self.base, self.n_candidates[:n])
        dense_view = batch_view(dense, 0, n)
        for layer in range(self.buffer.k.shape[0]):
            gather_selection(dense_view, sel, layer, self.scores[layer][:n, :, :width],
                             s.candidates[:n], s.keep[:n])
        return True

    def move_row(self, dst: int, src: int, swap: bool, move_kv) -> None:
        """Compaction moved batch row ``src`` to ``dst``: its selection goes along."""
        for t in (self.n_selected, self.n_candidates):
            t[[dst, src]] = t[[src, dst]] if swap else t[[src, src]]
        if self.scores is not None:
            self.scores[:, [dst, src]] = self.scores[:, [src, dst]] if swap else self.scores[:, [src, src]]
        used = self.base + int(self.slots.draft_len[: self.slots.n].max())
        move_kv(self.buffer, dst, src, used, swap)
        if self.reselect_queries is not None:
            self.reselect_queries[:, dst] = self.reselect_queries[:, src]
