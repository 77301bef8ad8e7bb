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

from .video_decode import _decode_selected
from .video_frames import VideoError, _av_errors, _check_resolution, _reason, resize_frames

__all__ = ["DEFAULT_NUM_FRAMES", "VideoError", "VideoFrames", "read_video", "resize_frames"]

#: frames sampled (uniformly over the whole video) when neither ``num_frames`` nor ``fps`` is given
DEFAULT_NUM_FRAMES = 8

#: frame rate assumed for timestamps when the file has neither timestamps nor a frame rate
_FALLBACK_FPS = 25.0

#: FFmpeg decoders that render text files (ANSI art, BinText, XBin, iCEDraw) as pictures; a "video"
#: stream with one of these is a text file, not a video
_TEXT_CODECS = frozenset({"ansi", "bintext", "xbin", "idf"})


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


def _first_pass(av: Any, path: str, max_pixels: int, deadline: float, timeout_s: float, warnings: list[str]):
    """Demux without decoding: ``(frame index, frame count the container reports or None)``."""
    container = _open(av, path)
    try:
        stream = _video_stream(av, container, path)
        _check_resolution(stream.codec_context.width, stream.codec_context.height, max_pixels, path)
        total_frames = int(stream.frames) if stream.frames else None
        try:
            index = _demux_index(container, stream, av, deadline, timeout_s, path, warnings)
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
    return index, total_frames


def _second_pass(av: Any, path: str, index, chosen: list[int], max_pixels: int, deadline: float, timeout_s: float,
                 warnings: list[str], progress):
    """Decode the chosen frames: ``(RGB frames, timestamps)``."""
    container = _open(av, path)
    try:
        stream = _video_stream(av, container, path)
        stream.thread_type = "AUTO"  # decode with frame and slice threads
        try:
            return _decode_selected(container, stream, av, index, chosen, max_pixels, deadline, timeout_s, path,
                                    warnings, progress, clock=lambda: time.monotonic())
        except VideoError:
            raise
        except _av_errors(av) as exc:
            raise VideoError(f"could not decode the video ({_reason(exc)}): {path}") from exc
    finally:
        container.close()


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

    index, total_frames = _first_pass(av, path, max_pixels, deadline, decode_timeout_s, warnings)
    chosen = _select(index, num_frames, fps, max_frames, num_frames is not None, warnings)
    frames, stamps = _second_pass(av, path, index, chosen, max_pixels, deadline, decode_timeout_s, warnings, progress)
    return VideoFrames(
        frames=np.stack(frames),
        timestamps=stamps,
        fps=index.fps,
        duration=index.duration,
        total_frames=total_frames,
        path=path,
        warnings=warnings,
    )
