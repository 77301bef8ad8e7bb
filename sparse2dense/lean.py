"""A lean forward pass for Llama-style text decoders (Llama, Mistral, Qwen2, Qwen3).

A decode step of a small model on a CPU spends its time in two places: reading the weights, and
running thousands of small tensor ops. :class:`LeanDecoder` is a second forward pass over the
model's own modules' weights, in one of two roles:

* **The exact forward** (format ``"model"``): the model's own weight tensors (no copy) and the same
  arithmetic as the transformers forward, op for op, in fewer tensor ops and less Python. Its logits
  are bit-identical to the model's (a test checks this), so verification and dense decoding use it
  on these families.
* **A cheaper drafter**. The drafter only proposes tokens (the dense verifier decides every output
  token), so it may read cheaper weights. It stores the four products of each layer fused (Q/K/V in
  one matrix, gate/up in another) in a cheaper weight format (:data:`WEIGHT_FORMATS`):

  - ``"bf16"``: bfloat16, stored transposed (half the bytes of fp32; AMX/tensor-core products);
  - ``"int8"``: int8 with one scale per output channel (a quarter of the bytes), PyTorch's
    weight-only int8 kernel;
  - ``"int4"``: 4-bit with a scale and offset per group of 64 (or 32) inputs (an eighth of the
    bytes), PyTorch's weight-only int4 kernel;

  and runs each layer in about 30 tensor ops (fused RMSNorm, RoPE on Q and K together, bf16
  activations), against well over twice that in the transformers forward.

Either role reads and writes the same :class:`~sparse2dense.kv.ForwardPlan` (the draft KV buffer stays
at the model's precision and always receives exact K/V from verification) and uses the same
attention function as the model's forward.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import _grouped_attention
from .kv import active_plan

LEAN_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
WEIGHT_FORMATS = ("bf16", "int8", "int4")
EXACT = "model"  # the model's own weights and arithmetic: the exact forward
_INT4_GROUPS = (64, 32)


def supports_lean(model: nn.Module) -> bool:
    """Whether ``model`` is a text decoder :class:`LeanDecoder` can run (a Llama-style family in fp32/bf16/fp16)."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in LEAN_FAMILIES:
        return False
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or not all(hasattr(decoder, n) for n in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return False
    if getattr(config, "hidden_act", "silu") not in ("silu", "gelu", "gelu_pytorch_tanh"):
        return False
    return model.get_output_embeddings() is not None


def supports_exact(model: nn.Module) -> bool:
    """Whether the exact forward (format ``"model"``) can stand in for ``model``'s own forward."""
    if not supports_lean(model):
        return False
    if getattr(model.config, "hidden_act", "silu") != "silu":
        return False  # other activations are applied through the module; keep the model's forward
    return next(model.parameters()).dtype in (torch.float32, torch.bfloat16, torch.float16)


def weight_format_supported(fmt: str, device: torch.device) -> bool:
    """Whether PyTorch has a fast product for ``fmt`` weights on ``device`` (int8/int4: CPU kernels)."""
    if fmt == "bf16":
        return True
    if device.type != "cpu":
        return False
    op = "_weight_int8pack_mm" if fmt == "int8" else "_weight_int4pack_mm_for_cpu"
    return hasattr(torch.ops.aten, op)


class _Product:
    """``y = x @ W.T (+ b)`` for ``x`` ``[..., K]`` bf16, with ``W`` in one of :data:`WEIGHT_FORMATS`.

    ``linears`` are fused along their outputs: the result is ``[..., sum N_i]`` in bf16. With format
    :data:`EXACT` the linears keep the model's own tensors and dtype (:attr:`linears`); the exact
    forward applies them one by one, as the model does, so only a single-linear product is callable.
    """

    __slots__ = ("fmt", "w", "scale", "group", "bias", "linears")

    def __init__(self, linears: list[nn.Linear], fmt: str):
        self.fmt = fmt
        self.linears = None
        if fmt == EXACT:
            self.linears = [(lin.weight, lin.bias) for lin in linears]
            self.w = self.scale = self.group = self.bias = None
            return
        w = torch.cat([lin.weight.detach() for lin in linears]).float()  # [N, K]
        n, k = w.shape
        self.bias = None
        if any(lin.bias is not None for lin in linears):
            self.bias = torch.cat([
                lin.bias.detach() if lin.bias is not None else torch.zeros(lin.out_features, device=w.device)
                for lin in linears
            ]).to(torch.bfloat16)
        self.scale = None
        self.group = next((g for g in _INT4_GROUPS if k % g == 0), None) if fmt == "int4" else None
        if fmt == "int4" and self.group is None:
            fmt = self.fmt = "int8"  # no group size divides K: int8 for this product
        if fmt == "bf16":
            self.w = w.t().contiguous().to(torch.bfloat16)  # [K, N]: measured faster than [N, K] here
        elif fmt == "int8":
            scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # [N]
            self.w = (w / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8).contiguous()
            self.scale = scale.to(torch.bfloat16)
        else:
            g = self.group
            wg = w.view(n, k // g, g)
            lo, hi = wg.amin(dim=-1, keepdim=True), wg.amax(dim=-1, keepdim=True)
            step = ((hi - lo) / 15).clamp(min=1e-12)
            q = ((wg - lo) / step).round_().clamp_(0, 15).to(torch.int32).view(n, k)
            self.w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            # The kernel computes (q - 8) * scale + zero; w = lo + q * step.
            self.scale = torch.stack([step.view(n, k // g), (lo + 8 * step).view(n, k // g)], dim=-1)
            self.scale = self.scale.transpose(0, 1).contiguous().to(torch.bfloat16)  # [K/g, N, 2]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.linears is not None:
            (weight, bias), = self.linears
            return F.linear(x, weight, bias)
        x2 = x.reshape(-1, x.shape[-1])
        if self.fmt == "bf16":
            y = torch.mm(x2, self.w)
        elif self.fmt == "int8":
            y = torch.ops.aten._weight_int8pack_mm(x2, self.w, self.scale)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.w, self.group, self.scale)
        if self.bias is not None:
            y = y.add_(self.bias)
        return y.view(*x.shape[:-1], -1)

    def nbytes(self) -> int:
        if self.linears is not None:
            return 0  # the model's own tensors
        return sum(t.numel() * t.element_size() for t in (self.w, self.scale, self.bias) if t is not None)


def _norm_weight(module: nn.Module, dtype: torch.dtype | None = torch.float32) -> tuple[torch.Tensor, float]:
    """An RMSNorm's weight (in ``dtype``; None keeps the module's own tensor) and epsilon."""
    eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", 1e-6)
    weight = module.weight.detach()
    return (weight if dtype is None else weight.to(dtype)), float(eps)


def _window(attn: nn.Module) -> int | None:
    """The layer's sliding window as transformers applies it (Qwen2/3 per layer, Mistral per model)."""
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    return getattr(getattr(attn, "config", None), "sliding_window", None)


@dataclass
class _Layer:
    index: int  # the layer's index in the KV buffers
    scaling: float  # the attention's softmax scale
    sliding: bool  # sliding-window layer: the exact forward reads the sliding mask (drafters ignore windows)
    ln_in: tuple[torch.Tensor, float]  # RMSNorm weight [H] and epsilon
    ln_post: tuple[torch.Tensor, float]
    qk_norm: tuple[torch.Tensor, float] | None  # Qwen3: per-head RMSNorm of Q and K, weight [Hq + Hkv, D]
    qkv: _Product  # [H] -> [(Hq + 2 Hkv) D]
    o: _Product  # [Hq D] -> [H]
    gate_up: _Product  # [H] -> [2 I]
    down: _Product  # [I] -> [H]


class LeanDecoder:
    """The lean forward pass of a Llama-style model; see the module docstring.

    Call it like the model inside :func:`~sparse2dense.kv.use_plan`: ``ids`` ``[B, T]`` and RoPE
    ``position_ids`` ``[B, T]`` in, logits ``[B, T or 1, V]`` (float32) out. The embedding and the
    rotary module are the model's own; the products use :attr:`fmt`.

    With ``fmt="model"`` (:data:`EXACT`) every op is the one the transformers forward runs, in the
    model's dtype, so the logits are bit-identical to the model's; the other formats draft in bf16
    activations over an fp32 residual stream.
    """

    def __init__(self, model: nn.Module, fmt: str):
        if fmt not in WEIGHT_FORMATS + (EXACT,):
            raise ValueError(f"weight format must be one of {WEIGHT_FORMATS + (EXACT,)}; got {fmt!r}.")
        if not (supports_exact(model) if fmt == EXACT else supports_lean(model)):
            raise ValueError(f"{type(model).__name__} is not a Llama-style text decoder the lean forward supports.")
        self.fmt = fmt
        self.exact = fmt == EXACT
        own = next(model.parameters()).dtype
        # Exact: the model's dtype throughout. Cheaper formats: bf16 products over an fp32 residual.
        self.act_dtype = own if self.exact else torch.bfloat16
        self.res_dtype = own if self.exact else torch.float32
        norm_dtype = None if self.exact else torch.float32
        decoder = model.get_decoder()
        self.embed = decoder.embed_tokens
        self.rotary = decoder.rotary_emb
        self.norm = _norm_weight(decoder.norm, norm_dtype)
        self.head = _Product([model.get_output_embeddings()], fmt)
        first = decoder.layers[0]
        self.head_dim = first.self_attn.head_dim
        self.n_q = first.self_attn.q_proj.out_features // self.head_dim
        self.n_kv = first.self_attn.k_proj.out_features // self.head_dim
        self.inter = first.mlp.gate_proj.out_features
        act = getattr(model.config, "hidden_act", "silu")
        self.act = F.silu if act == "silu" else first.mlp.act_fn
        half = self.head_dim // 2
        dev = first.self_attn.q_proj.weight.device
        # rotate_half(x) == roll(x, half) * sign: -1 on the first half, +1 on the second.
        self.sign = torch.cat([-torch.ones(half, device=dev), torch.ones(half, device=dev)])
        self.layers = []
        for layer in decoder.layers:
            a, m = layer.self_attn, layer.mlp
            qk_norm = None
            if getattr(a, "q_norm", None) is not None:
                (wq, eps), (wk, _) = _norm_weight(a.q_norm, norm_dtype), _norm_weight(a.k_norm, norm_dtype)
                qk_norm = (torch.cat([wq.expand(self.n_q, -1), wk.expand(self.n_kv, -1)]), eps)
            self.layers.append(_Layer(
                index=a.layer_idx, scaling=a.scaling, sliding=_window(a) is not None,
                ln_in=_norm_weight(layer.input_layernorm, norm_dtype),
                ln_post=_norm_weight(layer.post_attention_layernorm, norm_dtype),
                qk_norm=qk_norm, qkv=_Product([a.q_proj, a.k_proj, a.v_proj], fmt), o=_Product([a.o_proj], fmt),
                gate_up=_Product([m.gate_proj, m.up_proj], fmt), down=_Product([m.down_proj], fmt),
            ))

    def nbytes(self) -> int:
        """Bytes of the forward's own weights (the embedding and norms are shared with the model;
        the exact forward owns none)."""
        return self.head.nbytes() + sum(
            p.nbytes() for layer in self.layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down))

    def _rms_norm(self, x: torch.Tensor, norm: tuple[torch.Tensor, float]) -> torch.Tensor:
        """RMSNorm over the last dim. The exact forward in bf16/fp16 normalises in fp32 and applies
        the weight in the model's dtype, as transformers' RMSNorm does; in fp32 the fused kernel
        gives the same bits."""
        weight, eps = norm
        if self.exact and x.dtype != torch.float32:
            return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)
        if weight.shape == x.shape[-1:]:
            return F.rms_norm(x, (x.shape[-1],), weight, eps)
        return F.rms_norm(x, (x.shape[-1],), None, eps) * weight  # per-head weights [heads, D]

    def _exact_layer(self, layer: _Layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan) -> torch.Tensor:
        """One decoder layer as transformers runs it, op for op: ``h`` ``[B, T, H]`` in and out."""
        b, t, _ = h.shape
        d, nq, half = self.head_dim, self.n_q, self.head_dim // 2
        x = self._rms_norm(h, layer.ln_in)
        q, k, v = (F.linear(x, w, bias).view(b, t, -1, d) for w, bias in layer.qkv.linears)
        if layer.qk_norm is not None:
            weight, eps = layer.qk_norm
            q, k = self._rms_norm(q, (weight[:nq], eps)), self._rms_norm(k, (weight[nq:], eps))
        q = (q * cos + q.roll(half, dims=-1) * sin).transpose(1, 2)  # [B, Hq, T, D]
        k = (k * cos + k.roll(half, dims=-1) * sin).transpose(1, 2)
        if plan.capture is not None:
            plan.capture(layer.index, q)
        k_all, v_all = plan.write(layer.index, k, v.transpose(1, 2))
        mask = plan.mask_sliding if layer.sliding and plan.mask_sliding is not None else plan.mask
        out = _grouped_attention(q, k_all, v_all, mask, layer.scaling, plan)  # [B, T, Hq, D]
        h = h + F.linear(out.reshape(b, t, nq * d), *layer.o.linears[0])
        x = self._rms_norm(h, layer.ln_post)
        (wg, bg), (wu, bu) = layer.gate_up.linears
        return h + F.linear(self.act(F.linear(x, wg, bg)) * F.linear(x, wu, bu), *layer.down.linears[0])

    def _layer(self, layer: _Layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan) -> torch.Tensor:
        """One decoder layer with fused low-precision products over the fp32 residual ``h`` ``[B, T, H]``."""
        b, t, _ = h.shape
        d, nq, nkv, half = self.head_dim, self.n_q, self.n_kv, self.head_dim // 2
        low, cache = self.act_dtype, plan.buffer.k.dtype  # product inputs; the KV buffer's precision
        x = self._rms_norm(h, layer.ln_in).to(low)
        qkv = layer.qkv(x).to(cache).view(b, t, nq + 2 * nkv, d)
        qk = qkv[:, :, : nq + nkv]
        if layer.qk_norm is not None:
            qk = self._rms_norm(qk.float(), layer.qk_norm).to(cache)
        qk = qk * cos + qk.roll(half, dims=-1) * sin  # RoPE on Q and K together
        q = qk[:, :, :nq].transpose(1, 2)  # [B, Hq, T, D]
        if plan.capture is not None:
            plan.capture(layer.index, q)
        k_all, v_all = plan.write(layer.index, qk[:, :, nq:].transpose(1, 2), qkv[:, :, nq + nkv :].transpose(1, 2))
        out = _grouped_attention(q, k_all, v_all, plan.mask, layer.scaling, plan)  # [B, T, Hq, D]
        h = h + layer.o(out.reshape(b, t, nq * d).to(low))
        x = self._rms_norm(h, layer.ln_post).to(low)
        gate, up = layer.gate_up(x).split(self.inter, dim=-1)
        return h + layer.down(self.act(gate) * up)

    def __call__(self, ids: torch.Tensor, position_ids: torch.Tensor, all_logits: bool) -> torch.Tensor:
        plan = active_plan()
        cache = plan.buffer.k.dtype
        h = self.embed(ids).to(self.res_dtype)  # [B, T, H]: the residual stream
        cos, sin = self.rotary(h, position_ids)  # [B, T, D]
        cos, sin = cos.unsqueeze(2).to(cache), (sin * self.sign).unsqueeze(2).to(cache)  # [B, T, 1, D]
        step = self._exact_layer if self.exact else self._layer
        for layer in self.layers:
            h = step(layer, h, cos, sin, plan)
        if not all_logits:
            h = h[:, -1:]
        return self.head(self._rms_norm(h, self.norm).to(self.act_dtype)).float()


_LEAN: "weakref.WeakKeyDictionary[nn.Module, dict[str, tuple[tuple, LeanDecoder]]]" = weakref.WeakKeyDictionary()


def weights_fingerprint(model: nn.Module) -> tuple:
    """Identifies the current state of ``model``'s weights: where each tensor lives, its dtype, and
    its in-place version counter. Caches built from the weights compare it before reuse, so a model
    moved, cast or loaded with new weights after a call never meets a stale copy."""
    prints = []
    for p in model.parameters():
        try:
            version = p._version
        except RuntimeError:  # inference tensors have no version counter
            version = -1
        prints.append((p.data_ptr(), p.dtype, version))
    return tuple(prints)


def cached_for_weights(store: weakref.WeakKeyDictionary, model: nn.Module, key, build):
    """``store[model][key]``, built by ``build()`` on first use and again whenever ``model``'s weights
    have changed since (:func:`weights_fingerprint`)."""
    per_model = store.setdefault(model, {})
    stamp = weights_fingerprint(model)
    if key not in per_model or per_model[key][0] != stamp:
        per_model[key] = (stamp, build())
    return per_model[key][1]


def lean_decoder(model: nn.Module, fmt: str) -> LeanDecoder:
    """The cached :class:`LeanDecoder` of ``model`` in weight format ``fmt`` (built on first use, and
    again whenever the model's weights have changed since)."""
    return cached_for_weights(_LEAN, model, fmt, lambda: LeanDecoder(model, fmt))


__all__ = ["EXACT", "LeanDecoder", "cached_for_weights", "lean_decoder", "supports_exact", "supports_lean",
           "weight_format_supported", "weights_fingerprint"]
