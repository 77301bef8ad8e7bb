"""``sparse2dense bench``: every decoding method side by side, on one model, machine and input set.

For each point of a sweep (batch size x context length x budget x gamma) the suite builds chat
prompts of real text (Python's documentation, see :mod:`sparse2dense.demo`) and runs, interleaved
over repeats so that machine drift hits every method alike:

* dense baselines: transformers ``generate`` with its default (dynamic) cache and with a static
  cache, and sparse2dense's own dense loop;
* Sparse-to-Dense with the paper's selection (fp32, bf16, int8 and int4 drafter weights), with a
  StreamingLLM drafter (sinks + recent window), with selection from the last prompt tokens only, and
  with re-selection from the verifier's queries during decoding;
* ``gamma="auto", budget="auto"`` as ``generate`` runs it (drafter weights picked automatically),
  with the model's own drafter weights, and with ``draft_dtype=torch.bfloat16``;
* transformers prompt-lookup decoding (batch 1; transformers' assisted decoding is batch-1 only);
* sparse-only decoding (the drafter alone, lossy): how many output tokens differ from dense.

sparse2dense's methods share one prefill and decode in turn from the same state; transformers'
methods run their own ``generate`` and are timed from their first new token. Speedups are
decode-phase times relative to the **fastest** dense baseline of the same point. The cost model
turns the measured step costs into the best speedup perfect acceptance would give (the limit) and
the speedup expected at the measured acceptance; the measured speedup divided by the latter shows
what the loop's own overheads cost.

Outputs: a Markdown table on stdout (and ``results.md``), ``results.json`` and, with matplotlib,
PNG plots of speedup versus each swept dimension, all under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import torch

from ..adapters import get_adapter
from ..config import AUTO, StdConfig
from ..drafter import make_drafter
from ..generation import batch_engine
from ..workloads import build_prompts
from ..timing import time_hf_generate
from .report import MethodRow, Point, markdown, plots

DENSE_BASELINES = ("hf-dynamic", "hf-static", "dense")
METHODS = {
    "hf-dynamic": "transformers generate, default cache",
    "hf-static": "transformers generate, static cache",
    "dense": "sparse2dense dense loop",
    "std": "StD, paper selection",
    "std-bf16": "StD, paper selection, bf16 drafter weights",
    "std-int8": "StD, paper selection, int8 drafter weights",
    "std-int4": "StD, paper selection, int4 drafter weights",
    "streaming": "StD, StreamingLLM drafter (sinks + recent)",
    "last": "StD, selection by the last prompt tokens",
    "reselect": "StD, re-selection every 8 rounds",
    "auto": "StD gamma=auto budget=auto (drafter weights: auto, as generate() picks them)",
    "auto-fp32": "StD gamma=auto budget=auto, the model's own drafter weights",
    "auto-bf16": "StD gamma=auto budget=auto draft_dtype=bf16",
    "prompt-lookup": "transformers prompt lookup (10 tokens)",
    "sparse-only": "drafter alone, no verification (LOSSY)",
}
LOSSLESS_STD = ("std", "std-bf16", "std-int8", "std-int4", "streaming", "last", "reselect", "auto", "auto-fp32",
                "auto-bf16")
# The drafter weights of the fixed-gamma methods (others: the model's own) ...
_PRECISION = {"std-bf16": torch.bfloat16, "std-int8": "int8", "std-int4": "int4"}
# ... and the draft_dtype the gamma="auto" methods pass (the engine then picks as generate() does).
_AUTO_DTYPE = {"auto": None, "auto-fp32": torch.float32, "auto-bf16": torch.bfloat16}


def _kv_mb(model, batch: int, tokens: int) -> float:
    """KV cache memory of ``batch`` rows of ``tokens`` tokens at the model's precision."""
    a = get_adapter(model)
    elem = next(model.parameters()).element_size()
    return 2 * a.num_layers * batch * a.num_kv_heads * a.head_dim * tokens * elem / 2**20


