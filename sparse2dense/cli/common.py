"""Shared pieces of the command line: option types, the Sparse-to-Dense options, progress bars.

Every mistake a user can make ends with one ``sparse2dense: error: ...`` line and exit status 2:
option types raise ``argparse.ArgumentTypeError`` and commands raise :class:`UserError`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input; printed as one line, no traceback."""


def _int_at_least(name: str, low: int):
    """argparse type: an integer ``>= low``, with an error message that names the option."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{name} must be at least {low}, got {value}")
        return value

    return parse


def _positive(name: str):
    return _int_at_least(name, 1)


def _non_negative(name: str):
    return _int_at_least(name, 0)


def _positive_float(name: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{name} must be > 0, got {value}")
        return value

    return parse


def _fraction(name: str):
    def parse(text: str) -> float:
        value = _positive_float(name)(text)
        if value > 1:
            raise argparse.ArgumentTypeError(f"{name} must be at most 1, got {value}")
        return value

    return parse


def _batch_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,4; got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers, got {text!r}")
    return values


def _or_auto(parse):
    def wrapped(text: str):
        return "auto" if text == "auto" else parse(text)

    return wrapped


def _add_std_args(p: argparse.ArgumentParser, gamma_default, draft_default: str | None = None,
                  budget_default="1024") -> None:
    g = p.add_argument_group("Sparse-to-Dense settings")
    g.add_argument("--budget", type=_or_auto(_positive("--budget")), default=_or_auto(int)(str(budget_default)),
                   help="prompt KV entries per layer and KV head that the drafter reads, or 'auto' "
                        f"(default: {budget_default})")
    g.add_argument("--gamma", type=_or_auto(_non_negative("--gamma")), default=gamma_default,
                   help=f"draft tokens per round; 0 = plain dense decoding; 'auto' = chosen each round from "
                        f"measured costs, dense when speculation cannot pay (default: {gamma_default})")
    g.add_argument("--policy", choices=("paper", "streaming", "last"), default="paper",
                   help="how the drafter picks prompt entries: attention from the question (paper), from the "
                        "last prompt tokens (last), or sinks + most recent tokens (streaming) (default: paper)")
    g.add_argument("--draft-dtype", choices=("fp32", "bf16", "fp16", "int8", "int4", "auto"), default=draft_default,
                   help="draft with cheaper weights: a bf16/fp16 copy, or weight-only int8/int4 (Llama, Mistral, "
                        "Qwen2, Qwen3 on CPU); auto picks what the model and hardware support; fp32 keeps the "
                        "model's own. The output is unchanged; a copy costs memory (default: "
                        + (draft_default or "the model's own weights; auto with --gamma auto") + ")")


def _progress_bar(enabled: bool):
    """A ``(phase, done, total)`` callback drawing a tqdm bar per phase on stderr."""
    if not enabled:
        return None
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def update(phase: str, done: int, total: int) -> None:
        bar = bars.get(phase)
        if bar is None or bar.total != total or done < bar.n:
            if bar is not None:
                bar.close()
            bar = bars[phase] = tqdm(total=total, desc=f"  {phase}", unit="tok", leave=False, file=sys.stderr)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            bars.pop(phase, None)

    return update


def _quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=UserWarning)


def _std_config(args):
    from ..config import StdConfig

    gamma = 0 if getattr(args, "dense", False) else args.gamma
    return StdConfig(budget=args.budget, gamma=gamma, policy=args.policy, draft_dtype=args.draft_dtype)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _read_text(path: str, what: str) -> str:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} not found: {path}")
    if not p.is_file():
        raise UserError(f"{what} is not a file: {path}")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{what} is not UTF-8 text: {path}") from None
