"""Step-level costs on the real SmolLM2-135M: what one draft step, one verify pass and one dense
step cost, and how they scale with context.

Run: ``python -m sparse2dense.bench.steps [--json]``. Checks printed at the end:

* a draft step's cost is (nearly) independent of context length at a fixed budget (also shown with
  int8 drafter weights, where the lean forward and its kernel exist);
* a (gamma+1)-token verify pass costs little more than transformers' own static-cache decode step;
* decoding never reallocates or copies the KV cache (the buffers stay at the same addresses).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ..attention import attention_routed
from ..config import StdConfig
from ..workloads import documentation_text
from ..drafter import make_drafter
from ..generation import batch_engine
from ..lean import supports_lean, weight_format_supported
from ..models import load_demo_model
from ..timing import time_hf_generate


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def _verify(engine, drafts):
    """A verify pass and the token choice after it, as a round runs them."""
    s = engine.slots
    block = torch.cat([s.last[: s.n, None], drafts], dim=1)
    logits = engine.runner.verify(engine.dense_view(), engine.cache, s, block)
    return engine.chooser.pick(engine.chooser.process(logits, drafts), s.n_gen[: s.n], draw=False)


def _draft_with(engine, module):
    """One draft step with ``module``'s weights (the step is written where the next round's would be)."""
    d = engine.drafter
    saved, d.module = d.module, module
    try:
        return d.draft(1, engine.chooser)
    finally:
        d.module = saved


def measure(model, doc_ids: torch.Tensor, context: int, batch: int, budget: int, gamma: int, repeats: int) -> dict:
    """Prefill ``batch`` rows of ``context`` real-text tokens, then time each kind of step."""
    rows = [doc_ids[i * 7919 : i * 7919 + context] for i in range(batch)]
    ids = torch.stack(rows)
    cfg = StdConfig(budget=budget, gamma=gamma)
    int8 = make_drafter(model, "int8")[1] if supports_lean(model) and weight_format_supported("int8", model.device) \
        else None
    engine, _ = batch_engine(model, ids, torch.ones_like(ids), 8, cfg, eos_token_id=[], pad_token_id=0)
    engine.prefill()
    d = engine.drafter
    with torch.inference_mode(), attention_routed(model):
        engine.chooser.refresh()
        ptr = (engine.dense.k.data_ptr(), d.buffer.k.data_ptr())
        drafts = torch.zeros(batch, gamma, dtype=torch.long)
        out = {
            "context": context,
            "batch": batch,
            "budget": budget,
            "draft_step_ms": _median_ms(lambda: _draft_with(engine, d.module), repeats),
            "draft_step_int8_ms": _median_ms(lambda: _draft_with(engine, int8), repeats) if int8 is not None else None,
            "dense_step_ms": _median_ms(lambda: _verify(engine, drafts[:, :0]), repeats),
            f"verify_{gamma + 1}_ms": _median_ms(lambda: _verify(engine, drafts), repeats),
        }
        out["buffers_never_moved"] = ptr == (engine.dense.k.data_ptr(), d.buffer.k.data_ptr())
    hf = time_hf_generate(model, ids, torch.ones_like(ids), 1 + repeats, "static")
    out["hf_static_step_ms"] = hf.ms_per_token
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparse2dense.bench.steps", description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", default="1024,8000", help="comma-separated context lengths (default 1024,8000)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--gamma", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    model, tok = load_demo_model()
    doc = torch.tensor(tok(documentation_text(), add_special_tokens=False).input_ids)
    results = [measure(model, doc, int(c), args.batch, args.budget, args.gamma, args.repeats)
               for c in args.contexts.split(",")]
    first, last = results[0], results[-1]
    vkey = f"verify_{args.gamma + 1}_ms"
    checks = {
        "draft_step_growth": last["draft_step_ms"] / first["draft_step_ms"],
        "verify_over_hf_static_step": last[vkey] / last["hf_static_step_ms"],
        "verify_over_own_dense_step": last[vkey] / last["dense_step_ms"],
        "buffers_never_moved": all(r["buffers_never_moved"] for r in results),
    }
    if args.json:
        print(json.dumps({"threads": torch.get_num_threads(), "results": results, "checks": checks}, indent=2))
        return 0
    print(f"SmolLM2-135M fp32, batch {args.batch}, budget {args.budget}, {torch.get_num_threads()} threads; "
          f"median of {args.repeats}")
    print(f"| context | draft step ms | draft step ms, int8 weights | dense step ms (ours) | "
          f"verify {args.gamma + 1} tok ms | transformers static step ms |")
    print("|---|---|---|---|---|---|")
    for r in results:
        int8 = "n/a" if r["draft_step_int8_ms"] is None else f"{r['draft_step_int8_ms']:.1f}"
        print(f"| {r['context']} | {r['draft_step_ms']:.1f} | {int8} | {r['dense_step_ms']:.1f} | {r[vkey]:.1f} | "
              f"{r['hf_static_step_ms']:.1f} |")
    print(f"draft step at {last['context']} / at {first['context']}: {checks['draft_step_growth']:.2f}x")
    print(f"verify pass / transformers static step at {last['context']}: {checks['verify_over_hf_static_step']:.2f}x")
    print(f"verify pass / our dense step at {last['context']}: {checks['verify_over_own_dense_step']:.2f}x")
    print(f"KV buffers never reallocated or copied: {checks['buffers_never_moved']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
