"""SmolVLM and Idefics3 video end to end: PyAV decoding, sparse2dense's own input preparation (no
torchvision here), tiny fp32 models built in code, and token-identical output to greedy
``model.generate`` through ``sparse2dense.generate`` and ``custom_generate``, at batch 1 and 2, and
through the CLI's ``generate --video --compare``.

The checks that the parity tests are not vacuous: the prompt layout is compared with the exact text
SmolVLM's processor writes; the generated tokens depend on the frames (other frames, other tokens);
the drafter kept only part of the prompt and was sometimes right and sometimes wrong.
"""

from __future__ import annotations

import json
import re
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import sparse2dense
from sparse2dense.video import read_video
from sparse2dense.video_inputs import build_video_batch, build_video_inputs
from test_cli_video import CLI, demo_tokenizer_with, encode_clip

pytestmark = pytest.mark.slow  # the tokenizer is the real SmolLM2 one (cached by the demo loader)
torch.set_num_threads(1)

SMOLVLM_TOKENS = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"]
#: 32 px frames / 4 px patches = 8x8 patches -> 16 tokens after the 2x2 pixel shuffle
TOKENS_PER_FRAME = 16
MAX_NEW = 20
QK_SCALE = 6.0  # as in test_parity_vision: peaky attention, so dropped visual tokens change some drafts


def _build(family: str, tok, image_id: int):
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
    )

    config_cls, model_cls = {"smolvlm": (SmolVLMConfig, SmolVLMForConditionalGeneration),
                             "idefics3": (Idefics3Config, Idefics3ForConditionalGeneration)}[family]
    torch.manual_seed(0)
    cfg = config_cls(
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=8192),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=4),
        image_token_id=image_id, scale_factor=2)
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "vision" not in name and name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(QK_SCALE)
    model.generation_config.eos_token_id = None  # every row runs MAX_NEW tokens
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


@pytest.fixture(scope="module")
def tok_and_ids():
    return demo_tokenizer_with(SMOLVLM_TOKENS)


