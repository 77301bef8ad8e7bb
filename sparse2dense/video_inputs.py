"""From a prompt and decoded frames to the keyword arguments a Video-LLM's forward takes.

With torchvision installed, the model's own processor builds the inputs (the reference). Without
it, inputs for Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, LLaVA-NeXT-Video and SmolVLM are
built here: frames through :mod:`sparse2dense.prepare`, text through the chat format with one
placeholder token per visual token. Idefics3 has no video processor: its frames go through its own
(PIL) image processor and processor as a series of images, with or without torchvision.
"""

from __future__ import annotations

import copy
from datetime import timedelta

import numpy as np
import torch

from .prepare import (
    QwenVideoSettings,
    SmolVLMVideoSettings,
    _checkpoint_preprocessor,
    llava_next_video_pixels,
    llava_onevision_video_pixels,
    qwen_video_pixels,
    smolvlm_video_pixels,
    torchvision_available,
)

QWEN_OWN_PREP = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
OWN_PREP = QWEN_OWN_PREP + ("llava_onevision", "llava_next_video", "smolvlm", "idefics3")

#: the chat template Idefics3 checkpoints ship (its processor renders image entries as ``<image>``)
IDEFICS3_CHAT_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def build_video_inputs(model, tokenizer_or_processor, frames: np.ndarray, prompt: str, fps: float | None = None,
                       timestamps: list[float] | None = None, duration: float | None = None) -> dict:
    """Model inputs (``input_ids``, ``attention_mask``, pixel tensors, grids, ...) for one video + prompt.

    Args:
        frames: uint8 ``[T, H, W, 3]``.
        fps: the rate the frames were sampled at (Qwen2.5-VL uses it for temporal positions).
        timestamps: each frame's time in seconds (Qwen3-VL and SmolVLM write them into the prompt);
            default: frame index / 24, as transformers' processors assume without metadata.
        duration: the video's length in seconds (SmolVLM writes it into the prompt); default: the
            last timestamp, as SmolVLM's processor does without metadata.

    Returns:
        Batch-1 tensors: ``input_ids`` / ``attention_mask`` ``[1, L]`` plus the family's vision
        inputs (SmolVLM / Idefics3: ``pixel_values [1, T, 3, S, S]`` and
        ``pixel_attention_mask [1, T, S, S]``).
    """
    model_type = model.config.model_type
    processor = tokenizer_or_processor
    if timestamps is not None and len(timestamps) != len(frames):
        raise ValueError(f"got {len(timestamps)} timestamps for {len(frames)} frames.")
    if model_type == "idefics3":
        return _idefics3_inputs(model, processor, frames, prompt)
    if hasattr(processor, "video_processor") and torchvision_available():
        text = _processor_chat_text(processor, prompt)
        if text is not None:
            return _processor_inputs(model, processor, text, frames, fps, timestamps, duration)
        if model_type not in OWN_PREP:
            raise ValueError(f"the chat template of {type(processor).__name__} cannot write a video message.")
        # a checkpoint whose chat template is text-only: prepare it as without torchvision
    if model_type not in OWN_PREP:
        raise ValueError(
            f"preparing video inputs for {type(model).__name__} needs its transformers processor, which needs "
            "torchvision (pip install torchvision); without it only Qwen2-VL, Qwen2.5-VL, Qwen3-VL, "
            "LLaVA-OneVision, LLaVA-NeXT-Video, SmolVLM and Idefics3 are prepared by sparse2dense itself."
        )
    tokenizer = getattr(processor, "tokenizer", processor)
    if model_type == "llava_onevision":
        return _llava_onevision_inputs(model, tokenizer, frames, prompt)
    if model_type == "llava_next_video":
        return _llava_next_video_inputs(model, tokenizer, frames, prompt)
    if model_type == "smolvlm":
        return _smolvlm_inputs(model, tokenizer, frames, prompt, timestamps, duration)
    settings = QwenVideoSettings.from_model(model)
    pixels, grid = qwen_video_pixels(frames, settings)
    n_tokens = int(grid.prod()) // (settings.merge_size ** 2)
    cfg = model.config
    start, pad, end = (tokenizer.convert_ids_to_tokens(i) for i in
                       (cfg.vision_start_token_id, cfg.video_token_id, cfg.vision_end_token_id))
    if model_type == "qwen3_vl":
        # one "<t seconds>" block per temporal patch, as Qwen3-VL's processor writes it
        stamps = list(timestamps) if timestamps is not None else [i / 24.0 for i in range(len(frames))]
        step = settings.temporal_patch_size
        stamps += [stamps[-1]] * (-len(stamps) % step)
        per_patch = [(stamps[i] + stamps[i + step - 1]) / 2 for i in range(0, len(stamps), step)]
        frame_tokens = n_tokens // int(grid[0, 0])
        video_text = "".join(f"<{t:.1f} seconds>{start}{pad * frame_tokens}{end}" for t in per_patch)
    else:
        video_text = f"{start}{pad * n_tokens}{end}"
    text = (f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{video_text}"
            f"{prompt}<|im_end|>\n<|im_start|>assistant\n")
    enc = _encode(tokenizer, text, cfg.video_token_id, n_tokens, add_special_tokens=False)
    input_ids = enc["input_ids"]
    inputs = {
        "input_ids": input_ids,
        "attention_mask": enc["attention_mask"],
        "pixel_values_videos": pixels.to(model.dtype),
        "video_grid_thw": grid,
        "mm_token_type_ids": (input_ids == cfg.video_token_id).long() * 2,
    }
    if model_type == "qwen2_5_vl":
        step = settings.temporal_patch_size / (fps if fps else 2.0)
        inputs["second_per_grid_ts"] = torch.tensor([step])
    return inputs