class Bench:
    """Runs the methods at one point; see the module docstring."""

    def __init__(self, model, tokenizer, methods: list[str], max_new_tokens: int, repeats: int,
                 progress: Callable[[str], None] = print):
        self.model = model
        self.tok = tokenizer
        self.methods = methods
        self.max_new = max_new_tokens
        self.repeats = repeats
        self.say = progress

    # ------------------------------------------------------------------ one point
    def run_point(self, point: Point) -> list[MethodRow]:
        model = self.model
        ids, mask = build_prompts(self.tok, point.batch, point.context)
        # One engine: max_gamma 12 so every fixed gamma and "auto" fit its buffers.
        engine, group = batch_engine(model, ids, mask, self.max_new, StdConfig(budget=point.budget, gamma=AUTO))
        engine.score_policies = {"paper", "last"}  # one prefill serves every selection policy
        engine.keep_capture, engine.select_on_join = True, False  # each method selects (and is timed) itself
        timings: dict[str, list[float]] = {m: [] for m in self.methods}
        e2e: dict[str, list[float]] = {m: [] for m in self.methods}
        outputs: dict[str, torch.Tensor] = {}
        stats: dict[str, dict] = {}
        notes: dict[str, str] = {}
        t0 = time.perf_counter()
        engine.prefill()
        prefill_s = time.perf_counter() - t0
        snap = engine.snapshot()
        with torch.inference_mode():
            for r in range(self.repeats):
                order = self.methods[r % len(self.methods):] + self.methods[: r % len(self.methods)]
                for method in order:
                    self.say(f"  {method} (repeat {r + 1}/{self.repeats})")
                    if method.startswith("hf-") or method == "prompt-lookup":
                        res = self._hf(method, ids, mask, notes)
                        if res is None:
                            continue
                        seq, dec, total = res
                    else:
                        seq, dec, sel_s, st = self._ours(engine, group, snap, method, point)
                        total = prefill_s + sel_s + dec
                        stats[method] = st
                    outputs[method] = seq
                    timings[method].append(dec)
                    e2e[method].append(total)
        return self._rows(point, ids, timings, e2e, outputs, stats, notes)

    def _hf(self, method, ids, mask, notes):
        kwargs = {}
        if method == "hf-static":
            kwargs["cache_implementation"] = "static"
        if method == "prompt-lookup":
            if ids.shape[0] != 1:
                notes[method] = "batch 1 only in transformers"
                return None
            kwargs["prompt_lookup_num_tokens"] = 10
        res = time_hf_generate(self.model, ids, mask, self.max_new, name=method, **kwargs)
        return res.sequences, res.decode_s, res.prefill_s + res.decode_s

    def _ours(self, engine, group, snap: dict, method: str, point: Point):
        model = self.model
        own = [(str(next(model.parameters()).dtype).removeprefix("torch."), model)]
        cfg = StdConfig(budget=point.budget, gamma=point.gamma)
        weights, policy, gamma, sparse = own, "paper", point.gamma, False
        weights_mb = 0.0
        if method in _PRECISION:
            name, drafter, nbytes = make_drafter(model, _PRECISION[method])
            weights, weights_mb = [(name, drafter)], nbytes / 2**20
        if method in ("streaming", "last"):
            policy = method
        elif method == "reselect":
            cfg = replace(cfg, reselect_every=8)
        elif method in _AUTO_DTYPE:
            cfg = replace(cfg, gamma=AUTO, budget=AUTO, draft_dtype=_AUTO_DTYPE[method])
            gamma, weights = AUTO, None  # the drafter weights generate() picks
        elif method == "sparse-only":
            sparse = True
        engine.restore(snap)
        engine.reconfigure(replace(cfg, policy=policy), weights)
        if weights is None:
            weights_mb = engine.stats.draft_weights_mb
        sel_s = 0.0
        if method == "dense":
            engine.decode(gamma=0)
        else:
            t0 = time.perf_counter()
            engine.select(policy)
            sel_s = time.perf_counter() - t0
            engine.decode(gamma=gamma, sparse_only=sparse)
        out = engine.output(group)
        st = out.stats.to_dict()
        st["time_selection"] = sel_s
        st["draft_weights_mb"] = weights_mb
        return out.sequences.clone(), out.stats.time_decode, sel_s, st

    # ------------------------------------------------------------------ summary
    def _rows(self, point, ids, timings, e2e, outputs, stats, notes) -> list[MethodRow]:
        steps = self.max_new - 1
        ref = outputs.get("hf-static", outputs.get("hf-dynamic", outputs.get("dense")))
        prompt = ids.shape[1]
        rows: dict[str, MethodRow] = {}
        for m in self.methods:
            if not timings[m]:
                rows[m] = MethodRow(m, float("nan"), float("nan"), float("nan"), note=notes.get(m, "not run"))
                continue
            dec = statistics.median(timings[m])
            seq = outputs[m]
            new = seq[:, prompt:].numel()  # generated positions, all rows
            row = MethodRow(m, 1000 * dec / steps, statistics.median(e2e[m]), new / dec if dec else float("nan"),
                            note=notes.get(m, ""))
            if ref is not None:
                same_shape = seq.shape == ref.shape
                row.identical = bool(same_shape and torch.equal(seq, ref))
                if m == "sparse-only":
                    width = min(seq.shape[1], ref.shape[1])
                    row.differing_tokens = int((seq[:, prompt:width] != ref[:, prompt:width]).sum()) + abs(
                        seq.shape[1] - ref.shape[1]) * seq.shape[0]
            st = stats.get(m)
            if st:
                row.stats = st
                if m not in ("dense", "sparse-only"):
                    row.mean_accepted_per_round = st["mean_accepted_per_round"]
                    row.acceptance_rate = st["acceptance_rate"]
                row.memory_mb = st["dense_cache_mb"] + (st["draft_cache_mb"] if m != "dense" else 0) + \
                    st.get("draft_weights_mb", 0.0)
            else:
                row.memory_mb = _kv_mb(self.model, point.batch, prompt + self.max_new)
            rows[m] = row
        dense_ms = [rows[m].decode_ms_per_step for m in DENSE_BASELINES if m in rows]
        dense_ms = [x for x in dense_ms if x == x]  # drop baselines that did not run (NaN)
        fastest = min(dense_ms) if dense_ms else float("nan")
        for row in rows.values():
            row.speedup = fastest / row.decode_ms_per_step if row.decode_ms_per_step == row.decode_ms_per_step else float("nan")
        own_dense = rows.get("dense")
        for m in LOSSLESS_STD:
            row = rows.get(m)
            if row is None or not row.stats or own_dense is None or own_dense.note:
                continue
            _cost_model(row, own_dense, fastest)
        return [rows[m] for m in self.methods]