@pytest.fixture(scope="module", params=["smolvlm", "idefics3"])
def model_tok(request, tok_and_ids):
    tok, ids = tok_and_ids
    return request.param, _build(request.param, tok, ids[1]), tok


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Two real clips: 12 frames of 64x48 at 6 fps, and 10 frames of 48x64 (portrait) at 5 fps."""
    folder = tmp_path_factory.mktemp("clips")
    encode_clip(folder / "a.mp4", frames=12, width=64, height=48)
    encode_clip(folder / "b.mp4", frames=10, width=48, height=64)
    return folder / "a.mp4", folder / "b.mp4"


def _visual(inputs, model) -> list[int]:
    return (inputs["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()


def assert_parity(model, inputs, budgets_gammas) -> list[float]:
    """sparse2dense.generate (each budget, gamma) and custom_generate give greedy generate's exact
    tokens; the sparse budgets really dropped visual tokens. Returns the acceptance rates."""
    ref = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    lens = inputs["attention_mask"].sum(dim=1).tolist()
    rates = []
    for budget, gamma in budgets_gammas:
        out = sparse2dense.generate(model, **inputs, max_new_tokens=MAX_NEW, budget=budget, gamma=gamma)
        assert torch.equal(out.sequences, ref), (budget, gamma, out.sequences[:, -MAX_NEW:], ref[:, -MAX_NEW:])
        assert out.stats.n_visual == _visual(inputs, model)
        if budget < min(lens):
            assert all(sel < n for sel, n in zip(out.stats.n_selected, lens)), (out.stats.n_selected, lens)
        rates.append(out.stats.acceptance_rate)
    budget, gamma = budgets_gammas[0]
    via = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False,
                         custom_generate=sparse2dense.custom_generate, budget=budget, gamma=gamma)
    assert torch.equal(via, ref)
    return rates


def assert_frames_matter(model, inputs):
    """Other frames give other tokens: parity on these inputs says something about the visual path."""
    ref = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    flipped = dict(inputs, pixel_values=inputs["pixel_values"].flip(-1))  # mirror every frame
    assert not torch.equal(model.generate(**flipped, max_new_tokens=MAX_NEW, do_sample=False), ref)


def expected_smolvlm_text(prompt: str, stamps: list[float], duration: float, frame_count_words: str) -> str:
    """SmolVLM's video prompt written out by hand from its processor's format strings."""
    image = "<fake_token_around_image><global-img>" + "<image>" * TOKENS_PER_FRAME + "<fake_token_around_image>"
    minutes, seconds = divmod(int(duration), 60)
    text = (f"<|im_start|>User: You are provided the following series of {frame_count_words} frames from a "
            f"0:{minutes:02d}:{seconds:02d} [H:MM:SS] video.\n")
    for t in stamps:
        text += f"\nFrame from {int(t) // 60:02d}:{int(t) % 60:02d}:{image}"
    return text + f"\n\n{prompt}<end_of_utterance>\nAssistant:"


# ----------------------------------------------------------------------------------- batch 1
def test_prompt_layout(model_tok, clips):
    family, model, tok = model_tok
    video = read_video(clips[0], fps=3.0)  # 0, 1/3, ... 11/6 s: frames 00:00 and 00:01
    assert len(video.frames) == 6 and video.duration == pytest.approx(2.0)
    inputs = build_video_inputs(model, tok, video.frames, "What moves?", timestamps=video.timestamps,
                                duration=video.duration)
    text = tok.decode(inputs["input_ids"][0])
    frame = "<fake_token_around_image><global-img>" + "<image>" * TOKENS_PER_FRAME + "<fake_token_around_image>"
    if family == "smolvlm":
        assert text == expected_smolvlm_text("What moves?", video.timestamps, video.duration, "six")
        assert text.count("Frame from 00:01:") == 3
    else:  # Idefics3: the frames as images in one user turn, no splitting
        assert text == "<|begin_of_text|>User:" + frame * 6 + "What moves?<end_of_utterance>\nAssistant:"
    assert _visual(inputs, model) == [6 * TOKENS_PER_FRAME]
    assert inputs["pixel_values"].shape == (1, 6, 3, 32, 32) and inputs["pixel_values"].dtype == torch.float32
    assert inputs["pixel_attention_mask"].shape == (1, 6, 32, 32) and bool(inputs["pixel_attention_mask"].all())
    pixels = inputs["pixel_values"][0]
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0  # mean = std = 0.5
    assert len({p.numpy().tobytes() for p in pixels}) == 6  # the bar moves: every frame differs


def test_batch1_parity(model_tok, clips):
    family, model, tok = model_tok
    video = read_video(clips[0], num_frames=6)
    inputs = build_video_inputs(model, tok, video.frames, "Describe the video.", timestamps=video.timestamps,
                                duration=video.duration)
    n_text = int(inputs["input_ids"].shape[1]) - 6 * TOKENS_PER_FRAME
    rates = assert_parity(model, inputs, [(n_text + 12, 4), (n_text + 80, 6), (100_000, 5)])
    assert any(0.2 < r < 1.0 for r in rates), rates  # drafts often accepted, often rejected
    assert_frames_matter(model, inputs)


# ----------------------------------------------------------------------------------- batch 2
def test_batch2_parity(model_tok, clips):
    """Two rows with different frame counts, frame sizes and prompts, left-padded, as the processor
    batches them: the shorter video's missing frames are all-zero with pixel mask 0."""
    family, model, tok = model_tok
    a, b = read_video(clips[0], num_frames=6), read_video(clips[1], num_frames=3)
    batch = build_video_batch(model, tok, [b.frames, a.frames], ["What moves?", "Describe the video in detail."],
                              timestamps=[b.timestamps, a.timestamps], durations=[b.duration, a.duration])
    assert batch["pixel_values"].shape == (2, 6, 3, 32, 32)
    assert batch["pixel_attention_mask"][0].sum(dim=(1, 2)).tolist() == [1024] * 3 + [0] * 3
    assert bool(batch["pixel_attention_mask"][1].all())
    assert not batch["pixel_values"][0, 3:].any() and batch["pixel_values"][0, :3].any()
    assert batch["attention_mask"][0, 0] == 0 and bool(batch["attention_mask"][1].all())  # row 0 left-padded
    assert _visual(batch, model) == [3 * TOKENS_PER_FRAME, 6 * TOKENS_PER_FRAME]
    # each row is the batch-1 prompt of its video, left-padded
    single = build_video_inputs(model, tok, b.frames, "What moves?", timestamps=b.timestamps, duration=b.duration)
    n = single["input_ids"].shape[1]
    assert torch.equal(batch["input_ids"][0, -n:], single["input_ids"][0])
    assert torch.equal(batch["pixel_values"][0, :3], single["pixel_values"][0])
    n_text = max((m.sum() - v).item() for m, v in zip(batch["attention_mask"], _visual(batch, model)))
    # SmolVLM's video processor marks padding frames 1 (see test_processor_equality); same tokens
    ones = dict(batch, pixel_attention_mask=torch.ones_like(batch["pixel_attention_mask"]))
    assert torch.equal(model.generate(**ones, max_new_tokens=MAX_NEW, do_sample=False),
                       model.generate(**batch, max_new_tokens=MAX_NEW, do_sample=False))
    rates = assert_parity(model, batch, [(n_text + 10, 4), (n_text + 60, 5), (100_000, 6)])
    assert any(0.2 < r < 1.0 for r in rates), rates
    assert_frames_matter(model, batch)


