"""Kernel costs behind the verify pass: fp32 matrix products at the shapes of SmolLM2-135M.

Run: ``python -m sparse2dense.bench.kernels``. A verify pass multiplies ``gamma + 1`` rows (M)
through every weight matrix, where a decode step multiplies one; on a CPU the BLAS library's
efficiency at such skinny M decides how much more a verify pass costs. This prints, per M:

* 30 linears 576 -> 1536 (one MLP projection per layer) with PyTorch's default (MKL) path;
* the same with weights prepacked for oneDNN (``torch.utils.mkldnn``);
* the 576 -> 49152 lm_head.
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
