"""GQA-aware attention over sparse2dense's KV buffers, registered with transformers.

The model's own attention modules project Q/K/V and apply RoPE; :class:`~sparse2dense.kv.BufferCache`
stores K/V; this function does the attention itself, reading the mask from the active
:class:`~sparse2dense.kv.ForwardPlan`:

* short query blocks (drafting, verification, dense decoding) stack the query heads of each KV
  group into one query block, so each cached K/V entry is read once, never repeated per query head;
* prefill blocks use PyTorch SDPA (a memory-efficient kernel; no T x T score matrix in Python).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from .kv import active_plan

ATTN_NAME = "sparse2dense"


# At batch 1, once the cache outgrows the CPU caches, per-head 2-D products stream it faster than
# PyTorch's fused SDPA kernel; on short spans SDPA is faster. `python -m sparse2dense.bench.kernels`
# on a 2-core Xeon, 30 layers: 1024 columns 3.8 ms per-head vs 2.2 ms SDPA, 2048 columns 8.2 vs 8.2,
# 8000 columns 29.8 vs 34.4 (6 queries: 43.7 vs 52.3). At batch > 1 SDPA serves every span in one
# call (the same command times it at batch 8).
PER_HEAD_MIN_SPAN = 1536


def _grouped_attention(query, key, value, mask, scaling, plan=None):
    """Attention with the query heads of each KV group stacked as rows of one query block.

    Each KV head then serves one ``[G*T, S]`` attention problem, so cached K/V are read once per KV
    head, never repeated per query head.

    Args:
        query: ``[B, Hq, T, D]``; key, value: ``[B, Hkv, S, D]``; mask: ``[B, 1, 1, T, S]`` or None.
        plan: the active plan: it caches the mask's causal tail and its grouped layout across layers.

    Returns:
        ``[B, T, Hq, D]`` (the layout transformers' attention functions return).
    """
    b, hq, t, d = query.shape
    hkv, s = key.shape[1], key.shape[2]
    g = hq // hkv
    if b == 1 and query.dtype == torch.float32 and s >= PER_HEAD_MIN_SPAN:
        # One 2-D product per KV head; scaling the few query rows is cheaper than scaling scores.
        q = (query * scaling).reshape(1, hkv, g * t, d)
        out = torch.empty(1, hkv, g * t, d, dtype=query.dtype, device=query.device)
        # Usually only the block's own last T columns are masked (causal within the block).
        tail = plan.causal_tail() if mask is not None and plan is not None and mask is plan.mask else None
        full = mask[0, 0] if mask is not None and tail is None else None
        for qh, kh, vh, oh in zip(q[0].unbind(0), key[0].unbind(0), value[0].unbind(0), out[0].unbind(0)):
            scores = torch.mm(qh, kh.t())  # [G*T, S]
            if tail is not None:
                scores.view(g, t, s)[:, :, s - t :].add_(tail)
            elif full is not None:
                scores.view(g, t, s).add_(full)
            torch.mm(torch.softmax(scores, dim=-1), vh, out=oh)
        return out.view(1, hq, t, d).transpose(1, 2)
    q = query.reshape(b, hkv, g * t, d)
    m = None
    if mask is not None:
        if plan is not None:
            m = plan.grouped_mask(mask, g, query.dtype)
        else:
            m = mask.expand(b, 1, g, t, s).reshape(b, 1, g * t, s).to(query.dtype)
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=m, scale=scaling)  # [B, Hkv, G*T, D]
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
    if query.dtype != key.dtype:
        # A lower-precision drafter reading the model-precision draft cache: attend in the cache's
        # precision and hand the result back in the drafter's.
        out = _grouped_attention(query.to(key.dtype), key, value, mask, scaling, plan)
        return out.to(query.dtype), None
    return _grouped_attention(query, key, value, mask, scaling, plan), None


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
