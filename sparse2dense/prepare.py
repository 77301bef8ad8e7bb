"""Model inputs from decoded video frames.

Where transformers' own processor can be imported (it needs torchvision), use it: it is the
reference. Without torchvision, this module prepares the inputs of the Qwen2-VL family itself,
following the steps of transformers' ``Qwen2VLVideoProcessor``: resize to a multiple of
``patch_size * merge_size`` within a pixel budget (bicubic, antialiased), rescale and normalize with
the CLIP mean and std, pad the frame count to a multiple of ``temporal_patch_size``, and flatten
into patches in the order the vision tower expects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _frames_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` frames as a float tensor ``[T, 3, H, W]`` (values 0..255)."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"expected frames [T, H, W, 3] with T >= 1, got {tuple(frames.shape)}.")
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()


def _resize(video: torch.Tensor, height: int, width: int, mode: str = "bicubic") -> torch.Tensor:
    """Antialiased resize of ``[T, 3, H, W]`` frames (float, whole values 0..255) to ``[T, 3, height, width]``.

    The frames are resized as uint8, with torch's uint8 kernels, exactly as transformers' torchvision
    video processors resize uint8 frames on the CPU (torchvision hands uint8 straight to
    ``interpolate`` for bicubic and Lanczos). Resizing in float and rounding at the end differs from
    that by up to a few levels, because the uint8 kernels round and clip between their horizontal
    and vertical passes. ``mode`` is ``"bicubic"`` or ``"lanczos"``; where this torch has no Lanczos
    kernel, each frame goes through PIL's ``LANCZOS`` instead (what the PIL image processors use).
    """
    if tuple(video.shape[-2:]) == (height, width):
        return video
    frames = video.round().clamp(0, 255).to(torch.uint8).contiguous()
    try:
        out = F.interpolate(frames, size=(height, width), mode=mode, antialias=True, align_corners=False)
    except (ValueError, NotImplementedError, RuntimeError):
        if mode != "lanczos":
            raise
        return _pil_resize(frames, height, width, mode)
    return out.float()


def _pil_resize(frames: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    """PIL resize (``mode``: ``"bicubic"``, ``"bilinear"`` or ``"lanczos"``) of uint8 ``[T, 3, H, W]``,
    as transformers' PIL image processors resize; returns float ``[T, 3, height, width]``."""
    from PIL import Image

    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS}[mode]
    out = [np.asarray(Image.fromarray(f.permute(1, 2, 0).numpy()).resize((width, height), resample))
           for f in frames]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float()


def _normalize(video: torch.Tensor, mean, std) -> torch.Tensor:
    """Rescale by 1/255 and normalize, fused as transformers' processors do."""
    return (video - torch.tensor(mean).view(1, 3, 1, 1) * 255.0) / (torch.tensor(std).view(1, 3, 1, 1) * 255.0)


def _checkpoint_preprocessor(model) -> dict:
    """The checkpoint's video (or general) preprocessor config, or {} when it has none."""
    import json
    from pathlib import Path

    folder = Path(str(getattr(model, "name_or_path", "") or ""))
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        if (folder / name).is_file():
            return json.loads((folder / name).read_text())
    return {}