def _cost_model(row: MethodRow, dense: MethodRow, fastest_ms: float) -> None:
    """Fill ``limit``, ``expected`` and ``fraction_of_expected`` from the measured step costs.

    A round of ``g`` drafts costs ``g * draft + verify(g+1)`` and commits ``tokens_per_round``
    tokens per row; dense decoding commits one per step at the fastest baseline's cost. Step costs
    are those of the rounds in which the whole batch was decoding (this setting's batch size; once
    rows stop, the engine drops them and later rounds cost less). ``g`` is the mean draft length
    over those rounds (dense rounds of ``gamma="auto"`` count as 0). ``limit`` assumes every draft is
    accepted.
    """
    st = row.stats
    log = [r for r in st.get("round_log") or [] if r[0] == st["batch_size"]]
    draft_steps = sum(r[1] for r in log)
    if not draft_steps:
        return
    g = draft_steps / len(log)
    draft_ms = 1000 * sum(r[2] for r in log) / draft_steps
    verify_ms = 1000 * sum(r[3] for r in log) / len(log)
    round_ms = g * draft_ms + verify_ms
    row.limit = (g + 1) * fastest_ms / round_ms
    row.expected = st["mean_accepted_per_round"] * fastest_ms / round_ms
    if row.expected:
        row.fraction_of_expected = row.speedup / row.expected


# ---------------------------------------------------------------------------- output
def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


SWEEP_DEFAULTS = {
    "context": "1000,2000,4000,8000",
    "batch": "1,2,4,8,16",
    "budget": "128,256,512,1024,2048",
    "gamma": "1,2,4,6,8,12",
}


