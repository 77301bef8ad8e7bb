"""End to end from a real video file: PyAV decoding, sparse2dense's own Qwen2-VL preprocessing (no
torchvision here), a real Qwen2VLForConditionalGeneration saved to disk with a real tokenizer, and the
CLI's --compare check of token-identical output."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "sparse2dense.cli"]

QWEN_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|image_pad|>"]
MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}


def qwen_text(tok) -> dict:
    return dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192, initializer_range=0.2)


def finish(model, tok):
    model = model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def encode_clip(path, frames=12, width=64, height=48):
    import av

    with av.open(str(path), "w") as out:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = out.add_stream(codec, rate=6)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            img = np.zeros((height, width, 3), dtype=np.uint8)
            img[:, : (i + 1) * width // frames] = (200, 40 + 10 * i, 90)  # a bar sweeping right
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def demo_tokenizer_with(names: list[str]):
    """The real SmolLM2 tokenizer (cached by the demo loader) plus the given special tokens and their ids."""
    from transformers import AutoTokenizer

    from sparse2dense.models import cache_dir, load_demo_model

    load_demo_model(log=lambda *a: None)
    tok = AutoTokenizer.from_pretrained(cache_dir() / "smollm2-135m-instruct")
    tok.add_special_tokens({"additional_special_tokens": names})
    return tok, tok.convert_tokens_to_ids(names)


def assert_parity_both_ways(model, inputs, budgets_gammas, max_new_tokens=16):
    """sparse2dense.generate and custom_generate give model.generate's exact tokens."""
    import sparse2dense

    ref = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    for budget, gamma in budgets_gammas:
        out = sparse2dense.generate(model, **inputs, max_new_tokens=max_new_tokens, budget=budget, gamma=gamma)
        assert torch.equal(out.sequences, ref), (budget, gamma)
    budget, gamma = budgets_gammas[0]
    via = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                         custom_generate=sparse2dense.custom_generate, budget=budget, gamma=gamma)
    assert torch.equal(via, ref)
    return out


@pytest.fixture(scope="module")
def tiny_qwen2vl_dir(tmp_path_factory):
    return make_tiny_qwen2vl(tmp_path_factory.mktemp("tiny-qwen2-vl"))


def make_tiny_qwen2vl(folder):
    """A tiny random Qwen2VLForConditionalGeneration with the real SmolLM2 tokenizer, saved in ``folder``."""
    from transformers import AutoTokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from sparse2dense.models import cache_dir, load_demo_model

    load_demo_model(log=lambda *a: None)  # makes sure the SmolLM2 tokenizer is cached locally
    tok = AutoTokenizer.from_pretrained(cache_dir() / "smollm2-135m-instruct")
    tok.add_special_tokens({"additional_special_tokens": ["<|vision_start|>", "<|vision_end|>", "<|video_pad|>",
                                                          "<|image_pad|>"]})
    ids = tok.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|image_pad|>"])
    torch.manual_seed(0)
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                         initializer_range=0.2,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        vision_start_token_id=ids[0], vision_end_token_id=ids[1], video_token_id=ids[2], image_token_id=ids[3],
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 32 * 32, "max_pixels": 64 * 48}))
    return folder


