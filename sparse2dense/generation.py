"""``sparse2dense.generate``: one batch through the engine, with ``model.generate``'s conventions.

The batch is one group of an :class:`~sparse2dense.Engine` sized for it: its rows share the logits
processors and the random generator as they do in ``model.generate``, it is prefilled at once
and decoded until its last row is done. The result is laid out like ``model.generate``'s.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from .config import StdConfig
from .engine import Engine
from .intake import batch_group, stop_criteria
from .requests import check_prompt, resolve_special_tokens
from .stats import StdOutput
from .tokens import default_processors
from .adapters import get_adapter


def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    budget: int | str = 1024,
    gamma: int | str = 9,
    draft_dtype: torch.dtype | str | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    context_mask: torch.Tensor | None = None,
    config: StdConfig | None = None,
    logits_processor=None,
    stopping_criteria=None,
    streamer=None,
    progress: Callable[[str, int, int], None] | None = None,
    stream_prompt: bool = True,
    do_sample: bool = False,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    generator: torch.Generator | None = None,
    stop_strings: str | list[str] | None = None,
    tokenizer=None,
    prompt_position_ids: torch.Tensor | None = None,
    **model_inputs,
) -> StdOutput:
    """Sparse-to-Dense decoding: the tokens of dense decoding, produced faster.

    Args:
        model: a transformers causal LM (see :func:`sparse2dense.supported_models`).
        input_ids: LongTensor ``[B, P]``, left-padded when rows differ in length.
        attention_mask: ``[B, P]`` with 0 on left padding (default: all ones).
        max_new_tokens: tokens to generate per row (at least 1).
        budget: prompt KV entries per layer and KV head that the drafter reads, or ``"auto"``.
        gamma: draft tokens per round; 0 runs plain dense decoding on the same fast buffers;
            ``"auto"`` picks each round's draft length from measured costs and acceptance, and
            decodes densely when speculation cannot pay (``stats.speculation`` says which).
        draft_dtype: cheaper drafter weights: ``torch.bfloat16``/``torch.float16``, ``"int8"`` or
            ``"int4"`` (weight-only; Llama, Mistral, Qwen2, Qwen3 on CPU), or ``"auto"``. The verifier
            keeps the model's precision, so the output is unchanged (see :class:`StdConfig`).
        eos_token_id: token id(s) that end a row (default: the model's generation config).
        pad_token_id: fills rows that ended early (default: the model's, else the first EOS, else 0).
        context_mask: bool ``[B, P]``: prompt tokens the drafter may drop (default: the adapter's choice).
        config: a full :class:`StdConfig`; overrides ``budget`` and ``gamma`` when given.
        logits_processor, stopping_criteria, streamer: as in ``model.generate``; ``progress``: a
            callback ``(phase, done, total)``; ``stream_prompt``: put the prompt to ``streamer`` first.
        do_sample, temperature, top_k, top_p, min_p, repetition_penalty: as in ``model.generate``
            (unset values come from ``model.generation_config``; ignored with ``logits_processor``).
            Speculative sampling keeps the output distribution exactly that of dense sampling.
        generator: a ``torch.Generator`` for sampling (default: the global RNG, so
            ``torch.manual_seed`` makes runs repeat).
        stop_strings, tokenizer: stop a row at exactly the token ``model.generate(stop_strings=...,
            tokenizer=...)`` stops at.
        prompt_position_ids: the prompt's position ids as ``generate`` prepared them (last dim =
            prompt length); by default the adapter computes them.
        **model_inputs: extra model inputs (vision tensors for Video-LLMs).

    Returns:
        :class:`StdOutput` with ``.sequences`` ``[B, P + new]`` and ``.stats``.
    """
    t_total = time.perf_counter()
    cfg = config if config is not None else StdConfig(budget=budget, gamma=gamma, draft_dtype=draft_dtype)
    stopping_criteria = stop_criteria(stopping_criteria, stop_strings, tokenizer)
    if streamer is not None and isinstance(input_ids, torch.Tensor) and input_ids.ndim == 2 and input_ids.shape[0] != 1:
        raise ValueError("streaming supports batch size 1 only, like transformers' streamers.")
    settings = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty)
    engine, group = batch_engine(
        model, input_ids, attention_mask, max_new_tokens, cfg, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        context_mask=context_mask, logits_processor=logits_processor, settings=settings, stopping=stopping_criteria,
        do_sample=do_sample, generator=generator, streamer=streamer, stream_prompt=stream_prompt,
        prompt_position_ids=prompt_position_ids, progress=progress, model_inputs=model_inputs,
    )
    engine.prefill()
    engine.decode()
    out = engine.output(group)
    out.stats.time_total = time.perf_counter() - t_total
    return out


def batch_engine(model, input_ids, attention_mask, max_new_tokens: int, cfg: StdConfig, *, eos_token_id=None,
                 pad_token_id=None, context_mask=None, logits_processor=None, settings: dict | None = None,
                 stopping=None, do_sample: bool = False, generator=None, streamer=None, stream_prompt: bool = True,
                 prompt_position_ids=None, progress=None, model_inputs: dict | None = None):
    """An :class:`~sparse2dense.Engine` sized for one left-padded batch, and the batch submitted to it
    as one group: ``(engine, group)``. Validates the inputs (one-sentence ``ValueError`` otherwise)."""
    adapter = get_adapter(model)
    input_ids, attention_mask = check_prompt(input_ids, attention_mask, max_new_tokens, adapter.max_positions)
    eos_ids, pad_token_id = resolve_special_tokens(model, eos_token_id, pad_token_id)
    if context_mask is not None and tuple(context_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"context_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(context_mask.shape)}."
        )
    if logits_processor is None:
        logits_processor = default_processors(model, input_ids, do_sample, **(settings or {}))
    if streamer is not None and stream_prompt:
        streamer.put(input_ids.cpu())
    batch, width = input_ids.shape
    engine = Engine(model, max_batch=batch, config=cfg, max_seq_len=width + max_new_tokens,
                    max_new_tokens=max_new_tokens, _batch=batch)
    group = engine.submit_group(batch_group(
        input_ids, attention_mask, max_new_tokens, eos_ids, pad_token_id, processors=logits_processor or None,
        stopping=stopping, do_sample=do_sample, generator=generator, streamer=streamer, context_mask=context_mask,
        prompt_position_ids=prompt_position_ids, progress=progress, model_inputs=model_inputs,
    ))
    return engine, group
