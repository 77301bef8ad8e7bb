"""The ``model.generate(..., custom_generate=sparse2dense.custom_generate)`` entry point.

transformers 5.x prepares the inputs, logits processors and stopping criteria as for any decoding
method, then calls this function instead of its own loop. Extra keyword arguments named in this
function's signature (``budget``, ``gamma``, ``draft_dtype``, ``std_config``, ``context_mask``) are passed through
from ``model.generate``.
"""

from __future__ import annotations

import inspect

import torch
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria, StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .config import StdConfig
from .generation import generate


def _streamer_from_generate_call(model):
    """The ``streamer`` given to the ``model.generate`` call that is running this function.

    transformers 5.23 puts the prompt to the streamer and then passes a callable
    ``custom_generate`` only the keyword arguments that its own loop does not take, which drops
    ``streamer``. Reading it from that ``generate`` frame keeps ``streamer=`` working as users
    expect. Returns None when there is no such frame or no streamer.
    """
    frame = inspect.currentframe()
    try:
        frame = frame.f_back if frame is not None else None
        for _ in range(8):
            if frame is None:
                return None
            if frame.f_code.co_name == "generate" and frame.f_locals.get("self") is model:
                return frame.f_locals.get("streamer")
            frame = frame.f_back
        return None
    finally:
        del frame


# model_kwargs that generate() prepares for its own loop and that sparse2dense replaces.
_PREPARED_BY_GENERATE = ("past_key_values", "logits_to_keep", "use_cache", "cache_position")


def _check_unsupported(gc, synced_gpus: bool) -> None:
    if (gc.num_beams or 1) > 1:
        raise ValueError("sparse2dense.custom_generate does not support beam search; use num_beams=1.")
    if gc.output_scores or gc.output_logits or gc.output_attentions or gc.output_hidden_states:
        raise ValueError(
            "sparse2dense.custom_generate does not return scores, logits, attentions or hidden states."
        )
    if synced_gpus:
        raise ValueError("sparse2dense.custom_generate does not support synced_gpus.")


def custom_generate(
    model,
    input_ids: torch.LongTensor,
    logits_processor=None,
    stopping_criteria=None,
    generation_config=None,
    synced_gpus: bool = False,
    streamer=None,
    budget: int | str = 1024,
    gamma: int | str = 9,
    draft_dtype=None,
    std_config: StdConfig | None = None,
    context_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    **model_kwargs,
):
    """Sparse-to-Dense decoding behind ``model.generate``: greedy, or sampling with ``do_sample=True``.

    Sampling uses the logits processors ``generate`` prepared (temperature, top-k, top-p, min-p,
    penalties) on both the draft and the dense distributions; the speculative-sampling rule keeps
    the output distribution exactly that of ``generate``'s own sampling. Pass ``generator`` for a
    dedicated random stream; otherwise the global RNG (``torch.manual_seed``) is used.

    transformers 5.23 drops ``tokenizer`` before calling a ``custom_generate`` callable, so
    ``stop_strings=`` fails inside ``model.generate``; pass
    ``stopping_criteria=StoppingCriteriaList([StopStringCriteria(tokenizer, stop_strings)])``
    instead, or use :func:`sparse2dense.generate` with ``stop_strings=`` and ``tokenizer=``.

    Returns what ``model.generate`` returns: the sequences tensor, or, with
    ``return_dict_in_generate=True``, a ``GenerateDecoderOnlyOutput`` whose ``std_stats`` attribute
    holds the :class:`~sparse2dense.StdStats` of the call.
    """
    gc = generation_config if generation_config is not None else model.generation_config
    _check_unsupported(gc, synced_gpus)
    max_new_tokens = int(gc.max_length) - input_ids.shape[1]
    if max_new_tokens < 1:
        raise ValueError(
            f"max_length={gc.max_length} leaves no room for new tokens after a {input_ids.shape[1]}-token prompt."
        )
    for key in _PREPARED_BY_GENERATE:
        model_kwargs.pop(key, None)
    attention_mask = model_kwargs.pop("attention_mask", None)
    # generate() has prepared the prompt's position ids (M-RoPE for the Qwen-VL family, from vision
    # inputs that it may already have replaced by precomputed encoder outputs): use them as they are.
    prompt_position_ids = model_kwargs.pop("position_ids", None)
    criteria = None
    if stopping_criteria:
        rest = [c for c in stopping_criteria if not isinstance(c, (MaxLengthCriteria, EosTokenCriteria))]
        criteria = StoppingCriteriaList(rest) if rest else None
    eos = getattr(gc, "_eos_token_tensor", None)
    if eos is None:
        eos = gc.eos_token_id
    pad = getattr(gc, "_pad_token_tensor", None)
    pad = int(pad) if pad is not None else gc.pad_token_id
    if streamer is None:
        streamer = _streamer_from_generate_call(model)
    config = std_config if std_config is not None else StdConfig(budget=budget, gamma=gamma, draft_dtype=draft_dtype)
    out = generate(
        model, input_ids, attention_mask, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad,
        context_mask=context_mask, config=config, logits_processor=logits_processor if logits_processor else None,
        stopping_criteria=criteria, streamer=streamer, stream_prompt=False,  # generate() has put the prompt
        prompt_position_ids=prompt_position_ids, do_sample=bool(gc.do_sample), generator=generator, **model_kwargs,
    )
    if gc.return_dict_in_generate:
        result = GenerateDecoderOnlyOutput(sequences=out.sequences)
        result.std_stats = out.stats
        return result
    return out.sequences
