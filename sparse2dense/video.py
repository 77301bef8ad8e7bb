"""Read video files into RGB frame arrays for Video-LLMs.

:func:`read_video` decodes a video file with PyAV and samples frames from it: a fixed number spread
uniformly over the whole video (``num_frames``), or a fixed rate (``fps``), never more than
``max_frames``. :func:`resize_frames` resizes the result for a model's image size.

Every bad input (missing file, not a video, no video stream, no decodable frame, too high a
resolution, bad arguments) raises :class:`VideoError` with one sentence that names the file. Problems
the reader can work around (a truncated or partly corrupt file, more frames requested than the video
has, a decode that ran out of time) are reported in :attr:`VideoFrames.warnings` instead.

How reading works: a first pass demuxes the video stream without decoding it, which is cheap, and
lists the presentation timestamps of its frames. The frames to keep are chosen from that list, and a
second pass decodes the stream in order and converts only the chosen frames to RGB, so memory stays
bounded by ``max_frames`` frames whatever the length of the video.

PyAV (``pip install av``) is imported only when a video is read, so this module imports without it.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

__all__ = ["DEFAULT_NUM_FRAMES", "VideoError", "VideoFrames", "read_video", "resize_frames"]

#: frames sampled (uniformly over the whole video) when neither ``num_frames`` nor ``fps`` is given
DEFAULT_NUM_FRAMES = 8

#: frame rate assumed for timestamps when the file has neither timestamps nor a frame rate
_FALLBACK_FPS = 25.0

#: FFmpeg decoders that render text files (ANSI art, BinText, XBin, iCEDraw) as pictures; a "video"
#: stream with one of these is a text file, not a video
_TEXT_CODECS = frozenset({"ansi", "bintext", "xbin", "idf"})

#: frames per resize chunk in :func:`resize_frames` (bounds the float32 working memory)
_RESIZE_CHUNK = 16


class VideoError(ValueError):
    """A video file that cannot be read, or arguments that cannot be honoured; the message says which."""


@dataclass
class VideoFrames:
    """Frames sampled from a video file.

    Attributes:
        frames: ``uint8`` array ``[T, H, W, 3]``, RGB, in presentation order.
        timestamps: ``T`` presentation times in seconds, increasing, measured from the first frame
            of the video stream (which is at 0.0).
        fps: the video stream's average frame rate (frames per second) as the file reports it, or
            as measured from its timestamps when it reports none.
        duration: seconds of video that could be read: from the first frame to the end of the last
            one. ``None`` when it cannot be told.
        total_frames: the frame count the container reports in its header, or ``None`` when it
            reports none (WebM, Matroska, MPEG-PS do not). It may differ from the frames actually
            present in a truncated file.
        path: the file that was read.
        warnings: one sentence per problem that was worked around (truncated or corrupt data, fewer
            frames than requested, a decode that timed out); empty for a clean read.
    """

    frames: np.ndarray
    timestamps: list[float]
    fps: float
    duration: float | None
    total_frames: int | None
    path: str
    warnings: list[str] = field(default_factory=list)

    @property
    def num_frames(self) -> int:
        """``T``, the number of frames returned."""
        return int(self.frames.shape[0])


def _import_av() -> Any:
    """The ``av`` module, or :class:`VideoError` saying how to install it."""
    try:
        import av  # optional dependency, imported when used
    except ImportError as exc:
        raise VideoError("reading video needs PyAV: pip install av") from exc
    return av


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


def _check_args(
    num_frames: int | None, fps: float | None, max_frames: int, max_pixels: int, decode_timeout_s: float
) -> None:
    if num_frames is not None and fps is not None:
        raise VideoError("give num_frames or fps, not both")
    if num_frames is not None and (isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1):
        raise VideoError(f"num_frames must be an integer >= 1, got {num_frames!r}")
    if fps is not None and (
        isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0
    ):
        raise VideoError(f"fps must be a finite number > 0, got {fps!r}")
    if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1:
        raise VideoError(f"max_frames must be an integer >= 1, got {max_frames!r}")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise VideoError(f"max_pixels must be an integer >= 1, got {max_pixels!r}")
    if (
        isinstance(decode_timeout_s, bool)
        or not isinstance(decode_timeout_s, (int, float))
        or math.isnan(decode_timeout_s)
        or decode_timeout_s <= 0
    ):
        raise VideoError(f"decode_timeout_s must be a number > 0, got {decode_timeout_s!r}")


def _check_path(path: str | os.PathLike[str]) -> str:
    """``path`` as a string, once it names an existing, non-empty regular file."""
    if not isinstance(path, (str, os.PathLike)):
        raise VideoError(f"video path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not isinstance(path, str):  # a bytes PathLike
        path = os.fsdecode(path)
    if not os.path.exists(path):
        raise VideoError(f"video file not found: {path}")
    if os.path.isdir(path):
        raise VideoError(f"video path is a directory, not a file: {path}")
    if not os.path.isfile(path):
        raise VideoError(f"video path is not a regular file: {path}")
    if os.path.getsize(path) == 0:
        raise VideoError(f"video file is empty (0 bytes): {path}")
    return path


def _open(av: Any, path: str) -> Any:
    """Open ``path`` for reading, or :class:`VideoError` when PyAV cannot."""
    try:
        return av.open(path, mode="r", metadata_errors="ignore")
    except _av_errors(av) as exc:
        raise VideoError(f"not a video file PyAV can open, or a damaged one ({_reason(exc)}): {path}") from exc


def _video_stream(av: Any, container: Any, path: str) -> Any:
    """The first video stream that is a real video (not an embedded cover picture)."""
    streams = list(container.streams.video)
    attached_pic = int(av.stream.Disposition.attached_pic)
    real = [s for s in streams if not int(s.disposition) & attached_pic]
    if not real:
        what = "only a cover picture" if streams else "no video stream"
        kinds = sorted({s.type for s in container.streams}) or ["no streams at all"]
        raise VideoError(f"file has {what} (it holds {', '.join(kinds)}): {path}")
    stream = real[0]
    if stream.codec_context.name in _TEXT_CODECS:
        raise VideoError(
            f"not a video file PyAV can open (FFmpeg reads it as text, with its "
            f"'{container.format.name}' demuxer): {path}"
        )
    return stream


def _check_resolution(width: int, height: int, max_pixels: int, path: str) -> None:
    if width * height > max_pixels:
        raise VideoError(
            f"resolution {width}x{height} exceeds the limit of max_pixels={max_pixels} "
            f"({width * height} pixels per frame): {path}"
        )


def _source_fps(stream: Any) -> Fraction | None:
    """The stream's average frame rate, else FFmpeg's guess, as an exact fraction; None if unknown."""
    for rate in (stream.average_rate, stream.guessed_rate):
        if rate is not None and rate > 0:
            return Fraction(rate)
    return None


@dataclass
class _Index:
    """What the demux pass found: one entry per frame of the video stream, in presentation order.

    ``keys`` are presentation timestamps in ``time_base`` units when every packet has one
    (``by_time``), else frame indices; ``times`` are the matching seconds from the first frame.
    """

    keys: list[int]
    times: np.ndarray
    by_time: bool
    time_base: Fraction
    fps: float
    duration: float


def _demux_index(
    container: Any, stream: Any, av: Any, deadline: float, timeout_s: float, path: str, warnings: list[str]
) -> _Index:
    """First pass: list the video stream's frames from its packets, without decoding them."""
    pts: list[int | None] = []
    packets = container.demux(stream)
    while True:
        if time.monotonic() > deadline:
            if not pts:
                raise VideoError(
                    f"reading the file timed out after decode_timeout_s={timeout_s:g} s before any frame "
                    f"was found: {path}"
                )
            warnings.append(
                f"reading the file timed out after decode_timeout_s={timeout_s:g} s; "
                f"sampling from its first {len(pts)} frames"
            )
            break
        try:
            packet = next(packets)
        except StopIteration:
            break
        except _av_errors(av) as exc:
            warnings.append(
                f"reading stopped after {len(pts)} frames: {_reason(exc)} (truncated or corrupt file?)"
            )
            break
        if packet.size:  # the empty packets at the end only flush the decoder
            pts.append(packet.pts)
    if not pts:
        raise VideoError(f"video stream has no frames: {path}")

    src_fps = _source_fps(stream)
    if all(p is not None for p in pts):
        keys = sorted(set(int(p) for p in pts))  # type: ignore[arg-type]
        base = Fraction(stream.time_base) if stream.time_base is not None else Fraction(1, 90000)
        span = (keys[-1] - keys[0]) * base
        times = np.array([float((k - keys[0]) * base) for k in keys], dtype=np.float64)
        if src_fps is None and len(keys) > 1 and span > 0:
            src_fps = (len(keys) - 1) / span
        frame = 1 / src_fps if src_fps else 0
        return _Index(keys, times, True, base, float(src_fps or 0.0), float(span + frame))

    if src_fps is None:
        warnings.append(f"the video reports neither timestamps nor a frame rate; assuming {_FALLBACK_FPS:g} fps")
    rate = src_fps or Fraction(_FALLBACK_FPS)
    times = np.array([float(i / rate) for i in range(len(pts))], dtype=np.float64)
    return _Index(list(range(len(pts))), times, False, 1 / rate, float(src_fps or 0.0), float(len(pts) / rate))


