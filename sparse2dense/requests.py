"""Requests: what a caller submits to the engine, and the handle it gets back.

A **group** is the unit the engine prefills and whose generation settings its rows share: one
request of :meth:`sparse2dense.Engine.submit` (one row), or the whole left-padded batch of
:func:`sparse2dense.generate` (its rows share logits processors and one random generator, as in
``model.generate``). A **handle** is one row's view for the caller: its new tokens as they are
committed, whether it is done and why, and its statistics.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .stats import RequestStats

#: how a group picks tokens: ``greedy`` (argmax), ``shared`` (speculative sampling with one random
#: generator for the whole group, as ``generate(do_sample=True)``), ``seeded`` (sampling with a
#: per-request seed: each new token position has its own noise, see :mod:`sparse2dense.tokens`)
SAMPLING_MODES = ("greedy", "shared", "seeded")
FINISH_REASONS = ("stop", "length", "cancelled", "error")

_ids = itertools.count(1)


class AdmissionError(ValueError):
    """A request that the engine can never run (too long for the model or for the engine's slots)."""


@dataclass(eq=False)
class Handle:
    """One submitted request (one row). Read it while the engine runs; the engine writes it.

    Attributes:
        id: a number unique in this process.
        prompt_len: prompt tokens (padding excluded).
        tokens: the new token ids so far (an EOS that ended the row included, as ``generate`` does).
        done: whether the row has finished.
        finish_reason: ``"stop"`` (EOS, a stop string or a stopping criterion), ``"length"``
            (``max_new_tokens`` reached), ``"cancelled"``, or ``"error"`` (its inputs failed in the
            model's forward; ``error`` says how, and no other request is affected); None while running.
        stats: :class:`~sparse2dense.stats.RequestStats`.
        error: the one-sentence reason of an ``"error"`` finish.
    """

    prompt_len: int
    id: int = field(default_factory=lambda: next(_ids))
    tokens: list[int] = field(default_factory=list)
    done: bool = False
    finish_reason: str | None = None
    stats: RequestStats = field(default_factory=RequestStats)
    error: str | None = None
    submitted_at: float = field(default_factory=time.perf_counter)

    def __repr__(self) -> str:
        state = self.finish_reason if self.done else "running"
        return f"Handle(id={self.id}, prompt_len={self.prompt_len}, new={len(self.tokens)}, {state})"


@dataclass(eq=False)
class Group:
    """Rows prefilled together that share generation settings; see the module docstring.

    Tensors: ``input_ids`` and ``attention_mask`` ``[k, P]`` (left-padded), ``context_mask`` bool
    ``[k, P]`` or None, ``prompt_position_ids`` ``[..., k, P]`` or None.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    max_new_tokens: int
    eos_ids: set[int]
    pad_id: int
    handles: list[Handle]
    processors: Any = None  # a LogitsProcessorList seeing the group's rows, or None
    stopping: Any = None  # a StoppingCriteriaList, or None
    sampling: str = "greedy"
    generator: torch.Generator | None = None  # "shared": the group's random generator (None: global)
    seeds: list[int] | None = None  # "seeded": one seed per row
    # transformers pads rows that finished early only when an EOS id is configured; without one, a
    # row stopped by a stopping criterion keeps generating until every row of its batch has stopped.
    pad_finished: bool = True
    # Rows may leave the forward passes one by one: not where something sees the group as a whole
    # (logits processors may address rows by index; shared sampling draws for every row).
    compactable: bool = True
    streamer: Any = None  # a transformers streamer for row 0
    callback: Callable[[Handle, list[int]], None] | None = None  # called with each row's new tokens
    model_inputs: dict = field(default_factory=dict)
    context_mask: torch.Tensor | None = None
    prompt_position_ids: torch.Tensor | None = None
    progress: Callable[[str, int, int], None] | None = None
    limited: bool = False  # the no-padding rule has set every row's final length
    prefilled: Any = None  # the finished PrefillJob: the prompt masks and captured queries selection reads
    finish_len: list = field(default_factory=list)  # per row: new tokens when it stopped (None: not yet)

    def __post_init__(self) -> None:
        if not self.finish_len:
            self.finish_len = [None] * self.size

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def width(self) -> int:
        return self.input_ids.shape[1]

    @property
    def done(self) -> bool:
        return all(h.done for h in self.handles)


def as_id_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten().tolist()]
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def resolve_special_tokens(model, eos_token_id=None, pad_token_id=None) -> tuple[list[int], int]:
    """EOS ids and pad id: the given ones, else the model's generation config; pad falls back to
    the first EOS, else 0."""
    gen_cfg = getattr(model, "generation_config", None)
    if eos_token_id is None and gen_cfg is not None:
        eos_token_id = gen_cfg.eos_token_id
    eos_ids = as_id_list(eos_token_id)
    if pad_token_id is None and gen_cfg is not None:
        pad_token_id = gen_cfg.pad_token_id
    if pad_token_id is None:
        pad_token_id = eos_ids[0] if eos_ids else 0
    return eos_ids, int(pad_token_id)


def check_max_new(max_new_tokens) -> int:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
    return max_new_tokens


def check_prompt(input_ids, attention_mask, max_new_tokens, max_positions: int | None):
    """Validated ``(input_ids [B, P] long, attention_mask [B, P] long)``; one-sentence ``ValueError`` otherwise.

    Rows must be left-padded; ``max_positions`` (the model's context) bounds prompt plus new tokens.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
        raise ValueError("input_ids must be an integer tensor of shape [batch, prompt_len].")
    if input_ids.ndim == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.ndim != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise ValueError(f"input_ids must have shape [batch, prompt_len] with both > 0, got {tuple(input_ids.shape)}.")
    input_ids = input_ids.long()
    check_max_new(max_new_tokens)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    else:
        if attention_mask.ndim == 1:
            attention_mask = attention_mask.unsqueeze(0)
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}."
            )
        attention_mask = attention_mask.to(input_ids.device).long()
        if bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()):
            raise ValueError("batched prompts must be left-padded (tokenizer padding_side='left').")
        if bool((attention_mask.sum(dim=1) == 0).any()):
            raise ValueError("every row needs at least one non-padding token.")
    longest = int(attention_mask.sum(dim=1).max())
    if max_positions is not None and longest + max_new_tokens > max_positions:
        raise AdmissionError(
            f"prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the model's context of "
            f"{max_positions} tokens.")
    return input_ids, attention_mask