def test_video_to_answer_identical_to_dense(tiny_qwen2vl_dir, tmp_path):
    clip = tmp_path / "clip.mp4"
    encode_clip(clip)
    proc = subprocess.run([*CLI, "generate", "--model", str(tiny_qwen2vl_dir), "--video", str(clip), "--frames", "6",
                           "--prompt", "What moves in this video?", "--max-new-tokens", "16", "--budget", "48",
                           "--gamma", "4", "--compare", "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["identical"] is True
    stats = result["stats"]
    # 6 frames -> 3 temporal patches; 64x48 px -> 16x12 patches of 4 px -> 48 tokens each after the 2x2 merge
    assert stats["n_visual"] == [144]
    assert stats["n_text"][0] + 144 == result["prompt_tokens"]
    assert stats["n_candidates"] == [144] and stats["n_selected"][0] <= 48


def test_video_matches_model_generate_in_python(tiny_qwen2vl_dir, tmp_path):
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    import sparse2dense
    from sparse2dense.video import read_video
    from sparse2dense.video_inputs import build_video_inputs

    clip = tmp_path / "clip.mp4"
    encode_clip(clip, frames=16)
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_qwen2vl_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_qwen2vl_dir)
    video = read_video(clip, num_frames=8)
    inputs = build_video_inputs(model, tok, video.frames, "Describe the video.")
    ref = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    for budget, gamma in ((40, 3), (60, 6), (100_000, 5)):
        out = sparse2dense.generate(model, **inputs, max_new_tokens=20, budget=budget, gamma=gamma)
        assert torch.equal(out.sequences, ref), (budget, gamma)
    via = model.generate(**inputs, max_new_tokens=20, do_sample=False, custom_generate=sparse2dense.custom_generate,
                         budget=40, gamma=4)
    assert torch.equal(via, ref)


@pytest.mark.parametrize("content,fragment", [(None, "not found"), (b"this is not a video", "video")])
def test_bad_video_file_is_one_line(tmp_path, content, fragment):
    path = tmp_path / "bad.mp4"
    if content is not None:
        path.write_bytes(content)
    proc = subprocess.run([*CLI, "generate", "--model", "smollm2-135m", "--video", str(path), "--prompt", "hi"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and fragment in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def tiny_onevision_dir(tmp_path_factory):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    tok, (image_id, video_id) = demo_tokenizer_with(["<image>", "<video>"])
    torch.manual_seed(0)
    cfg = LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=8192, initializer_range=0.2),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=4),
        image_token_index=image_id, video_token_index=video_id, vision_feature_layer=-1,
        image_grid_pinpoints=[[32, 32], [32, 64], [64, 32]])
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    folder = tmp_path_factory.mktemp("tiny-llava-onevision")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_onevision_video_pipeline_matches_generate(tiny_onevision_dir, tmp_path):
    from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration

    import sparse2dense
    from sparse2dense.video import read_video
    from sparse2dense.video_inputs import build_video_inputs

    clip = tmp_path / "clip.mp4"
    encode_clip(clip, frames=16)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_onevision_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_onevision_dir)
    inputs = build_video_inputs(model, tok, read_video(clip, num_frames=6).frames, "What moves?")
    n_video = int((inputs["input_ids"] == model.config.video_token_index).sum())
    assert n_video == 6 * 4 * 4 + 1  # 32 px / 4 px patches = 8x8 -> pooled 4x4 per frame, + newline
    ref = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    for budget, gamma in ((48, 4), (100_000, 6)):
        out = sparse2dense.generate(model, **inputs, max_new_tokens=16, budget=budget, gamma=gamma)
        assert torch.equal(out.sequences, ref), (budget, gamma)
        assert out.stats.n_visual == [n_video]
    via = model.generate(**inputs, max_new_tokens=16, do_sample=False, custom_generate=sparse2dense.custom_generate,
                         budget=48, gamma=4)
    assert torch.equal(via, ref)


