"""The second pass of :func:`sparse2dense.video.read_video`: decode the stream in order and keep the
chosen frames only, so memory stays bounded by the frames returned whatever the video's length."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .video_frames import VideoError, _av_errors, _check_resolution, _reason, resize_frames


class _Collector:
    """Keeps, for each chosen frame, the first decoded frame at or after it (the chosen frame itself
    unless corrupt data dropped it), converted to RGB."""

    def __init__(self, index: Any, chosen: list[int], max_pixels: int, path: str, warnings: list[str], progress):
        self.index, self.max_pixels, self.path, self.warnings, self.progress = index, max_pixels, path, warnings, progress
        self.targets = [index.keys[i] for i in chosen]
        self.base_key = index.keys[0]
        self.frames: list[np.ndarray] = []
        self.stamps: list[float] = []
        self.next_target = 0
        self.decoded = 0  # frames the decoder produced so far
        self.corrupt = 0
        self.reshaped = False

    @property
    def wanting(self) -> bool:
        return self.next_target < len(self.targets)

    def take(self, frame: Any) -> None:
        index = self.index
        if index.by_time:
            key = frame.pts if frame.pts is not None else index.keys[min(self.decoded, len(index.keys) - 1)]
        else:
            key = self.decoded
        self.decoded += 1
        if not self.wanting or key < self.targets[self.next_target]:
            return
        while self.wanting and self.targets[self.next_target] <= key:
            self.next_target += 1
        _check_resolution(frame.width, frame.height, self.max_pixels, self.path)
        rgb = frame.to_ndarray(format="rgb24")
        first = self.frames[0] if self.frames else None
        if first is not None and rgb.shape != first.shape:
            if not self.reshaped:
                self.warnings.append(
                    f"the resolution changes inside the video; frames are resized to the first one's "
                    f"{first.shape[1]}x{first.shape[0]}"
                )
                self.reshaped = True
            rgb = resize_frames(rgb[None], first.shape[0], first.shape[1])[0]
        if getattr(frame, "is_corrupt", False):
            self.corrupt += 1
        self.frames.append(rgb)
        if self.progress is not None:
            self.progress("decode", len(self.frames), len(self.targets))
        self.stamps.append(float((key - self.base_key) * index.time_base))


def _decode_selected(container: Any, stream: Any, av: Any, index: Any, chosen: list[int], max_pixels: int,
                     deadline: float, timeout_s: float, path: str, warnings: list[str], progress: Any = None,
                     clock: Callable[[], float] = None) -> tuple[list[np.ndarray], list[float]]:
    """Second pass over the stream (``index``: the first pass's frame index): the chosen frames, RGB,
    and their timestamps in seconds. ``clock``: the reader's monotonic clock (``deadline`` is on it)."""
    got = _Collector(index, chosen, max_pixels, path, warnings, progress)
    failures: list[str] = []

    def decode(packet: Any) -> None:
        try:
            for frame in packet.decode() if packet is not None else stream.codec_context.decode(None):
                got.take(frame)
        except _av_errors(av) as exc:
            if isinstance(exc, VideoError):
                raise
            failures.append(_reason(exc))

    packets = container.demux(stream)
    timed_out = False
    while got.wanting:
        if clock() > deadline:
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
    _warn(got, failures, timed_out, timeout_s, path, warnings)
    return got.frames, got.stamps


def _warn(got: _Collector, failures: list[str], timed_out: bool, timeout_s: float, path: str,
          warnings: list[str]) -> None:
    """What the decode pass worked around, as warnings; ``VideoError`` when nothing was decoded."""
    if timed_out:
        message = f"decoding timed out after decode_timeout_s={timeout_s:g} s"
        if not got.frames:
            raise VideoError(f"{message} before any frame was decoded: {path}")
        warnings.append(f"{message}; returning the {len(got.frames)} frames decoded so far")
    if failures:
        warnings.append(
            f"{len(failures)} packet(s) could not be decoded, the first with: {failures[0]} "
            "(truncated or corrupt file?)"
        )
    if got.corrupt:
        warnings.append(f"{got.corrupt} returned frame(s) were decoded from corrupt data and may show artefacts")
    if not got.frames:
        raise VideoError(f"no frame of the video could be decoded: {path}")
    if len(got.frames) < len(got.targets) and not timed_out:
        warnings.append(f"only {len(got.frames)} of the {len(got.targets)} sampled frames could be decoded")
