"""From a prompt and decoded frames to the keyword arguments a Video-LLM's forward takes.

With torchvision installed, the model's own processor builds the inputs (the reference). Without
it, inputs for Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision and LLaVA-NeXT-Video are built here: frames through
:mod:`sparse2dense.prepare`, text through the chat format with one placeholder token per visual
token.
"""

from __future__ import annotations

import numpy as np
import torch

from .prepare import (
    QwenVideoSettings,
    llava_next_video_pixels,
    llava_onevision_video_pixels,
    qwen_video_pixels,
    torchvision_available,
)

QWEN_OWN_PREP = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
OWN_PREP = QWEN_OWN_PREP + ("llava_onevision", "llava_next_video")


def build_video_inputs(model, tokenizer_or_processor, frames: np.ndarray, prompt: str, fps: float | None = None,
                       timestamps: list[float] | None = None) -> dict:
    """Model inputs (``input_ids``, ``attention_mask``, pixel tensors, grids, ...) for one video + prompt.

    Args:
        frames: uint8 ``[T, H, W, 3]``.
        fps: the rate the frames were sampled at (Qwen2.5-VL uses it for temporal positions).
        timestamps: each frame's time in seconds (Qwen3-VL writes them into the prompt); default:
            frame index / 24, as transformers' processor assumes without metadata.
    """
    model_type = model.config.model_type
    processor = tokenizer_or_processor
    if hasattr(processor, "video_processor") and torchvision_available():
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        kwargs = {"fps": fps} if fps else {}
        inputs = processor(text=[text], videos=[list(frames)], return_tensors="pt", **kwargs)
        return dict(inputs)
    if model_type not in OWN_PREP:
        raise ValueError(
            f"preparing video inputs for {type(model).__name__} needs its transformers processor, which needs "
            "torchvision (pip install torchvision); without it only Qwen2-VL, Qwen2.5-VL, Qwen3-VL, "
            "LLaVA-OneVision and LLaVA-NeXT-Video are prepared by sparse2dense itself."
        )
    tokenizer = getattr(processor, "tokenizer", processor)
    if model_type == "llava_onevision":
        return _llava_onevision_inputs(model, tokenizer, frames, prompt)
    if model_type == "llava_next_video":
        return _llava_next_video_inputs(model, tokenizer, frames, prompt)
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