@dataclass(slots=True)
class QwenVideoSettings:
    """Preprocessing constants of Qwen2-VL / Qwen2.5-VL (their processors' defaults)."""

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 768 * 28 * 28
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    #: Qwen3-VL: the pixel range applies to all frames together, not to each frame
    budget_over_frames: bool = False

    @classmethod
    def from_model(cls, model) -> "QwenVideoSettings":
        """Patch sizes from the model config; pixel budget, mean and std from the checkpoint's
        ``video_preprocessor_config.json`` / ``preprocessor_config.json`` when it has one."""
        vision = model.config.vision_config
        settings = cls(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                       temporal_patch_size=vision.temporal_patch_size)
        if model.config.model_type == "qwen3_vl":
            settings.min_pixels, settings.max_pixels = 128 * 32 * 32, 32 * 32 * 768
            settings.mean = settings.std = (0.5, 0.5, 0.5)
            settings.budget_over_frames = True
        data = _checkpoint_preprocessor(model)
        if data:
            size = data.get("size") or {}
            settings.min_pixels = int(data.get("min_pixels") or size.get("shortest_edge") or settings.min_pixels)
            settings.max_pixels = int(data.get("max_pixels") or size.get("longest_edge") or settings.max_pixels)
            settings.mean = tuple(data.get("image_mean") or settings.mean)
            settings.std = tuple(data.get("image_std") or settings.std)
        return settings


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Height and width that are multiples of ``factor``, keep the aspect ratio, and fit the pixel range."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} is too extreme (max 200).")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def smart_resize_frames(num_frames: int, height: int, width: int, temporal_factor: int, factor: int,
                        min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen3-VL's variant of :func:`smart_resize`: the pixel range covers all frames together."""
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} is too extreme (max 200).")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def qwen_video_pixels(frames: np.ndarray, settings: QwenVideoSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened patches and grid for one video.

    Args:
        frames: uint8 ``[T, H, W, 3]`` RGB frames.

    Returns:
        ``(pixel_values_videos [grid_t * grid_h * grid_w, 3 * temporal_patch * patch * patch],
        video_grid_thw [1, 3])``.
    """
    s = settings
    video = _frames_tensor(frames)
    height, width = video.shape[-2:]
    if s.budget_over_frames:
        rh, rw = smart_resize_frames(max(video.shape[0], s.temporal_patch_size), height, width, s.temporal_patch_size,
                                     s.patch_size * s.merge_size, s.min_pixels, s.max_pixels)
    else:
        rh, rw = smart_resize(height, width, s.patch_size * s.merge_size, s.min_pixels, s.max_pixels)
    video = _normalize(_resize(video, rh, rw), s.mean, s.std)
    if pad := -video.shape[0] % s.temporal_patch_size:
        video = torch.cat([video, video[-1:].expand(pad, -1, -1, -1)], dim=0)
    t = video.shape[0]
    gt, gh, gw = t // s.temporal_patch_size, rh // s.patch_size, rw // s.patch_size
    patches = video.view(gt, s.temporal_patch_size, 3, gh // s.merge_size, s.merge_size, s.patch_size,
                         gw // s.merge_size, s.merge_size, s.patch_size)
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    flat = patches.reshape(gt * gh * gw, 3 * s.temporal_patch_size * s.patch_size * s.patch_size)
    return flat.contiguous(), torch.tensor([[gt, gh, gw]])


def torchvision_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is not None


def llava_onevision_video_pixels(frames: np.ndarray, model) -> tuple[torch.Tensor, int]:
    """Pixel values and placeholder count for LLaVA-OneVision, as its video processor builds them.

    Each frame is resized to the vision tower's square input (bicubic, antialiased), rescaled by
    1/255 and normalized (CLIP mean/std unless the checkpoint says otherwise).

    Returns:
        ``(pixel_values_videos [1, T, 3, S, S], n_video_tokens)`` where ``n_video_tokens`` is
        ``T * ceil(p / 2) ** 2 + 1`` for ``p = image_size // patch_size`` (2x2 pooling plus one
        newline token).
    """
    vision = model.config.vision_config
    pre = _checkpoint_preprocessor(model)
    size = vision.image_size
    video = _resize(_frames_tensor(frames), size, size)
    video = _normalize(video, pre.get("image_mean") or CLIP_MEAN, pre.get("image_std") or CLIP_STD)
    p = size // vision.patch_size
    n_tokens = video.shape[0] * math.ceil(p / 2) ** 2 + 1
    return video.unsqueeze(0).contiguous(), n_tokens


def llava_next_video_pixels(frames: np.ndarray, model) -> tuple[torch.Tensor, int]:
    """Pixel values and placeholder count for LLaVA-NeXT-Video, as its video processor builds them.

    Each frame's shortest edge is resized to the target size (bicubic, antialiased, aspect kept),
    then center-cropped to a square, rescaled by 1/255 and CLIP-normalized. Sizes come from the
    checkpoint's preprocessor config when it has one, else from the vision tower's input size.

    Returns:
        ``(pixel_values_videos [1, T, 3, C, C], n_video_tokens)`` with
        ``n_video_tokens = T * (C // patch) ** 2 // 4`` (2x2 average pooling per frame).
    """
    vision = model.config.vision_config
    pre = _checkpoint_preprocessor(model)
    short = (pre.get("size") or {}).get("shortest_edge") or vision.image_size
    crop = (pre.get("crop_size") or {}).get("height") or vision.image_size
    video = _frames_tensor(frames)
    h, w = video.shape[-2:]
    # transformers' shortest-edge rule, with its exact arithmetic: long side = int(short * long / short_side)
    if w <= h:
        video = _resize(video, int(short * h / w), short)
    else:
        video = _resize(video, short, int(short * w / h))
    h, w = video.shape[-2:]
    top, left = (h - crop) // 2, (w - crop) // 2
    if top < 0 or left < 0:
        raise ValueError(f"frames of {w}x{h} are smaller than the {crop}x{crop} crop.")
    video = video[..., top : top + crop, left : left + crop]
    video = _normalize(video, pre.get("image_mean") or CLIP_MEAN, pre.get("image_std") or CLIP_STD)
    n_tokens = video.shape[0] * ((crop // vision.patch_size) ** 2 // 4)
    return video.unsqueeze(0).contiguous(), n_tokens


#: SmolVLM / Idefics3 processors' upper bound on any frame side (``MAX_IMAGE_SIZE`` in transformers)
SMOLVLM_MAX_IMAGE_SIZE = 4096
#: PIL resampling codes (as checkpoints store ``resample``) -> torch interpolation modes
_RESAMPLE_MODES = {1: "lanczos", 2: "bilinear", 3: "bicubic"}


@dataclass(slots=True)
class SmolVLMVideoSettings:
    """Preprocessing constants of SmolVLM's video processor (and of Idefics3's image processor
    without image splitting, which does the same per frame).

    Attributes:
        longest_edge: the first resize brings the longest side of each frame to this (aspect kept,
            the other side rounded up to even).
        frame_size: the second resize makes every frame ``frame_size x frame_size``
            (``max_image_size["longest_edge"]``); the vision tower sees these squares.
        mode: resampling kernel of both resizes (checkpoints say LANCZOS).
    """

    longest_edge: int = 4 * 364
    frame_size: int = 364
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    mode: str = "lanczos"

    @classmethod
    def from_model(cls, model) -> "SmolVLMVideoSettings":
        """Sizes from the checkpoint's ``video_preprocessor_config.json`` / ``preprocessor_config.json``
        with the video processor's precedence (``size``, else ``video_sampling.video_size``). Without
        a config the frames are squared to the vision tower's ``image_size``, and the first resize
        goes to 4x that (the ratio of the processor's defaults, 1456 = 4 x 364)."""
        image_size = int(model.config.vision_config.image_size)
        settings = cls(longest_edge=4 * image_size, frame_size=image_size)
        data = _checkpoint_preprocessor(model)
        size = data.get("size") or (data.get("video_sampling") or {}).get("video_size") or {}
        if size.get("longest_edge"):
            settings.longest_edge = int(size["longest_edge"])
        if (data.get("max_image_size") or {}).get("longest_edge"):
            settings.frame_size = int(data["max_image_size"]["longest_edge"])
        settings.mean = tuple(data.get("image_mean") or settings.mean)
        settings.std = tuple(data.get("image_std") or settings.std)
        resample = data.get("resample", 1)
        if resample not in _RESAMPLE_MODES:
            raise ValueError(f"the checkpoint's resample={resample!r} is not LANCZOS (1), BILINEAR (2) or BICUBIC (3).")
        settings.mode = _RESAMPLE_MODES[resample]
        return settings


def smolvlm_longest_edge_size(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """``(height, width)`` after SmolVLM's first resize: the longest side becomes ``longest_edge``
    (at most 4096), the other keeps the aspect ratio, truncated, then rounded up to even."""
    longest = min(SMOLVLM_MAX_IMAGE_SIZE, longest_edge)
    aspect = width / height
    if width >= height:
        width = longest
        height = int(width / aspect)
        height += height % 2
    else:
        height = longest
        width = int(height * aspect)
        width += width % 2
    return max(height, 1), max(width, 1)


def smolvlm_video_pixels(frames: np.ndarray, settings: SmolVLMVideoSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel values and pixel mask of one video for SmolVLM, as ``SmolVLMVideoProcessor`` builds them.

    Each frame is resized twice, as uint8 (torch's Lanczos kernel, the one torchvision uses on the
    CPU): longest side to ``settings.longest_edge``, then to a ``frame_size`` square; then rescaled
    by 1/255 and normalized. All frames of a video are the same size, so nothing is padded and the
    mask is all ones (:func:`sparse2dense.video_inputs.build_video_batch` pads across videos).

    Args:
        frames: uint8 ``[T, H, W, 3]``.

    Returns:
        ``(pixel_values [1, T, 3, S, S] float32, pixel_attention_mask [1, T, S, S] int64)`` with
        ``S = settings.frame_size``.
    """
    video = _frames_tensor(frames)
    h, w = smolvlm_longest_edge_size(*video.shape[-2:], settings.longest_edge)
    video = _resize(video, h, w, settings.mode)
    video = _resize(video, settings.frame_size, settings.frame_size, settings.mode)
    video = _normalize(video, settings.mean, settings.std)
    mask = torch.ones(1, *video.shape[:1], *video.shape[-2:], dtype=torch.long)
    return video.unsqueeze(0).contiguous(), mask