def _llava_onevision_inputs(model, tokenizer, frames: np.ndarray, prompt: str) -> dict:
    pixels, n_tokens = llava_onevision_video_pixels(frames, model)
    video_tok = tokenizer.convert_ids_to_tokens(model.config.video_token_index)
    text = (f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{video_tok * n_tokens}\n"
            f"{prompt}<|im_end|>\n<|im_start|>assistant\n")
    enc = _encode(tokenizer, text, model.config.video_token_index, n_tokens, add_special_tokens=False)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "pixel_values_videos": pixels.to(model.dtype)}


def _llava_next_video_inputs(model, tokenizer, frames: np.ndarray, prompt: str) -> dict:
    pixels, n_tokens = llava_next_video_pixels(frames, model)
    video_tok = tokenizer.convert_ids_to_tokens(model.config.video_token_index)
    text = f"USER: {video_tok * n_tokens}\n{prompt} ASSISTANT:"
    enc = _encode(tokenizer, text, model.config.video_token_index, n_tokens, add_special_tokens=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "pixel_values_videos": pixels.to(model.dtype)}


def _encode(tokenizer, text: str, placeholder_id: int, expected: int, add_special_tokens: bool):
    """Tokenize ``text`` and check that each placeholder stayed one token."""
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=add_special_tokens)
    found = int((enc["input_ids"] == placeholder_id).sum())
    if found != expected:
        raise ValueError(f"the tokenizer split the video placeholder into {found} tokens, expected {expected}.")
    return enc


def _processor_chat_text(processor, prompt: str) -> str | None:
    """The processor's chat text for one video and ``prompt``; None when its chat template cannot
    render a message with a video in it (a text-only template, or none)."""
    from jinja2 import TemplateError

    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
    try:
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    except (TemplateError, TypeError, ValueError):
        return None


def _processor_inputs(model, processor, text: str, frames: np.ndarray, fps: float | None,
                      timestamps: list[float] | None, duration: float | None) -> dict:
    """Inputs from the model's own transformers processor (needs torchvision) for its chat ``text``."""
    kwargs: dict = {"fps": fps} if fps else {}
    if model.config.model_type == "smolvlm":
        # the frames are already sampled; the metadata carries their times into the prompt
        kwargs = {"do_sample_frames": False, "video_metadata": [_smolvlm_metadata(len(frames), timestamps, duration)]}
        frame_size = int(processor.video_processor.max_image_size["longest_edge"])
        if processor.image_seq_len != image_seq_len(model, frame_size):
            raise ValueError(f"the processor writes {processor.image_seq_len} image tokens per frame, the model makes "
                             f"{image_seq_len(model, frame_size)} of a {frame_size}px frame (processor_config.json's "
                             "image_seq_len).")
    inputs = processor(text=[text], videos=[list(frames)], return_tensors="pt", **kwargs)
    return dict(inputs)


