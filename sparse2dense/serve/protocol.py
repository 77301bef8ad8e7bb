"""OpenAI request bodies, validated, as what the engine needs: prompt ids, vision inputs, settings.

Follows vLLM's OpenAI-compatible server where OpenAI leaves room: ``top_k``, ``min_p`` and
``repetition_penalty`` are accepted as extensions; an absent ``temperature`` uses the model's
generation config (greedy unless it samples); ``temperature: 0`` is greedy. ``frequency_penalty``
and ``presence_penalty`` are OpenAI's additive penalties on the tokens generated so far. What is
not supported (``n > 1``, ``logprobs``, tools, structured output) is refused with a 400 that says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import ServeConfig
from .errors import bad
from .media import fetch, read_image_part, read_video_part

_UNSUPPORTED = ("logprobs", "top_logprobs", "tools", "tool_choice", "functions", "function_call", "logit_bias",
                "best_of", "suffix", "echo", "prediction", "audio", "modalities")


@dataclass
class Prepared:
    """One validated request: ``prompt_ids`` LongTensor ``[L]`` and the engine's keyword arguments."""

    prompt_ids: torch.Tensor
    submit: dict
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def _number(body: dict, name: str, low: float | None = None, high: float | None = None, integer: bool = False):
    value = body.get(name)
    if value is None:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise bad(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}", name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise bad(f"{name} must be between {low} and {high}, got {value}", name)
    return value


def _max_tokens(body: dict, cfg: ServeConfig) -> int:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if value is None:
        return cfg.default_max_tokens
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise bad(f"{name} must be a positive integer, got {value!r}", name)
    return value


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise bad("stop must be a non-empty string or a list of at most 4 non-empty strings", "stop")
    return stops


def sampling(body: dict, model) -> dict:
    """The engine's sampling keyword arguments for this body (see the module docstring)."""
    for name in _UNSUPPORTED:
        if body.get(name) not in (None, False, [], {}):
            raise bad(f"{name} is not supported by this server", name)
    if body.get("n", 1) != 1:
        raise bad("n must be 1 (one choice per request)", "n")
    fmt = body.get("response_format")
    if fmt not in (None, {"type": "text"}):
        raise bad("response_format other than text is not supported", "response_format")
    temperature = _number(body, "temperature", 0, 2)
    out: dict = {}
    gen = getattr(model, "generation_config", None)
    do_sample = bool(getattr(gen, "do_sample", False)) if temperature is None else temperature > 0
    top_p, top_k = _number(body, "top_p", 0, 1), _number(body, "top_k", -1, None, integer=True)
    min_p, rep = _number(body, "min_p", 0, 1), _number(body, "repetition_penalty", 0.01, None)
    seed = _number(body, "seed", None, None, integer=True)
    if top_p == 0:
        raise bad("top_p must be above 0", "top_p")
    if do_sample:
        out.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=None if top_k in (None, -1) else top_k,
                   min_p=min_p, seed=seed)
    if rep is not None:
        out["repetition_penalty"] = rep
    freq, pres = _number(body, "frequency_penalty", -2, 2), _number(body, "presence_penalty", -2, 2)
    if freq or pres:
        out["penalties"] = (float(freq or 0.0), float(pres or 0.0))
    return {k: v for k, v in out.items() if v is not None}


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream must be true or false", "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise bad("stream_options needs stream: true", "stream_options")
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise bad("stream_options must be an object like {\"include_usage\": true}", "stream_options")
    return stream, bool(options.get("include_usage", False))


class OpenAIPenalties:
    """OpenAI's ``frequency_penalty`` and ``presence_penalty``: subtract ``frequency * count + presence
    * (count > 0)`` from the logit of every token generated so far (the prompt is not counted)."""

    def __init__(self, prompt_len: int, frequency: float, presence: float):
        self.prompt_len, self.frequency, self.presence = prompt_len, frequency, presence

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[:, self.prompt_len:]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def _processors(ids: torch.Tensor, submit: dict, model) -> dict:
    """Turn OpenAI's penalties into a logits processor in front of the sampling ones."""
    penalties = submit.pop("penalties", None)
    if penalties is None:
        return submit
    from transformers import LogitsProcessorList

    from ..tokens import default_processors

    names = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
    procs = default_processors(model, ids[None], submit.get("do_sample", False),
                               **{k: submit.pop(k) for k in names if k in submit}) or LogitsProcessorList()
    procs.insert(0, OpenAIPenalties(ids.numel(), *penalties))
    return {**submit, "logits_processor": procs}


