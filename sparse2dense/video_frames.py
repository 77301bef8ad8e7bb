"""Video building blocks shared by the reader and its decode pass: the error type, PyAV's error
classes, the resolution limit, and frame resizing."""

from __future__ import annotations

from typing import Any

import numpy as np

#: frames per resize chunk in :func:`resize_frames` (bounds the float32 working memory)
_RESIZE_CHUNK = 16


class VideoError(ValueError):
    """A video file that cannot be read, or arguments that cannot be honoured; the message says which."""


def _av_errors(av: Any) -> tuple[type[BaseException], ...]:
    """Exceptions that PyAV raises for unreadable or corrupt input."""
    errors: list[type[BaseException]] = [av.error.FFmpegError, OSError, ValueError, EOFError]
    legacy = getattr(av, "AVError", None)  # older PyAV releases
    if isinstance(legacy, type) and issubclass(legacy, BaseException):
        errors.append(legacy)
    return tuple(errors)


def _reason(exc: BaseException) -> str:
    """A short reason for an exception: FFmpeg's error text without the errno and path decoration."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return str(text).strip().rstrip(".")


def _check_resolution(width: int, height: int, max_pixels: int, path: str) -> None:
    if width * height > max_pixels:
        raise VideoError(
            f"resolution {width}x{height} exceeds the limit of max_pixels={max_pixels} "
            f"({width * height} pixels per frame): {path}"
        )


def resize_frames(frames: np.ndarray, height: int, width: int, *, mode: str = "bicubic") -> np.ndarray:
    """Resize ``uint8`` frames ``[T, H, W, 3]`` to ``[T, height, width, 3]``.

    Uses ``torch.nn.functional.interpolate`` on float32 (antialiased when shrinking), rounds and
    clamps back to ``uint8``. ``mode`` is ``"bicubic"`` or ``"bilinear"``. Frames already at the
    target size are returned as a copy.
    """
    if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[-1] != 3:
        shape = getattr(frames, "shape", None)
        raise VideoError(f"frames must be a numpy array [T, H, W, 3], got shape {shape}")
    if frames.dtype != np.uint8:
        raise VideoError(f"frames must be uint8, got {frames.dtype}")
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise VideoError(f"{name} must be an integer >= 1, got {value!r}")
    if mode not in ("bicubic", "bilinear"):
        raise VideoError(f"mode must be 'bicubic' or 'bilinear', got {mode!r}")
    if frames.shape[1:3] == (height, width):
        return frames.copy()

    import torch  # imported here: keeps importing this module cheap
    import torch.nn.functional as F

    out = np.empty((frames.shape[0], int(height), int(width), 3), dtype=np.uint8)
    for start in range(0, frames.shape[0], _RESIZE_CHUNK):
        chunk = torch.from_numpy(np.ascontiguousarray(frames[start : start + _RESIZE_CHUNK]))
        x = chunk.permute(0, 3, 1, 2).to(torch.float32)
        y = F.interpolate(x, size=(int(height), int(width)), mode=mode, align_corners=False, antialias=True)
        out[start : start + _RESIZE_CHUNK] = y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out
