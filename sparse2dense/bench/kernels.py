"""Kernel costs behind the draft and verify passes, at the shapes of SmolLM2-135M.

Run: ``python -m sparse2dense.bench.kernels``. Three tables:

1. **fp32 products at skinny M.** A verify pass multiplies ``gamma + 1`` rows (M) through every
   weight matrix, where a decode step multiplies one; the BLAS library's efficiency at such M decides
   how much more a verify pass costs. Per M: 30 linears 576 -> 1536 with PyTorch's default (MKL)
   path, the same with weights prepacked for oneDNN, and the 576 -> 49152 lm_head.
2. **Drafter weight formats.** The MLP products of all 30 layers (fused gate/up 576 -> 3072, down
   1536 -> 576) in fp32, bf16, weight-only int8 and int4, as the lean drafter runs them
   (:mod:`sparse2dense.lean`); M is the batch size of a draft step.
3. **Attention over the cache.** 30 layers of grouped-query attention (9 query heads, 3 KV heads,
   head size 64) reading K/V from memory (each layer its own buffers, as in a real step), with
   per-head 2-D products and with PyTorch's fused SDPA kernel (:mod:`sparse2dense.attention`
   picks between them).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch


def _ms(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return 1000 * (time.perf_counter() - start) / repeats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparse2dense.bench.kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,2,3,6,8,16,48", help="M values (default 1,2,3,6,8,16,48)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    import torch.utils.mkldnn as mkldnn

    torch.manual_seed(0)
    layers = [torch.nn.Linear(576, 1536, bias=False) for _ in range(30)]
    packed = [mkldnn.to_mkldnn(layer) for layer in layers]
    head = torch.nn.Linear(576, 49152, bias=False)
    print(f"fp32, {torch.get_num_threads()} threads, {platform.machine()}, torch {torch.__version__}; "
          f"mean of {args.repeats} runs, ms")
    print("| M | 30 linears 576->1536 (MKL) | same, oneDNN prepacked | lm_head 576->49152 |")
    print("|---|---|---|---|")
    with torch.inference_mode():
        for m in (int(v) for v in args.rows.split(",")):
            x = torch.randn(m, 576)
            mkl = _ms(lambda: [layer(x) for layer in layers], args.repeats)
            onednn = _ms(lambda: [layer(x.to_mkldnn()) for layer in packed], args.repeats)
            lm = _ms(lambda: head(x), args.repeats)
            print(f"| {m} | {mkl:.2f} | {onednn:.2f} | {lm:.2f} |")
    _weight_formats(args.repeats)
    _attention(args.repeats)
    return 0


def _weight_formats(repeats: int) -> None:
    from ..lean import _Product, weight_format_supported

    cpu = torch.device("cpu")
    formats = [f for f in ("bf16", "int8", "int4") if weight_format_supported(f, cpu)]
    gate_up = [torch.nn.Linear(576, 3072, bias=False) for _ in range(30)]
    down = [torch.nn.Linear(1536, 576, bias=False) for _ in range(30)]
    products = {f: [(_Product([a], f), _Product([b], f)) for a, b in zip(gate_up, down)] for f in formats}
    print()
    print("MLP products of 30 layers (gate/up fused 576->3072, down 1536->576), ms")
    print("| M | fp32 (model's own) | " + " | ".join(f"{f} (lean drafter)" for f in formats) + " |")
    print("|---|---|" + "---|" * len(formats))
    with torch.inference_mode():
        for m in (1, 4, 8, 16):
            x, x2 = torch.randn(m, 576), torch.randn(m, 1536)
            cells = [_ms(lambda: [(a(x), b(x2)) for a, b in zip(gate_up, down)], repeats)]
            xb, x2b = x.to(torch.bfloat16), x2.to(torch.bfloat16)
            for f in formats:
                cells.append(_ms(lambda: [(a(xb), b(x2b)) for a, b in products[f]], repeats))
            print(f"| {m} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")


def _attention(repeats: int) -> None:
    from .. import attention

    print()
    print("Attention of 30 layers (9 query heads, 3 KV heads, D 64), ms")
    print("| batch | cached columns | query tokens | per-head products | fused SDPA |")
    print("|---|---|---|---|---|")
    saved = attention.PER_HEAD_MIN_SPAN
    try:
        with torch.inference_mode():
            for b, s, t in ((1, 1024, 1), (1, 2048, 1), (1, 8000, 1), (1, 8000, 6), (8, 2000, 1), (8, 2000, 5)):
                k = torch.randn(30, b, 3, s + 16, 64)
                v = torch.randn(30, b, 3, s + 16, 64)
                q = torch.randn(b, 9, t, 64)
                mask = torch.zeros(b, 1, 1, t, s)
                mask[..., s - t :] = torch.triu(torch.full((t, t), float("-inf")), 1)
                mask = mask if t > 1 else None

                def run():
                    for layer in range(30):
                        attention._grouped_attention(q, k[layer, :, :, :s], v[layer, :, :, :s], mask, 0.125)

                cells = []
                for threshold in (0, 10**9):  # 0: per-head products wherever they apply; 10**9: SDPA
                    attention.PER_HEAD_MIN_SPAN = threshold
                    cells.append("n/a" if threshold == 0 and b != 1 else f"{_ms(run, repeats):.2f}")
                print(f"| {b} | {s} | {t} | {cells[0]} | {cells[1]} |")
    finally:
        attention.PER_HEAD_MIN_SPAN = saved


if __name__ == "__main__":
    raise SystemExit(main())
