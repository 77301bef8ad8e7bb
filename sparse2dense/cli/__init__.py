"""Command line: ``sparse2dense demo``, ``bench``, ``generate`` and ``serve``.

Every mistake a user can make (a missing file, a bad parameter, a prompt longer than the model's
context, an unsupported model) ends with one ``sparse2dense: error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from . import bench_cmd, demo_cmd, generate_cmd, serve_cmd
from .common import EXIT_USER_ERROR, UserError

COMMANDS = {"demo": demo_cmd, "bench": bench_cmd, "generate": generate_cmd, "serve": serve_cmd}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparse2dense",
        description="Lossless Sparse-to-Dense speculative decoding for Hugging Face LLMs and Video-LLMs: "
                    "the same model drafts with sparse attention and verifies with dense attention, so the "
                    "output is token for token what greedy decoding gives, only faster where KV reads dominate.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"sparse2dense {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    for module in COMMANDS.values():
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USER_ERROR
    from ..adapters import UnsupportedModelError
    from ..models import ModelLoadError

    try:
        return COMMANDS[args.command].run(args)
    except (UserError, ModelLoadError, UnsupportedModelError, ValueError) as exc:
        print(f"sparse2dense: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("sparse2dense: interrupted", file=sys.stderr)
        return 130
