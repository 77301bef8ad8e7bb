"""Forward passes over sparse2dense's buffers: the model call, its masks, and the dense verify pass.

Every pass runs inside :func:`~sparse2dense.kv.use_plan` with a
:class:`~sparse2dense.kv.ForwardPlan` that says which buffer it writes and which columns each
query reads. Decode-time passes of the model's own weights (verification, dense steps, drafting
at the model's precision) run the exact lean forward where the family has one
(:mod:`sparse2dense.lean`): the same logits, bit for bit, in fewer ops. Prefill keeps the
model's own forward.
"""

from __future__ import annotations

import torch

from .kv import BufferCache, ForwardPlan, KVBuffer, build_mask, use_plan
from .lean import EXACT, LeanDecoder, lean_decoder, supports_exact


class Runner:
    """Runs ``model`` (or a drafter module) on the engine's buffers."""

    def __init__(self, model, adapter):
        self.model = model
        self.adapter = adapter
        self.exact: LeanDecoder | None = lean_decoder(model, EXACT) if supports_exact(model) else None
        self.window = adapter.sliding_window

    def forward(self, plan: ForwardPlan, cache: BufferCache, ids: torch.Tensor, position_ids: torch.Tensor,
                all_logits: bool, model=None, **extra) -> torch.Tensor:
        """Logits (float32) of ``model`` (default: the model) on ``ids`` ``[B, T]`` at ``position_ids``
        (the model's format, e.g. M-RoPE ``[4, B, T]``): ``[B, T, V]``, or ``[B, 1, V]`` without
        ``all_logits``. ``extra``: prefill-only model inputs (pixel values, grids, ...)."""
        if (model is None or model is self.model) and self.exact is not None and not plan.prefill and not extra:
            model = self.exact
        with use_plan(plan):
            if isinstance(model, LeanDecoder):
                return model(ids, position_ids, all_logits)
            out = (model or self.model)(
                input_ids=ids,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=0 if all_logits else 1,
                **extra,
            )
        return out.logits.float()

    def masks(self, lo: torch.Tensor, q_cols: torch.Tensor, span: int):
        """``(mask, sliding mask or None)`` for queries at ``q_cols`` ``[B, T]`` reading columns
        ``[lo[b], q]`` of ``[0, span)`` (see :func:`~sparse2dense.kv.build_mask`)."""
        mask = build_mask(lo, q_cols, span)
        sliding = None
        if self.window is not None and self.window < span:
            sliding = build_mask(lo, q_cols, span, window=self.window)
        return mask, sliding

    def verify(self, dense: KVBuffer, cache: BufferCache, slots, block: torch.Tensor, capture=None) -> torch.Tensor:
        """The dense pass over ``block`` ``[n, T]`` = ``[last, d_1..d_g]`` of the ``n`` batch rows.

        Writes the block's K/V at each row's committed length (rejected entries are overwritten
        by later rounds) and returns the logits at every position ``[n, T, V]``.
        """
        n, t = block.shape
        col = slots.dense_len[:n]
        q_cols = col.unsqueeze(1) + torch.arange(t, device=block.device)
        span = int(col.max()) + t
        uniform = n == 1 or bool((col == col[0]).all())
        if uniform and slots.no_pad and t == 1 and (self.window is None or self.window >= span):
            mask = sliding = None
        else:
            mask, sliding = self.masks(slots.lo[:n], q_cols, span)
        plan = ForwardPlan(
            buffer=dense, write_col=None if uniform else col, write_col_int=int(col[0]) if uniform else None,
            q_len=t, span=span, mask=mask, mask_sliding=sliding, window=self.window, capture=capture,
        )
        positions = q_cols - slots.lo[:n].unsqueeze(1)
        offsets = slots.offsets[:n] if slots.offsets is not None else None
        return self.forward(plan, cache, block, self.adapter.position_ids(positions, offsets), True)


def batch_view(buf: KVBuffer, start: int, stop: int) -> KVBuffer:
    """Slots ``[start, stop)`` of ``buf`` as a buffer of their own (a view: writes land in ``buf``)."""
    return KVBuffer(buf.k[:, start:stop], buf.v[:, start:stop])
