"""Intake: a request's arguments, validated, as a :class:`~sparse2dense.requests.Group`.

Everything a caller can get wrong is checked here, before the engine's state is touched, and
refused with a one-sentence ``ValueError`` (:class:`~sparse2dense.requests.AdmissionError` when
the request can never fit the model or the engine's slots).
"""

from __future__ import annotations

import torch

from .requests import AdmissionError, Group, Handle, check_prompt, resolve_special_tokens
from .tokens import default_processors

SAMPLING_SETTINGS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


def stop_criteria(stopping_criteria, stop_strings, tokenizer):
    """``stopping_criteria`` plus a ``StopStringCriteria`` for ``stop_strings`` (None when empty)."""
    if stop_strings:
        if tokenizer is None:
            raise ValueError("stop_strings needs the model's tokenizer: pass tokenizer=...")
        from transformers import StoppingCriteriaList, StopStringCriteria

        criteria = StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings)
        stopping_criteria = StoppingCriteriaList([*(stopping_criteria or []), criteria])
    return stopping_criteria if stopping_criteria else None


def _seed(seed) -> int:
    if seed is None:
        return int(torch.randint(0, 2**62, (1,)).item())  # from the global RNG: torch.manual_seed repeats it
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}.")
    return seed


def request_group(engine, input_ids, max_new_tokens, *, eos_token_id=None, pad_token_id=None, do_sample=False,
                  seed=None, logits_processor=None, stopping_criteria=None, stop_strings=None, streamer=None,
                  callback=None, context_mask=None, settings: dict | None = None, model_inputs: dict | None = None
                  ) -> Group:
    """The one-row group of :meth:`sparse2dense.Engine.submit`; see there for the arguments."""
    if isinstance(input_ids, torch.Tensor) and input_ids.ndim == 2 and input_ids.shape[0] != 1:
        raise ValueError(f"submit() takes one request: input_ids of shape [L] or [1, L], got {tuple(input_ids.shape)}; "
                         "submit the rows one by one.")
    ids, mask = check_prompt(input_ids, None, max_new_tokens, engine.adapter.max_positions)
    length = ids.shape[1]
    if length + max_new_tokens > engine.max_seq_len:
        raise AdmissionError(f"prompt of {length} tokens plus max_new_tokens={max_new_tokens} exceeds the engine's "
                             f"max_seq_len={engine.max_seq_len}.")
    if max_new_tokens > engine.max_new_tokens:
        raise AdmissionError(f"max_new_tokens={max_new_tokens} exceeds the engine's max_new_tokens={engine.max_new_tokens}.")
    if context_mask is not None:
        context_mask = torch.as_tensor(context_mask).bool().reshape(1, -1)
        if context_mask.shape != ids.shape:
            raise ValueError(f"context_mask must have the prompt's length {length}, got {context_mask.shape[1]}.")
    eos_ids, pad_id = resolve_special_tokens(engine.model, eos_token_id, pad_token_id)
    processors = logits_processor
    if processors is None:
        processors = default_processors(engine.model, ids, do_sample, **(settings or {}))
    return Group(
        input_ids=ids.to(engine.device), attention_mask=mask.to(engine.device), max_new_tokens=max_new_tokens,
        eos_ids=set(eos_ids), pad_id=pad_id, handles=[Handle(prompt_len=length)],
        processors=processors or None,
        stopping=stop_criteria(stopping_criteria, stop_strings, engine.tokenizer),
        sampling="seeded" if do_sample else "greedy", seeds=[_seed(seed)] if do_sample else None,
        streamer=streamer, callback=callback, model_inputs=dict(model_inputs or {}), context_mask=context_mask,
    )


def batch_group(input_ids, attention_mask, max_new_tokens, eos_ids, pad_id, *, processors=None, stopping=None,
                do_sample=False, generator=None, streamer=None, context_mask=None, prompt_position_ids=None,
                progress=None, model_inputs=None) -> Group:
    """The group of :func:`sparse2dense.generate`: a left-padded batch whose rows share processors
    and one random generator, as in ``model.generate`` (inputs already validated)."""
    lengths = attention_mask.sum(dim=1).tolist()
    return Group(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, eos_ids=set(eos_ids),
        pad_id=pad_id, handles=[Handle(prompt_len=int(n)) for n in lengths], processors=processors,
        stopping=stopping, sampling="shared" if do_sample else "greedy", generator=generator,
        pad_finished=bool(eos_ids), compactable=processors is None and not do_sample, streamer=streamer,
        model_inputs=dict(model_inputs or {}), context_mask=context_mask, prompt_position_ids=prompt_position_ids,
        progress=progress,
    )