# ----------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def tiny_smolvlm_dir(tmp_path_factory, tok_and_ids):
    """A tiny SmolVLM saved with its tokenizer and a preprocessor config (frames: longest edge 64,
    then 32x32 squares), loaded back by the CLI."""
    tok, ids = tok_and_ids
    model = _build("smolvlm", tok, ids[1])
    folder = tmp_path_factory.mktemp("tiny-smolvlm")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "size": {"longest_edge": 64}, "max_image_size": {"longest_edge": 32}, "resample": 1,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "video_sampling": {"fps": 1, "max_frames": 64, "video_size": {"longest_edge": 64}}}))
    # read where torchvision is installed and the CLI builds the real SmolVLMProcessor
    (folder / "processor_config.json").write_text(json.dumps({"image_seq_len": TOKENS_PER_FRAME,
                                                              "processor_class": "SmolVLMProcessor"}))
    return folder


def test_cli_video_compare(tiny_smolvlm_dir, clips):
    proc = subprocess.run([*CLI, "generate", "--model", str(tiny_smolvlm_dir), "--video", str(clips[0]),
                           "--frames", "5", "--prompt", "What moves in this video?", "--max-new-tokens", "16",
                           "--budget", "60", "--gamma", "4", "--compare", "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["identical"] is True
    stats = result["stats"]
    assert stats["n_visual"] == [5 * TOKENS_PER_FRAME]
    assert stats["n_text"][0] + 5 * TOKENS_PER_FRAME == result["prompt_tokens"]
    assert stats["n_candidates"] == [5 * TOKENS_PER_FRAME]
    assert stats["n_selected"][0] < result["prompt_tokens"]


def test_idefics3_uses_the_processor_it_is_given(tok_and_ids, clips):
    """An Idefics3Processor passed in (what load_model returns where torchvision is installed) is
    used as it is: its image processor settings, not the ones derived from the model."""
    import copy

    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    tok, ids = tok_and_ids
    model = _build("idefics3", tok, ids[1])
    frames = read_video(clips[0], num_frames=3).frames
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 48}, max_image_size={"longest_edge": 32})
    processor = Idefics3Processor(image_processor, copy.deepcopy(tok), image_seq_len=TOKENS_PER_FRAME)
    via = build_video_inputs(model, processor, frames, "What moves?")
    own = build_video_inputs(model, tok, frames, "What moves?")  # first resize to 4 x 32 = 128 px
    assert torch.equal(via["input_ids"], own["input_ids"])
    assert not torch.equal(via["pixel_values"], own["pixel_values"])
    direct = image_processor(images=[list(frames)], do_image_splitting=False, return_tensors="pt")
    assert torch.equal(via["pixel_values"], direct["pixel_values"])


# ----------------------------------------------------------------------------------- bad input
def test_bad_inputs_are_one_line_errors(model_tok, clips):
    family, model, tok = model_tok
    frames = read_video(clips[0], num_frames=2).frames
    with pytest.raises(ValueError, match="got 3 timestamps for 2 frames"):
        build_video_inputs(model, tok, frames, "hi", timestamps=[0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="one prompt per video"):
        build_video_batch(model, tok, [frames, frames], ["hi"])
    with pytest.raises(ValueError, match=re.escape("expected frames [T, H, W, 3]")):
        build_video_inputs(model, tok, frames[..., :2], "hi")


def test_tokenizer_without_smolvlm_tokens(tok_and_ids):
    from transformers import AutoTokenizer

    from sparse2dense.models import cache_dir

    tok, ids = tok_and_ids
    plain = AutoTokenizer.from_pretrained(cache_dir() / "smollm2-135m-instruct")
    frames = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    for family in ("smolvlm", "idefics3"):
        model = _build(family, tok, ids[1])
        with pytest.raises(ValueError, match="the tokenizer has no '<.*>' token"):
            build_video_inputs(model, plain, frames, "hi")


def test_batch_of_another_family_is_refused():
    qwen = SimpleNamespace(config=SimpleNamespace(model_type="qwen2_vl"))
    with pytest.raises(ValueError, match="supports SmolVLM and Idefics3"):
        build_video_batch(qwen, None, [np.zeros((2, 8, 8, 3), dtype=np.uint8)], ["hi"])