def _smolvlm_metadata(num_frames: int, timestamps: list[float] | None, duration: float | None) -> dict:
    """``VideoMetadata`` fields whose ``timestamps`` are exactly ``timestamps`` (fps 1, indices = seconds);
    without timestamps, what the processor assumes without metadata (24 fps, indices 0..T-1)."""
    if timestamps is None:
        return {"total_num_frames": num_frames, "fps": 24.0, "frames_indices": list(range(num_frames)),
                "duration": duration}
    return {"total_num_frames": num_frames, "fps": 1.0, "frames_indices": [float(t) for t in timestamps],
            "duration": duration}


# ----------------------------------------------------------------------------------- SmolVLM
_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ("", " thousand", " million", " billion")


def number_words(n: int) -> str:
    """``n`` in English words, as ``num2words(n)`` writes it (SmolVLM's processor spells the frame
    count with it): ``21 -> "twenty-one"``, ``1234 -> "one thousand, two hundred and thirty-four"``.
    Uses num2words itself when it is installed."""
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < 10**12:
        raise ValueError(f"number_words needs an integer in [0, 10**12), got {n!r}.")
    try:
        from num2words import num2words
    except ImportError:
        pass
    else:
        return num2words(n)

    def below_100(k: int) -> str:
        return _ONES[k] if k < 20 else _TENS[k // 10] + (f"-{_ONES[k % 10]}" if k % 10 else "")

    def below_1000(k: int) -> str:
        hundreds, rest = divmod(k, 100)
        if not hundreds:
            return below_100(rest)
        return f"{_ONES[hundreds]} hundred" + (f" and {below_100(rest)}" if rest else "")

    if n == 0:
        return "zero"
    groups = []  # (value, scale index), most significant first
    for scale in range(len(_SCALES) - 1, -1, -1):
        value, n = divmod(n, 1000**scale)
        if value:
            groups.append((value, scale))
    words = below_1000(groups[0][0]) + _SCALES[groups[0][1]]
    for value, scale in groups[1:]:
        # num2words joins the last group with "and" when it is below 100, the others with a comma
        sep = " and " if scale == 0 and value < 100 else ", "
        words += sep + below_1000(value) + _SCALES[scale]
    return words


def _special_token(tokenizer, attr: str, default: str) -> str:
    """The tokenizer's ``attr`` token (``image_token``, ...) as SmolVLM's processor picks it, checked to exist."""
    token = getattr(tokenizer, attr, None) or default
    _check_token(tokenizer, token)
    return token


def _check_token(tokenizer, token: str) -> None:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise ValueError(f"the tokenizer has no {token!r} token, which SmolVLM/Idefics3 prompts need.")


def smolvlm_video_text(tokenizer, prompt: str, num_frames: int, image_seq_len: int,
                       timestamps: list[float] | None = None, duration: float | None = None) -> str:
    """The prompt text SmolVLM's processor builds for one video and ``prompt``.

    Its video chat template (``"<|im_start|>User: <video>{prompt}<end_of_utterance>\\nAssistant:"``),
    with ``<video>`` expanded as ``SmolVLMProcessor.replace_video_token`` does: an intro naming the
    frame count in words and the duration as ``H:MM:SS``, then per frame ``"\\nFrame from MM:SS:"``
    and ``<fake_token_around_image><global-img>`` + ``image_seq_len`` x ``<image>`` +
    ``<fake_token_around_image>``, then a blank line.
    """
    from transformers.models.smolvlm.processing_smolvlm import (
        DEFAULT_CHAT_TEMPLATE,
        DEFAULT_MEDIA_OUTTRO,
        DEFAULT_VIDEO_INTRO,
        FRAME_TIMESTAMP_MESSAGE,
    )

    image = _special_token(tokenizer, "image_token", "<image>")
    fake = _special_token(tokenizer, "fake_image_token", "<fake_token_around_image>")
    global_image = _special_token(tokenizer, "global_image_token", "<global-img>")
    video = getattr(tokenizer, "video_token", None) or "<video>"
    stamps = list(timestamps) if timestamps is not None else [i / 24.0 for i in range(num_frames)]
    if len(stamps) != num_frames:
        raise ValueError(f"got {len(stamps)} timestamps for {num_frames} frames.")
    seconds = int(duration) if duration is not None else int(stamps[-1])
    expansion = DEFAULT_VIDEO_INTRO.format(frame_count=number_words(num_frames),
                                           video_duration=str(timedelta(seconds=seconds)))
    frame_text = f"{fake}{global_image}{image * image_seq_len}{fake}"
    for t in stamps:
        stamp = f"{int(t // 60):02d}:{int(t % 60):02d}"
        expansion += FRAME_TIMESTAMP_MESSAGE.format(timestamp=stamp) + frame_text
    expansion += DEFAULT_MEDIA_OUTTRO
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
    text = tokenizer.apply_chat_template(messages, chat_template=DEFAULT_CHAT_TEMPLATE, add_generation_prompt=True,
                                         tokenize=False)
    # the template's <video> comes before the prompt, so the first one is the placeholder
    return text.replace(video, expansion, 1)


def image_seq_len(model, frame_size: int) -> int:
    """Visual tokens per ``frame_size`` square frame for Idefics3 / SmolVLM: patches after the
    connector's pixel shuffle, ``(frame_size // patch_size) ** 2 // scale_factor ** 2``."""
    patches = (frame_size // model.config.vision_config.patch_size) ** 2
    return patches // model.config.scale_factor ** 2


def _smolvlm_inputs(model, tokenizer, frames: np.ndarray, prompt: str, timestamps: list[float] | None,
                    duration: float | None) -> dict:
    settings = SmolVLMVideoSettings.from_model(model)
    pixels, mask = smolvlm_video_pixels(frames, settings)
    seq_len = image_seq_len(model, settings.frame_size)
    text = smolvlm_video_text(tokenizer, prompt, len(frames), seq_len, timestamps, duration)
    enc = _encode(tokenizer, text, model.config.image_token_id, len(frames) * seq_len, add_special_tokens=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "pixel_values": pixels.to(model.dtype), "pixel_attention_mask": mask}


# ----------------------------------------------------------------------------------- Idefics3
def idefics3_processor(model, tokenizer_or_processor):
    """An ``Idefics3Processor`` for ``model``: the one given, or one built from its PIL image processor
    (which imports without torchvision) and a copy of the tokenizer (the processor adds its special
    tokens to the tokenizer it gets). Image processor settings come from the checkpoint's
    ``preprocessor_config.json``; without one, frames are squared to the vision tower's
    ``image_size`` (see :class:`~sparse2dense.prepare.SmolVLMVideoSettings`)."""
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    if isinstance(tokenizer_or_processor, Idefics3Processor):
        return tokenizer_or_processor
    tokenizer = getattr(tokenizer_or_processor, "tokenizer", tokenizer_or_processor)
    for token in ("<image>", "<fake_token_around_image>", "<global-img>"):
        _check_token(tokenizer, token)
    settings = SmolVLMVideoSettings.from_model(model)
    data = _checkpoint_preprocessor(model)
    kwargs = {k: v for k, v in data.items() if k in ("do_convert_rgb", "do_rescale", "rescale_factor",
                                                     "do_normalize", "resample", "do_pad")}
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": settings.longest_edge}, max_image_size={"longest_edge": settings.frame_size},
        image_mean=list(settings.mean), image_std=list(settings.std), **kwargs)
    return Idefics3Processor(image_processor, copy.deepcopy(tokenizer),
                             image_seq_len=image_seq_len(model, settings.frame_size))


def _idefics3_inputs(model, tokenizer_or_processor, frames: np.ndarray, prompt: str) -> dict:
    """Idefics3 has no video processor: the frames are a series of images in one user turn, each
    squared without image splitting (as SmolVLM's video processor does), through the real processor."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"expected frames [T, H, W, 3] with T >= 1, got {tuple(frames.shape)}.")
    processor = idefics3_processor(model, tokenizer_or_processor)
    content = [{"type": "image"}] * len(frames) + [{"type": "text", "text": prompt}]
    text = processor.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                   chat_template=IDEFICS3_CHAT_TEMPLATE, add_generation_prompt=True,
                                                   tokenize=False)
    inputs = processor(text=[text], images=[list(frames)], do_image_splitting=False, return_tensors="pt")
    n_image = int((inputs["input_ids"] == model.config.image_token_id).sum())
    if n_image != len(frames) * processor.image_seq_len:
        raise ValueError(f"the prompt holds {n_image} image tokens, expected {len(frames) * processor.image_seq_len}.")
    return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
            "pixel_values": inputs["pixel_values"].to(model.dtype),
            "pixel_attention_mask": inputs["pixel_attention_mask"]}


# ----------------------------------------------------------------------------------- batches
def build_video_batch(model, tokenizer_or_processor, videos: list[np.ndarray], prompts: list[str],
                      timestamps: list[list[float] | None] | None = None,
                      durations: list[float | None] | None = None, pad_token_id: int | None = None) -> dict:
    """Model inputs for a batch of (video, prompt) pairs, for SmolVLM and Idefics3, laid out as their
    processors lay out a batch: ``input_ids`` / ``attention_mask`` left-padded to the longest row
    (what generation needs), ``pixel_values [B, T_max, 3, S, S]`` and
    ``pixel_attention_mask [B, T_max, S, S]`` with all-zero frames (mask 0) after a shorter video.

    Each row is exactly its batch-1 prompt. transformers 5.23's SmolVLM processor differs in two
    ways that do not change what the model computes from the pixels: in a batch it spells the
    *padded* frame count in a shorter video's intro ("four frames" before two frame blocks), and
    its video processor gives padding frames mask 1. The model drops all-zero frames by their
    pixels, so the mask of padding frames is never read.

    Args:
        videos: one uint8 ``[T_b, H_b, W_b, 3]`` array per row (frame counts and sizes may differ).
        prompts: one prompt per row.
        timestamps, durations: per row, as for :func:`build_video_inputs`.
        pad_token_id: id for the padding (default: the tokenizer's pad token, else 0).
    """
    model_type = model.config.model_type
    if model_type not in ("smolvlm", "idefics3"):
        raise ValueError(f"build_video_batch supports SmolVLM and Idefics3, not {type(model).__name__}.")
    if len(videos) != len(prompts) or not videos:
        raise ValueError(f"need one prompt per video, got {len(videos)} videos and {len(prompts)} prompts.")
    timestamps = timestamps or [None] * len(videos)
    durations = durations or [None] * len(videos)
    if len(timestamps) != len(videos) or len(durations) != len(videos):
        raise ValueError("timestamps and durations need one entry per video.")
    rows = [build_video_inputs(model, tokenizer_or_processor, v, p, timestamps=t, duration=d)
            for v, p, t, d in zip(videos, prompts, timestamps, durations)]
    if pad_token_id is None:
        tokenizer = getattr(tokenizer_or_processor, "tokenizer", tokenizer_or_processor)
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(r["input_ids"].shape[1] for r in rows)
    frames = max(r["pixel_values"].shape[1] for r in rows)
    b = len(rows)
    first = rows[0]["pixel_values"]
    if any(r["pixel_values"].shape[2:] != first.shape[2:] for r in rows):
        raise ValueError("the videos' frames were resized to different sizes; they cannot share a batch.")
    input_ids = torch.full((b, width), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((b, width), dtype=torch.long)
    pixel_values = first.new_zeros(b, frames, *first.shape[2:])
    pixel_mask = torch.zeros(b, frames, *first.shape[3:], dtype=torch.long)
    for i, r in enumerate(rows):
        n, t = r["input_ids"].shape[1], r["pixel_values"].shape[1]
        input_ids[i, width - n:] = r["input_ids"][0]
        attention_mask[i, width - n:] = r["attention_mask"][0]
        pixel_values[i, :t] = r["pixel_values"][0]
        pixel_mask[i, :t] = r["pixel_attention_mask"][0]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
            "pixel_attention_mask": pixel_mask}
