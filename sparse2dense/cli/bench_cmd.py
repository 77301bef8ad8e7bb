"""``sparse2dense bench``: every decoding method side by side, with sweeps, JSON and plots."""

from __future__ import annotations

import argparse
import sys

from .common import UserError, _quiet_transformers


def add_parser(sub) -> None:
    from ..bench import suite

    bench = sub.add_parser(
        "bench", help="every decoding method side by side on real weights, with sweeps, JSON and plots",
        description=suite.__doc__.split("\n\n")[0] + " Methods: " + "; ".join(
            f"{k} = {v}" for k, v in suite.METHODS.items()) + ". Writes results.md, results.json and "
            "PNG plots to --out. A full --sweep all takes hours on a 2-core CPU; one point takes minutes.",
        epilog="Examples: sparse2dense bench   (base point: batch 1, 8000 tokens)\n"
               "          sparse2dense bench --sweep batch --context 4000 --methods hf-static,dense,std,auto",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    suite.add_arguments(bench)



def run(args) -> int:
    import json

    from ..bench import suite

    for name in ("batch", "context", "budget", "max_new_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 1 <= args.gamma <= 12:
        raise UserError(f"--gamma must be between 1 and 12, got {args.gamma}")
    try:
        suite.points_for(args)
        for dim in suite.SWEEP_DEFAULTS:
            suite._ints(getattr(args, f"{dim}s"))
    except ValueError as exc:
        raise UserError(str(exc).replace("invalid literal for int() with base 10", "sweep values must be integers"))
    _quiet_transformers()
    say = (lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        data = suite.run(args, say=say)
    except ValueError as exc:
        raise UserError(str(exc))
    print(json.dumps(data, indent=1, default=str) if args.json else data["markdown"])
    if data["plots"]:
        say("plots: " + ", ".join(data["plots"]))
    say(f"results: {args.out}/results.json, {args.out}/results.md")
    lossless_ok = all(r["identical"] is not False for p in data["points"] for r in p["rows"]
                      if r["method"] != "sparse-only")
    return 0 if lossless_ok else 1