def _uniform(count: int, n: int) -> list[int]:
    """``n <= count`` distinct indices spread evenly over ``range(count)``, both ends included;
    ``n == 1`` gives the middle index."""
    if n == 1:
        return [(count - 1) // 2]
    return np.linspace(0, count - 1, n).round().astype(np.int64).tolist()


def _select(
    index: _Index, num_frames: int | None, fps: float | None, max_frames: int, explicit: bool, warnings: list[str]
) -> list[int]:
    """Positions in ``index`` of the frames to keep, increasing."""
    count = len(index.keys)
    if fps is not None:
        end = index.duration if index.duration else float(index.times[-1])
        wanted = np.arange(0.0, end, 1.0 / fps) if end > 0 else np.zeros(1)
        # the frame nearest to each wanted time (the earlier one on a tie)
        after = np.clip(np.searchsorted(index.times, wanted), 0, count - 1)
        before = np.clip(after - 1, 0, count - 1)
        use_before = np.abs(wanted - index.times[before]) <= np.abs(index.times[after] - wanted)
        chosen = sorted(set(np.where(use_before, before, after).tolist()))
        if len(chosen) < len(wanted):
            warnings.append(
                f"fps={fps:g} asks for {len(wanted)} frames but the video has only {len(chosen)} distinct "
                f"frames at those times (it runs at {index.fps:g} fps); using {len(chosen)}"
            )
        if len(chosen) > max_frames:
            warnings.append(
                f"fps={fps:g} gives {len(chosen)} frames, more than max_frames={max_frames}; "
                f"sampling {max_frames} of them uniformly"
            )
            chosen = [chosen[i] for i in _uniform(len(chosen), max_frames)]
        return chosen

    n = num_frames if num_frames is not None else DEFAULT_NUM_FRAMES
    if n > count:
        if explicit:
            warnings.append(f"requested {n} frames but the video has only {count}; using {count}")
        n = count
    if n > max_frames:
        if explicit:
            warnings.append(f"num_frames={num_frames} is more than max_frames={max_frames}; using {max_frames}")
        n = max_frames
    return _uniform(count, n)


def _decode_selected(
    container: Any,
    stream: Any,
    av: Any,
    index: _Index,
    chosen: list[int],
    max_pixels: int,
    deadline: float,
    timeout_s: float,
    path: str,
    warnings: list[str],
    progress: Any = None,
) -> tuple[list[np.ndarray], list[float]]:
    """Second pass: decode the stream in order and keep, for each chosen frame, the first decoded
    frame at or after it (the chosen frame itself unless corrupt data dropped it)."""
    targets = [index.keys[i] for i in chosen]
    base_key = index.keys[0]
    frames: list[np.ndarray] = []
    stamps: list[float] = []
    next_target = 0
    decoded = 0  # frames the decoder produced so far
    failures: list[str] = []
    corrupt = 0
    reshaped = False
    timed_out = False

    def take(frame: Any) -> None:
        nonlocal next_target, corrupt, reshaped
        if index.by_time:
            key = frame.pts if frame.pts is not None else index.keys[min(decoded, len(index.keys) - 1)]
        else:
            key = decoded
        if next_target >= len(targets) or key < targets[next_target]:
            return
        while next_target < len(targets) and targets[next_target] <= key:
            next_target += 1
        _check_resolution(frame.width, frame.height, max_pixels, path)
        rgb = frame.to_ndarray(format="rgb24")
        if frames and rgb.shape != frames[0].shape:
            if not reshaped:
                warnings.append(
                    f"the resolution changes inside the video; frames are resized to the first one's "
                    f"{frames[0].shape[1]}x{frames[0].shape[0]}"
                )
                reshaped = True
            rgb = resize_frames(rgb[None], frames[0].shape[0], frames[0].shape[1])[0]
        if getattr(frame, "is_corrupt", False):
            corrupt += 1
        frames.append(rgb)
        if progress is not None:
            progress("decode", len(frames), len(chosen))
        stamps.append(float((key - base_key) * index.time_base))

    def decode(packet: Any) -> None:
        nonlocal decoded
        try:
            for frame in packet.decode() if packet is not None else stream.codec_context.decode(None):
                take(frame)
                decoded += 1
        except _av_errors(av) as exc:
            if isinstance(exc, VideoError):
                raise
            failures.append(_reason(exc))

    packets = container.demux(stream)
    while next_target < len(targets):
        if time.monotonic() > deadline:
            timed_out = True
            break
        try:
            packet = next(packets)
        except StopIteration:
            break
        except _av_errors(av) as exc:
            failures.append(_reason(exc))
            decode(None)  # flush the frames the decoder still holds
            break
        decode(packet)

    if timed_out:
        message = f"decoding timed out after decode_timeout_s={timeout_s:g} s"
        if not frames:
            raise VideoError(f"{message} before any frame was decoded: {path}")
        warnings.append(f"{message}; returning the {len(frames)} frames decoded so far")
    if failures:
        warnings.append(
            f"{len(failures)} packet(s) could not be decoded, the first with: {failures[0]} "
            "(truncated or corrupt file?)"
        )
    if corrupt:
        warnings.append(f"{corrupt} returned frame(s) were decoded from corrupt data and may show artefacts")
    if not frames:
        raise VideoError(f"no frame of the video could be decoded: {path}")
    if len(frames) < len(targets) and not timed_out:
        warnings.append(f"only {len(frames)} of the {len(targets)} sampled frames could be decoded")
    return frames, stamps


def read_video(
    path: str | os.PathLike[str],
    *,
    num_frames: int | None = None,
    fps: float | None = None,
    max_frames: int = 64,
    max_pixels: int = 1920 * 1080 * 4,
    decode_timeout_s: float = 60.0,
    progress: Any = None,
) -> VideoFrames:
    """Decode a video file and sample RGB frames from it.

    Sampling (at most one of ``num_frames`` and ``fps``):

    * ``num_frames=n``: ``n`` frames spread uniformly by index over the whole video, the first and
      the last frame included (``n == 1``: the middle frame).
    * ``fps=r``: the frame nearest to each time ``0, 1/r, 2/r, ...`` before the end of the video,
      so about ``duration * r`` frames; each frame at most once when ``r`` is above the video's
      frame rate.
    * neither: ``DEFAULT_NUM_FRAMES`` (8) frames uniformly, as with ``num_frames=8``.

    Never more than ``max_frames`` frames are returned: a larger selection is sub-sampled
    uniformly, with a warning. When more frames are requested than the video has, all of them are
    returned with a warning rather than an error.

    Args:
        path: the video file (any container and codec the FFmpeg inside PyAV reads: MP4, WebM,
            Matroska, MPEG, AVI, ...).
        num_frames: frames to sample uniformly; at least 1.
        fps: frames per second of video to sample; above 0.
        max_frames: the most frames returned; at least 1.
        max_pixels: the largest ``width * height`` accepted; larger videos are refused before
            anything is decoded (the default allows 4K UHD).
        decode_timeout_s: wall-clock seconds for the whole read; when they run out, the frames
            decoded so far are returned with a warning (:class:`VideoError` if there are none).
        progress: optional callback ``("decode", frames_done, frames_total)`` for a progress bar.

    Returns:
        :class:`VideoFrames` with ``frames`` of shape ``[T, H, W, 3]`` (``uint8``, RGB) and ``T``
        timestamps in seconds.

    Raises:
        VideoError: bad arguments, a missing, empty or unreadable file, a file with no video stream
            or no decodable frame, a resolution above ``max_pixels``, or PyAV not installed.
    """
    _check_args(num_frames, fps, max_frames, max_pixels, decode_timeout_s)
    path = _check_path(path)
    av = _import_av()
    deadline = time.monotonic() + float(decode_timeout_s)
    warnings: list[str] = []

    container = _open(av, path)
    try:
        stream = _video_stream(av, container, path)
        _check_resolution(stream.codec_context.width, stream.codec_context.height, max_pixels, path)
        total_frames = int(stream.frames) if stream.frames else None
        try:
            index = _demux_index(container, stream, av, deadline, decode_timeout_s, path, warnings)
        except VideoError:
            raise
        except _av_errors(av) as exc:
            raise VideoError(f"could not read the video stream ({_reason(exc)}): {path}") from exc
    finally:
        container.close()
    if total_frames is not None and len(index.keys) < total_frames:
        warnings.append(
            f"the container reports {total_frames} frames but only {len(index.keys)} could be read "
            "(truncated file?)"
        )

    chosen = _select(index, num_frames, fps, max_frames, num_frames is not None, warnings)

    container = _open(av, path)
    try:
        stream = _video_stream(av, container, path)
        stream.thread_type = "AUTO"  # decode with frame and slice threads
        try:
            frames, stamps = _decode_selected(
                container, stream, av, index, chosen, max_pixels, deadline, decode_timeout_s, path, warnings,
                progress,
            )
        except VideoError:
            raise
        except _av_errors(av) as exc:
            raise VideoError(f"could not decode the video ({_reason(exc)}): {path}") from exc
    finally:
        container.close()

    return VideoFrames(
        frames=np.stack(frames),
        timestamps=stamps,
        fps=index.fps,
        duration=index.duration,
        total_frames=total_frames,
        path=path,
        warnings=warnings,
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
