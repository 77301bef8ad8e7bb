"""Cheaper drafters: lower-precision copies of a model's language weights (``draft_dtype=``).

Verification makes the output exact whatever the drafter proposes, so the drafter may read cheaper
weights: a ``bfloat16`` copy halves the bytes a draft step reads and, on CPUs with AMX or GPUs with
tensor cores, multiplies faster. Only the parameters of the language model and the output head are
copied; everything else (a vision tower, rotary frequency buffers, the config) is shared or kept in
its own precision. The copy is made once per model and dtype and reused by later calls (rebuilt if
the model's weights have changed since).

Weight-only integer drafters (``"int8"``, ``"int4"``) are :class:`~sparse2dense.lean.LeanDecoder`
passes; :func:`make_drafter` builds either kind.
"""

from __future__ import annotations

import copy
import weakref

import torch
from torch import nn

from .attention import ATTN_NAME
from .lean import cached_for_weights, lean_decoder, supports_lean, weight_format_supported

# model -> {dtype: (weights fingerprint, copy)}
_COPIES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _language_modules(model: nn.Module) -> list[nn.Module]:
    """The modules whose weights a decode step reads: the decoder stack and the output head."""
    mods = []
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    mods.append(decoder if decoder is not None else model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        mods.append(head)
    return mods


def _path_of(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise ValueError("module is not part of the model")


def draft_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The model itself when ``dtype`` is its own, else a cached copy with language weights in ``dtype``.

    The copy's attention always routes through sparse2dense (it is never used for anything else).
    """
    own = next(model.parameters()).dtype
    if dtype == own:
        return model
    return cached_for_weights(_COPIES, model, dtype, lambda: _lower_precision_copy(model, dtype))


def _lower_precision_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``model`` sharing everything but the language weights, which are in ``dtype``."""
    paths = [_path_of(model, m) for m in _language_modules(model)]
    # Share every parameter and buffer with the original (no copy of the fp32 weights) ...
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    clone = copy.deepcopy(model, memo)
    # ... then give the language modules' parameters their own lower-precision tensors. Tied
    # parameters (embedding and output head) stay tied: each original is converted once.
    converted: dict[int, nn.Parameter] = {}
    for path in paths:
        root = clone.get_submodule(path) if path else clone
        for module in root.modules():
            for name, param in list(module._parameters.items()):
                if param is None or not param.is_floating_point():
                    continue
                if id(param) not in converted:
                    converted[id(param)] = nn.Parameter(param.detach().to(dtype), requires_grad=False)
                module._parameters[name] = converted[id(param)]
    text_config = clone.config.get_text_config() if hasattr(clone.config, "get_text_config") else clone.config
    text_config._attn_implementation_internal = ATTN_NAME
    clone.eval()
    return clone


def copy_nbytes(model: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of the drafter's own weights (0 when it shares the model's)."""
    clone = draft_model(model, dtype)
    if clone is model:
        return 0
    own = {id(p) for p in model.parameters()}
    return sum(p.numel() * p.element_size() for p in clone.parameters() if id(p) not in own)


def fast_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 natively (CUDA with bf16, or a CPU with AVX512-BF16/AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        return bool(check and check())
    return False


def free_memory_bytes(device: torch.device) -> int | None:
    """Free memory where ``device``'s tensors live (None when unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def copy_size_estimate(model: nn.Module, dtype: torch.dtype) -> int:
    """Bytes a ``dtype`` copy of the language weights would take (before making it)."""
    seen, total = set(), 0
    for module in _language_modules(model):
        for p in module.parameters():
            if id(p) not in seen and p.is_floating_point():
                seen.add(id(p))
                total += p.numel() * torch.empty((), dtype=dtype).element_size()
    return total


def make_drafter(model: nn.Module, precision: torch.dtype | str) -> tuple[str, object, int]:
    """A drafter whose weights are in ``precision``: ``(name, drafter, bytes of its own weights)``.

    ``precision`` is a floating ``torch.dtype`` or ``"int8"``/``"int4"``. Integer formats, and bf16
    on the families :func:`~sparse2dense.lean.supports_lean` accepts, run the lean forward (bf16
    there measured faster than the model's own forward on a bf16 copy at batch 4-8); other float
    copies run the model's own forward. Raises ``ValueError`` with the reason when the model or
    device cannot have it.
    """
    fmt = "bf16" if precision == torch.bfloat16 and supports_lean(model) else precision
    if not isinstance(fmt, str):
        clone = draft_model(model, fmt)
        return str(fmt).removeprefix("torch."), clone, copy_nbytes(model, fmt)
    if not supports_lean(model):
        raise ValueError(
            f"draft_dtype={fmt!r} supports Llama, Mistral, Qwen2 and Qwen3 text models; "
            f"{type(model).__name__} is not one (torch.bfloat16 works for every model).")
    device = next(model.parameters()).device
    if not weight_format_supported(fmt, device):
        raise ValueError(
            f"draft_dtype={fmt!r} needs PyTorch's weight-only {fmt} CPU kernel; the model is on "
            f"{device.type} (torch.bfloat16 works there).")
    lean = lean_decoder(model, fmt)
    return ("bfloat16" if fmt == "bf16" else fmt), lean, lean.nbytes()