def build_parser(prog: str = "sparse2dense bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Example: sparse2dense bench --sweep context --contexts 2000,8000 --out bench-out")
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sweep", default="point",
                   help="comma list of dimensions to sweep, each around the base point: context, batch, budget, "
                        "gamma; 'all' for every one; 'point' (default) runs the base point only")
    p.add_argument("--batch", type=int, default=1, help="base point: batch size (default 1)")
    p.add_argument("--context", type=int, default=8000, help="base point: prompt tokens (default 8000)")
    p.add_argument("--budget", type=int, default=1024, help="base point: drafter budget (default 1024)")
    p.add_argument("--gamma", type=int, default=6, help="base point: draft tokens per round (default 6)")
    for dim, default in SWEEP_DEFAULTS.items():
        p.add_argument(f"--{dim}s", default=default, help=f"values of the {dim} sweep (default {default})")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma list of methods (default: all): " + ", ".join(METHODS))
    p.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per row (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats per point; medians reported (default 3)")
    p.add_argument("--out", default="bench-out", help="folder for results.json, results.md and plots (default bench-out)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--json", action="store_true", help="print the JSON results instead of the Markdown table")


def points_for(args) -> list[tuple[str, Point]]:
    base = Point(args.batch, args.context, args.budget, args.gamma)
    dims = list(SWEEP_DEFAULTS) if args.sweep == "all" else [d for d in args.sweep.split(",") if d and d != "point"]
    for d in dims:
        if d not in SWEEP_DEFAULTS:
            raise ValueError(f"unknown sweep dimension {d!r}; choose from {', '.join(SWEEP_DEFAULTS)} or all.")
    out = [] if dims else [("point", base)]
    for d in dims:
        for v in _ints(getattr(args, f"{d}s")):
            out.append((d, replace(base, **{d: v})))
    return out


def run(args, model=None, tokenizer=None, say: Callable[[str], None] = print) -> dict:
    """Run the benchmark described by parsed ``args``; returns the JSON-able results."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(METHODS)}.")
    pts = points_for(args)
    for _, p in pts:
        if min(p.batch, p.context, p.budget) < 1 or not 1 <= p.gamma <= 12:
            raise ValueError(f"bad point {p}: batch, context and budget must be >= 1 and gamma in 1..12.")
    if model is None:
        from ..models import load_demo_model

        model, tokenizer = load_demo_model("float32")
    bench = Bench(model, tokenizer, methods, args.max_new_tokens, args.repeats, progress=say)
    results = []
    for i, (sweep, p) in enumerate(pts, 1):
        say(f"[{i}/{len(pts)}] {sweep}: batch {p.batch}, context {p.context}, budget {p.budget}, gamma {p.gamma}")
        results.append((sweep, p, bench.run_point(p)))
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    header = (f"SmolLM2-135M-Instruct fp32 verifier; {machine}; {args.max_new_tokens} new tokens per row; "
              f"median of {args.repeats}; decode phase; speedup over the fastest dense baseline at each point")
    md = markdown([(p, rows) for _, p, rows in results], header)
    data = {
        "machine": machine, "software": software(),
        "settings": {k: v for k, v in vars(args).items() if not callable(v)},
        "model": "SmolLM2-135M-Instruct fp32", "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats, "methods": {m: METHODS[m] for m in methods},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "points": [{"sweep": s, **asdict(p), "rows": [asdict(r) for r in rows]} for s, p, rows in results],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(data, indent=1, default=str))
    (out / "results.md").write_text(md + "\n")
    data["plots"] = [] if args.no_plots else [str(x) for x in plots(results, out)]
    data["markdown"] = md
    return data


def software() -> dict:
    """Versions that decide the figures: this package (and its git commit when run from a
    checkout, else None), transformers and torch."""
    import transformers

    from .. import __version__

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"sparse2dense": __version__, "commit": commit, "transformers": transformers.__version__,
            "torch": torch.__version__}


def main(argv=None) -> int:
    args = build_parser("python -m sparse2dense.bench.suite").parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    data = run(args)
    print(json.dumps(data, indent=1, default=str) if args.json else data["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
