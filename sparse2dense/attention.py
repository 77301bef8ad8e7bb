"""GQA-aware attention over sparse2dense's KV buffers, registered with transformers.

The model's own attention modules project Q/K/V and apply RoPE; :class:`~sparse2dense.kv.BufferCache`
stores K/V; this function does the attention itself, reading the mask from the active
:class:`~sparse2dense.kv.ForwardPlan`:

* short query blocks (drafting, verification, dense decoding) use grouped matmuls: the query heads
  of one KV group are stacked so each cached K/V entry is read once, never repeated per query head;
* prefill blocks use PyTorch SDPA (a memory-efficient kernel; no T x T score matrix in Python).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from .kv import active_plan

ATTN_NAME = "sparse2dense"


def _grouped_attention(query, key, value, mask, scaling, tail_of=None):
    """Attention with query heads grouped per KV head.

    Args:
        query: ``[B, Hq, T, D]``; key, value: ``[B, Hkv, S, D]``; mask: ``[B, 1, 1, T, S]`` or None.
        tail_of: optional callable returning the mask's causal tail ``[T, T]`` at batch 1, or None.

    Returns:
        ``[B, T, Hq, D]`` (the layout transformers' attention functions return).
    """
    b, hq, t, d = query.shape
    hkv, s = key.shape[1], key.shape[2]
    g = hq // hkv
    # Scaling the few query rows is cheaper than scaling the [.., T, S] score matrix.
    q = (query * scaling).reshape(b, hkv, g * t, d)
    if b == 1 and query.dtype == torch.float32:
        # One 2-D matmul per KV head lets BLAS spread each head over all threads; measured ~15%
        # faster than a 3-way batched matmul at batch 1 on a 2-core CPU.
        out = torch.empty(1, hkv, g * t, d, dtype=query.dtype, device=query.device)
        # Usually only the block's own last T columns are masked (causal within the block).
        tail = tail_of() if mask is not None and tail_of is not None else None
        for h in range(hkv):
            scores = torch.mm(q[0, h], key[0, h].t())
            if mask is not None:
                view = scores.view(g, t, s)
                if tail is not None:
                    view[:, :, s - t :].add_(tail)
                else:
                    view.add_(mask[0, 0])
            torch.mm(torch.softmax(scores, dim=-1), value[0, h], out=out[0, h])
        return out.view(1, hq, t, d).transpose(1, 2)
    scores = torch.matmul(q, key.transpose(-1, -2))
    if mask is not None:
        scores = scores.view(b, hkv, g, t, s)
        scores.add_(mask)
        scores = scores.view(b, hkv, g * t, s)
    if scores.dtype != torch.float32:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    else:
        probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, value)  # [B, Hkv, G*T, D]
    return out.view(b, hq, t, d).transpose(1, 2)


def sparse2dense_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention function with transformers' signature; see the module docstring."""
    plan = active_plan()
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    layer_idx = getattr(module, "layer_idx", 0)
    sliding = kwargs.get("sliding_window") is not None
    if sliding and plan.window is None:
        raise RuntimeError("sliding-window layer reached a plan without a sliding-window mask.")
    mask = plan.mask_sliding if sliding and plan.mask_sliding is not None else plan.mask
    if plan.capture is not None:
        plan.capture(layer_idx, query)
    if plan.prefill:
        hq, hkv = query.shape[1], key.shape[1]
        if plan.sdpa_causal:  # no padding, block starts at column 0, window covers the span
            out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=hq != hkv)
        else:
            bool_mask = mask.squeeze(2) == 0  # [B, 1, T, S]
            out = F.scaled_dot_product_attention(
                query, key, value, attn_mask=bool_mask, scale=scaling, enable_gqa=hq != hkv
            )
        return out.transpose(1, 2), None
    tail_of = plan.causal_tail if mask is plan.mask else None
    if query.dtype != key.dtype:
        # A lower-precision drafter reading the model-precision draft cache: attend in the cache's
        # precision and hand the result back in the drafter's.
        out = _grouped_attention(query.to(key.dtype), key, value, mask, scaling, tail_of)
        return out.to(query.dtype), None
    return _grouped_attention(query, key, value, mask, scaling, tail_of), None


AttentionInterface.register(ATTN_NAME, sparse2dense_attention)


@contextlib.contextmanager
def attention_routed(model):
    """Route the model's attention through sparse2dense for the duration of the block.

    Only the language model is routed (a vision encoder keeps its own attention). The model's
    configured implementation (sdpa, eager, ...) is restored on exit, so the user's model behaves
    exactly as before outside sparse2dense calls.
    """
    # The attention modules that own the KV cache read the text config (the model's own config for
    # a text LLM); a vision encoder reads its own config and is left alone.
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    saved = config._attn_implementation_internal
    try:
        config._attn_implementation_internal = ATTN_NAME
        yield
    finally:
        config._attn_implementation_internal = saved
