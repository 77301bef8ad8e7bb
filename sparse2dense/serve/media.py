"""Media in chat messages: ``image_url`` and ``video_url`` content parts, read safely.

A URL is one of:

* ``data:<mime>;base64,<data>``: decoded in memory (video through a temporary file for PyAV);
* a local path or ``file://`` URL: read only when it resolves (symlinks followed) inside
  ``--allowed-media-dir``; refused otherwise, and always without that flag;
* ``http(s)://``: refused unless ``--allow-remote-media``; then fetched with a size limit.

Videos are decoded by :func:`sparse2dense.video.read_video` (PyAV), images by PIL; a file that is
not a video or image, a corrupt one, or one above the frame or resolution limits is a 400.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np

from .config import ServeConfig
from .errors import bad


def _data_url(url: str, param: str) -> bytes:
    head, _, data = url.partition(",")
    if not data or ";base64" not in head:
        raise bad("a data URL must be base64: data:<type>;base64,<data>", param)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad("the data URL's base64 payload is not valid base64", param) from None


def _local(url: str, cfg: ServeConfig, param: str) -> Path:
    if cfg.allowed_media_dir is None:
        raise bad("local media files are refused: start the server with --allowed-media-dir", param)
    raw = unquote(urlparse(url).path) if url.startswith("file://") else url
    path = Path(raw).expanduser()
    if not path.is_absolute():
        path = cfg.allowed_media_dir / path
    path = path.resolve()
    if cfg.allowed_media_dir not in (path, *path.parents):
        raise bad(f"{raw} is outside the allowed media folder", param)
    if not path.is_file():
        raise bad(f"no such media file: {raw}", param)
    return path


def _remote(url: str, cfg: ServeConfig, param: str) -> bytes:
    if not cfg.allow_remote_media:
        raise bad("remote media URLs are refused: start the server with --allow-remote-media", param)
    import httpx

    limit = int(cfg.max_body_mb * 2**20)
    try:
        with httpx.stream("GET", url, timeout=30.0, follow_redirects=True) as response:
            response.raise_for_status()
            data = bytearray()
            for chunk in response.iter_bytes():
                data += chunk
                if len(data) > limit:
                    raise bad(f"the media at {url} is larger than {cfg.max_body_mb:g} MB", param)
            return bytes(data)
    except httpx.HTTPError as exc:
        raise bad(f"could not fetch {url}: {exc}", param) from None


def fetch(url, cfg: ServeConfig, param: str) -> bytes | Path:
    """The media's bytes (data and remote URLs) or its local path."""
    if not isinstance(url, str) or not url:
        raise bad("a media URL must be a non-empty string", param)
    if url.startswith("data:"):
        return _data_url(url, param)
    if url.startswith(("http://", "https://")):
        return _remote(url, cfg, param)
    return _local(url, cfg, param)


def read_video_part(source: bytes | Path, cfg: ServeConfig, param: str, fps: float | None = None,
                    max_frames: int | None = None):
    """Frames of a video: :class:`~sparse2dense.video.VideoFrames`."""
    from ..video import VideoError, read_video

    frames = min(max_frames or cfg.max_frames, cfg.max_frames)
    kwargs = dict(fps=fps, max_frames=frames, max_pixels=cfg.max_pixels, decode_timeout_s=60.0)
    if fps is None:
        kwargs["num_frames"] = frames
    path, temporary = (source, False) if isinstance(source, Path) else (None, True)
    try:
        if temporary:
            with tempfile.NamedTemporaryFile(suffix=".video", delete=False) as f:
                f.write(source)
            path = Path(f.name)
        return read_video(path, **kwargs)
    except VideoError as exc:
        message = str(exc).replace(str(path), "the video") if temporary else str(exc)
        raise bad(f"the video could not be read: {message}", param) from None
    finally:
        if temporary and path is not None:
            os.unlink(path)


def read_image_part(source: bytes | Path, cfg: ServeConfig, param: str) -> np.ndarray:
    """An image as one RGB frame: uint8 ``[1, H, W, 3]``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as img:
            if img.width * img.height > cfg.max_pixels:
                raise bad(f"the image is {img.width}x{img.height}, above the server's limit of "
                          f"{cfg.max_pixels} pixels", param)
            rgb = np.array(img.convert("RGB"))  # a writable copy
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise bad(f"the image could not be read: {exc}", param) from None
    return rgb[None]