def test_onevision_cli_compare(tiny_onevision_dir, tmp_path):
    clip = tmp_path / "clip.webm"
    import av

    codec = "libvpx" if "libvpx" in av.codecs_available else None
    if codec is None:
        pytest.skip("no VP8 encoder in this PyAV build")
    with av.open(str(clip), "w") as out:
        stream = out.add_stream(codec, rate=5)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        for i in range(10):
            img = np.full((32, 48, 3), 20 * i, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    proc = subprocess.run([*CLI, "generate", "--model", str(tiny_onevision_dir), "--video", str(clip), "--fps", "2",
                           "--prompt", "Describe.", "--max-new-tokens", "12", "--budget", "40", "--gamma", "4",
                           "--compare", "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["identical"] is True and result["stats"]["n_visual"][0] > 0


def test_next_video_pipeline_matches_generate(tmp_path):
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    from sparse2dense.video import read_video
    from sparse2dense.video_inputs import build_video_inputs

    tok, (image_id, video_id) = demo_tokenizer_with(["<image>", "<video>"])
    torch.manual_seed(0)
    cfg = LlavaNextVideoConfig(
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=8192, initializer_range=0.2),
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=4, projection_dim=32),
        image_token_index=image_id, video_token_index=video_id, vision_feature_layer=-1,
        image_grid_pinpoints=[[32, 32], [32, 64], [64, 32]])
    model = finish(LlavaNextVideoForConditionalGeneration(cfg), tok)
    clip = tmp_path / "clip.mp4"
    encode_clip(clip, frames=12, width=64, height=48)  # 4:3, so the shortest-edge resize and crop both act
    inputs = build_video_inputs(model, tok, read_video(clip, num_frames=4).frames, "What moves?")
    assert inputs["pixel_values_videos"].shape == (1, 4, 3, 32, 32)
    n_video = int((inputs["input_ids"] == video_id).sum())
    assert n_video == 4 * (8 * 8 // 4)
    assert_parity_both_ways(model, inputs, [(40, 4), (100_000, 6)])


def test_qwen3_vl_video_pipeline_matches_generate(tmp_path):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from sparse2dense.video import read_video
    from sparse2dense.video_inputs import build_video_inputs

    tok, (v_start, v_end, vid, img) = demo_tokenizer_with(QWEN_TOKENS)
    torch.manual_seed(0)
    cfg = Qwen3VLConfig(
        text_config=dict(qwen_text(tok), head_dim=16,
                         rope_parameters={**MROPE, "mrope_interleaved": True}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3, out_hidden_size=64,
                           num_position_embeddings=16, deepstack_visual_indexes=[0]),
        image_token_id=img, video_token_id=vid, vision_start_token_id=v_start, vision_end_token_id=v_end)
    model = finish(Qwen3VLForConditionalGeneration(cfg), tok)
    clip = tmp_path / "clip.mp4"
    encode_clip(clip, frames=12)
    video = read_video(clip, num_frames=4)
    inputs = build_video_inputs(model, tok, video.frames, "What moves?", timestamps=video.timestamps)
    assert tok.decode(inputs["input_ids"][0]).count(" seconds>") == 2  # 4 frames -> 2 temporal patches
    out = assert_parity_both_ways(model, inputs, [(60, 4), (100_000, 6)])
    assert out.stats.n_visual == [int((inputs["input_ids"] == vid).sum())]


def test_qwen2_5_vl_video_pipeline_matches_generate(tmp_path):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from sparse2dense.video import read_video
    from sparse2dense.video_inputs import build_video_inputs

    tok, (v_start, v_end, vid, img) = demo_tokenizer_with(QWEN_TOKENS)
    torch.manual_seed(0)
    cfg = Qwen2_5_VLConfig(
        text_config=dict(qwen_text(tok), rope_parameters=MROPE),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3, out_hidden_size=64,
                           window_size=16, fullatt_block_indexes=[0]),
        image_token_id=img, video_token_id=vid, vision_start_token_id=v_start, vision_end_token_id=v_end)
    model = finish(Qwen2_5_VLForConditionalGeneration(cfg), tok)
    clip = tmp_path / "clip.mp4"
    encode_clip(clip, frames=12)
    video = read_video(clip, fps=2.0)
    inputs = build_video_inputs(model, tok, video.frames, "What moves?", fps=2.0)
    assert inputs["second_per_grid_ts"].tolist() == [1.0]  # 2 frames per temporal patch at 2 fps
    assert_parity_both_ways(model, inputs, [(50, 4), (100_000, 6)])