def _finish(ids: torch.Tensor, submit: dict, body: dict, cfg: ServeConfig, limit: int, model=None) -> Prepared:
    max_tokens = _max_tokens(body, cfg)
    longest = min(cfg.max_prompt_tokens or limit, limit - 1)
    if ids.numel() > longest:
        raise bad(f"the prompt has {ids.numel()} tokens; this server takes at most {longest}", "messages")
    if ids.numel() + max_tokens > limit:
        raise bad(f"the prompt's {ids.numel()} tokens plus max_tokens={max_tokens} exceed the server's context of "
                  f"{limit} tokens", "max_tokens")
    stream, usage = _stream_flags(body)
    submit = _processors(ids, dict(submit), model)
    return Prepared(ids, {**submit, "max_new_tokens": max_tokens}, _stop(body), stream, usage)


def completion(body: dict, tokenizer, model, cfg: ServeConfig, limit: int) -> Prepared:
    """A ``/v1/completions`` body."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        ids = torch.tensor(tokenizer(prompt).input_ids, dtype=torch.long)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = torch.tensor(prompt, dtype=torch.long)
        if int(ids.min()) < 0 or int(ids.max()) >= len(tokenizer):
            raise bad("prompt token ids must be in the tokenizer's vocabulary", "prompt")
    else:
        raise bad("prompt must be a non-empty string, or a list of token ids (one prompt per request)", "prompt")
    return _finish(ids, sampling(body, model), body, cfg, limit, model)


def _parts(message: dict, index: int) -> list[dict]:
    content = message.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(p, dict) for p in content):
        raise bad(f"messages[{index}].content must be a string or a list of content parts", f"messages[{index}]")
    return content


def _media_part(part: dict, cfg: ServeConfig, body: dict, param: str):
    kind = part.get("type")
    spec = part.get(kind)
    url = spec.get("url") if isinstance(spec, dict) else spec
    source = fetch(url, cfg, param)
    if kind == "image_url":
        return read_image_part(source, cfg, param), None
    fps = _number(spec if isinstance(spec, dict) else {}, "fps", 0.01, 60) or _number(body, "fps", 0.01, 60)
    frames = (_number(spec if isinstance(spec, dict) else {}, "max_frames", 1, None, integer=True)
              or _number(body, "max_frames", 1, None, integer=True))
    return None, read_video_part(source, cfg, param, fps=fps, max_frames=frames)


def chat(body: dict, tokenizer, model, cfg: ServeConfig, limit: int, vision: bool, processor=None) -> Prepared:
    """A ``/v1/chat/completions`` body: the messages through the chat template; one image or video
    part (Video-LLMs) through :func:`sparse2dense.video_inputs.build_video_inputs`."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", "messages")
    texts, media = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise bad(f"messages[{i}] needs a role of system, user or assistant", f"messages[{i}]")
        words = []
        for j, part in enumerate(_parts(m, i)):
            kind = part.get("type")
            if kind == "text" and isinstance(part.get("text"), str):
                words.append(part["text"])
            elif kind in ("image_url", "video_url"):
                if not vision:
                    raise bad(f"this model takes text only; messages[{i}] has an {kind} part", f"messages[{i}]")
                media.append((i, f"messages[{i}].content[{j}]", part))
            else:
                raise bad(f"messages[{i}].content[{j}] must be a text, image_url or video_url part",
                          f"messages[{i}].content[{j}]")
        texts.append({"role": "system" if m["role"] == "developer" else m["role"], "content": "".join(words)})
    submit = sampling(body, model)
    if not media:
        enc = tokenizer.apply_chat_template(texts, add_generation_prompt=True, return_dict=True, return_tensors="pt")
        return _finish(enc["input_ids"][0], submit, body, cfg, limit, model)
    if len(media) > 1 or len(messages) > 1 or messages[0].get("role") != "user":
        raise bad("a request with an image or video takes one user message with one image or video part",
                  "messages")
    _, param, part = media[0]
    image, video = _media_part(part, cfg, body, param)
    from ..video_inputs import build_video_inputs

    frames = image if image is not None else video.frames
    try:
        enc = build_video_inputs(model, processor or tokenizer, frames, texts[0]["content"],
                                 fps=None if video is None else body.get("fps"),
                                 timestamps=None if video is None else video.timestamps,
                                 duration=None if video is None else video.duration)
    except ValueError as exc:
        raise bad(str(exc), param) from None
    extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    return _finish(enc["input_ids"][0], {**submit, **extra}, body, cfg, limit, model)
