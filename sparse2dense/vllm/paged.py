"""Reading vLLM's CPU paged KV cache, and writing the drafter's own small cache in the same format.

vLLM's CPU attention backend stores one layer's cache as ``[num_blocks, num_kv_heads, block_size,
2 * head_size]``: per block and KV head, the keys first, then the values. Values are plain
``[block_size, head_size]`` rows; keys are stored transposed, ``[head_size, block_size]``, for the
vectorised kernel (ISA ``vec``). :func:`check_layout` confirms this against vLLM's own writer
before any entry is read, so a layout change in another release fails loudly instead of drafting
from scrambled keys.
"""

from __future__ import annotations

import torch


class LayoutError(RuntimeError):
    """The KV cache layout is not the one this reader knows."""


def key_view(kv: torch.Tensor) -> torch.Tensor:
    """``[num_blocks, Hkv, head_size, block_size]`` view of the keys of ``kv``."""
    nb, hk, bs, d2 = kv.shape
    return kv.view(nb, hk, 2, d2 // 2, bs)[:, :, 0]


def value_view(kv: torch.Tensor) -> torch.Tensor:
    """``[num_blocks, Hkv, block_size, head_size]`` view of the values of ``kv``."""
    nb, hk, bs, d2 = kv.shape
    return kv.view(nb, hk, 2, bs, d2 // 2)[:, :, 1]


def split_caches(kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(key_cache, value_cache)`` pair vLLM's CPU kernels take, as ``CPUAttentionBackendImpl`` builds it."""
    nb, hk, bs, _ = kv.shape
    return kv.view(nb, hk, bs * 2, -1).chunk(2, dim=2)


def gather(kv: torch.Tensor, block_table: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one request at ``positions``.

    Args:
        kv: one layer's cache ``[num_blocks, Hkv, block_size, 2 * D]``.
        block_table: LongTensor ``[max_blocks]``: the request's blocks.
        positions: LongTensor ``[N]`` (the same positions for every head) or ``[Hkv, N]`` (per head).

    Returns:
        ``(k, v)``, each ``[N, Hkv, D]``: row ``j`` holds, for head ``h``, the entry at
        ``positions[h, j]`` (or ``positions[j]``).
    """
    bs = kv.shape[2]
    hk = kv.shape[1]
    heads = torch.arange(hk, device=kv.device)
    if positions.dim() == 1:
        blocks, offsets = block_table[positions // bs][:, None], (positions % bs)[:, None]
        heads = heads[None, :]
    else:
        blocks, offsets = block_table[positions // bs].T, (positions % bs).T  # [N, Hkv]
        heads = heads[None, :]
    k = key_view(kv)[blocks, heads, :, offsets]
    v = value_view(kv)[blocks, heads, offsets, :]
    return k, v


def write(kv: torch.Tensor | tuple[torch.Tensor, torch.Tensor], key: torch.Tensor, value: torch.Tensor,
          slots: torch.Tensor, isa: str, kv_cache_dtype: str = "auto") -> None:
    """Write ``key``/``value`` ``[N, Hkv, D]`` at ``slots`` ``[N]`` with vLLM's own cache writer.

    ``kv`` is a layer's cache or its :func:`split_caches` pair.
    """
    from vllm import _custom_ops as ops

    key_cache, value_cache = split_caches(kv) if isinstance(kv, torch.Tensor) else kv
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa,
                                   k_scale=1.0, v_scale=1.0, kv_cache_dtype=kv_cache_dtype)


def check_layout(num_kv_heads: int, head_size: int, block_size: int, dtype: torch.dtype, isa: str,
                 kv_cache_dtype: str = "auto") -> None:
    """Write random entries with vLLM's writer and read them back with :func:`gather`.

    Raises :class:`LayoutError` if they differ (another ISA or another vLLM release).
    """
    if kv_cache_dtype != "auto":
        raise LayoutError(f"the StD drafter reads unquantised KV caches only; kv_cache_dtype={kv_cache_dtype!r}")
    gen = torch.Generator().manual_seed(0)
    kv = torch.zeros(3, num_kv_heads, block_size, 2 * head_size, dtype=dtype)
    n = block_size + 3
    key = torch.randn(n, num_kv_heads, head_size, generator=gen).to(dtype)
    value = torch.randn(n, num_kv_heads, head_size, generator=gen).to(dtype)
    table = torch.tensor([2, 0, 1])
    positions = torch.arange(n)
    slots = table[positions // block_size] * block_size + positions % block_size
    write(kv, key, value, slots, isa)
    k, v = gather(kv, table, positions)
    if not (torch.equal(k, key) and torch.equal(v, value)):
        raise LayoutError(
            f"vLLM's CPU KV cache layout for ISA {isa!r} and {dtype} is not the one sparse2dense reads "
            "(keys [head_size, block_size], values [block_size, head_size] per block and head)")
