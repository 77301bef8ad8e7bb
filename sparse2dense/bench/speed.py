"""End-to-end decode speed on real weights and real text: the README's results table.

Run: ``python -m sparse2dense.bench.speed [--scenarios 1x8000,8x6000] [--json-out FILE]``.

Each scenario (``BATCHxCONTEXT``) builds chat prompts from Python's documentation and runs, in one
process on identical inputs: transformers ``generate`` with a static cache, the sparse2dense dense
loop, and Sparse-to-Dense (see :mod:`sparse2dense.demo`). The speedup is decode-phase time of the
faster dense baseline divided by StD's; all outputs must be token-identical.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from ..config import StdConfig
from ..demo import run_scenario
from ..models import load_demo_model


def _scenarios(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        batch, _, context = item.strip().partition("x")
        out.append((int(batch), int(context)))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparse2dense.bench.speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default="1x8000,8x6000", help="BATCHxCONTEXT list (default 1x8000,8x6000)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--gamma", type=int, default=6)
    parser.add_argument("--json-out", default=None, help="also write the full results as JSON here")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    cfg = StdConfig(budget=args.budget, gamma=args.gamma)
    model, tok = load_demo_model("float32")
    rows = []
    for batch, context in _scenarios(args.scenarios):
        res = run_scenario(model, tok, batch, context, args.max_new_tokens, cfg)
        rows.append(res)
    cpu = platform.processor() or platform.machine()
    print(f"SmolLM2-135M-Instruct fp32, {torch.get_num_threads()} threads ({cpu}), budget {cfg.budget}, "
          f"gamma {cfg.gamma}, {args.max_new_tokens} new tokens per row; decode phase, ms per step")
    print()
    print("| batch x prompt tokens | transformers static | sparse2dense dense | StD | tokens/round | "
          "speedup vs fastest dense | identical |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        hf, dense, std = r.methods
        print(f"| {r.batch} x {r.prompt_tokens} | {hf.ms_per_token:.1f} | {dense.ms_per_token:.1f} | "
              f"{std.ms_per_token:.1f} | {std.stats['mean_accepted_per_round']:.2f} | **{r.speedup:.2f}x** | "
              f"{'yes' if r.identical else 'NO'} |")
    if args.json_out:
        path = Path(args.json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"budget": cfg.budget, "gamma": cfg.gamma, "max_new_tokens": args.max_new_tokens,
                                    "threads": torch.get_num_threads(),
                                    "scenarios": [r.to_dict() for r in rows]}, indent=2))
    return 0 if all(r.identical for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
