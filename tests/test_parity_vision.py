"""Lossless parity for vision-language models: Sparse-to-Dense == ``model.generate(do_sample=False)``.

One tiny random-weight fp32 model per supported VLM family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL,
LLaVA-OneVision, LLaVA-NeXT-Video, Idefics3/SmolVLM), built from configs in code. There is no
torchvision here, so transformers' image/video processors cannot run: every model input is built by
hand as the family's processor lays it out (placeholder counts, vision-start/end markers, Qwen3-VL's
per-frame blocks, ``mm_token_type_ids``, ``*_grid_thw``, ``second_per_grid_ts``, ``image_sizes``,
concatenated / zero-padded pixel tensors).

For each family: video (Idefics3: frames as images), image, text-only prompt, left-padded batches of
prompts of different lengths (each row with its own video or image, or one text-only row), EOS in a
batch, several visual inputs in one prompt, through both entry points (``sparse2dense.generate`` and
``model.generate(custom_generate=sparse2dense.custom_generate)``), with budgets that keep only some
visual tokens and budgets larger than the prompt. The sparse cases check that the drafter really was
sparse (``n_selected < prompt``, ``n_candidates == visual tokens``); the last test checks that every
family's drafter was sometimes right and sometimes wrong, otherwise parity would prove little.
"""

from __future__ import annotations

import functools

import pytest
import torch

torch.set_num_threads(1)

import transformers  # noqa: E402
from transformers import (  # noqa: E402
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

import sparse2dense  # noqa: E402
from sparse2dense import StdConfig  # noqa: E402

transformers.logging.set_verbosity_error()

# ----------------------------------------------------------------------------------- vocabulary
VOCAB = 256
PAD = 0
FIRST_TEXT, LAST_TEXT = 3, 240  # random text tokens are drawn from [FIRST_TEXT, LAST_TEXT)
IMG, VID, V_START, V_END = 250, 251, 252, 253  # placeholder / marker ids (inside the vocabulary)
FRAME_SEP = 245  # a text token between frames (Qwen3-VL timestamps, Idefics3 "Frame i" text)

MAX_NEW = 24
# budgets are given as "text tokens + extra", so "+8" keeps 8 visual tokens; BIG keeps everything
BIG = 100_000

_TEXT = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=PAD,
    # peakier attention than the default 0.02, so that dropping visual tokens changes the drafter's
    # argmax sometimes (acceptance < 1)
    initializer_range=0.02,
)
_MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
_PINPOINTS = [[16, 16], [16, 32], [32, 16], [32, 32]]


def _finish(model):
    model = model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    return model


def _qwen2_vl():
    cfg = Qwen2VLConfig(
        text_config=dict(_TEXT, rope_parameters=dict(_MROPE)),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=IMG, video_token_id=VID, vision_start_token_id=V_START, vision_end_token_id=V_END,
    )
    return Qwen2VLForConditionalGeneration(cfg)


def _qwen2_5_vl():
    cfg = Qwen2_5_VLConfig(
        text_config=dict(_TEXT, rope_parameters=dict(_MROPE)),
        # layer 0 uses window attention (window 16 px = 2x2 merged tokens), layer 1 full attention
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=16,
                           out_hidden_size=64, fullatt_block_indexes=[1], tokens_per_second=2),
        image_token_id=IMG, video_token_id=VID, vision_start_token_id=V_START, vision_end_token_id=V_END,
    )
    return Qwen2_5_VLForConditionalGeneration(cfg)


def _qwen3_vl():
    cfg = Qwen3VLConfig(
        text_config=dict(_TEXT, head_dim=16, rope_parameters=dict(_MROPE, mrope_interleaved=True)),
        # deepstack: features of vision layer 0 are added to the first text layer's visual positions
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3, out_hidden_size=64,
                           num_position_embeddings=16, deepstack_visual_indexes=[0]),
        image_token_id=IMG, video_token_id=VID, vision_start_token_id=V_START, vision_end_token_id=V_END,
    )
    return Qwen3VLForConditionalGeneration(cfg)


def _llava_onevision():
    cfg = LlavaOnevisionConfig(
        text_config=dict(_TEXT, model_type="qwen2"),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4),
        image_token_index=IMG, video_token_index=VID, image_grid_pinpoints=_PINPOINTS, vision_feature_layer=-1,
    )
    return LlavaOnevisionForConditionalGeneration(cfg)


def _llava_next_video():
    cfg = LlavaNextVideoConfig(
        text_config=dict(_TEXT, model_type="llama"),
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4,
                           projection_dim=32),
        image_token_index=IMG, video_token_index=VID, image_grid_pinpoints=_PINPOINTS, vision_feature_layer=-1,
    )
    return LlavaNextVideoForConditionalGeneration(cfg)


def _idefics3():
    cfg = Idefics3Config(
        text_config=dict(_TEXT, model_type="llama"),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=4),
        image_token_id=IMG, scale_factor=2,
    )
    return Idefics3ForConditionalGeneration(cfg)


BUILDERS = {
    "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": _qwen2_5_vl,
    "qwen3_vl": _qwen3_vl,
    "llava_onevision": _llava_onevision,
    "llava_next_video": _llava_next_video,
    "idefics3": _idefics3,
}
FAMILIES = tuple(BUILDERS)
QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


# Query/key weights (and Qwen3's q/k RMSNorm gains) of the text model are scaled up after the default
# init (std 0.02): attention becomes peaky enough that a wrong position id or a wrong KV entry
# changes the greedy tokens (with the plain init, wrong M-RoPE positions went unnoticed), while the
# drafter is still right often enough to exercise multi-token acceptance.
QK_SCALE = 6.0
_QK_PARAMS = ("q_proj.weight", "k_proj.weight", "q_norm.weight", "k_norm.weight")


@functools.lru_cache(maxsize=None)
def get_model(family: str):
    torch.manual_seed(0)
    model = BUILDERS[family]()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "vision" not in name and "visual" not in name and name.endswith(_QK_PARAMS):
                param.mul_(QK_SCALE)
    return _finish(model)


# ----------------------------------------------------------------------------------- prompts
# A "row" is one prompt: {"ids": LongTensor [L], "mm": LongTensor [L] (Qwen token types), vision
# tensors for one sample}. ``collate`` left-pads rows and joins their vision tensors as the
# processors do.


def _text(gen, n):
    return torch.randint(FIRST_TEXT, LAST_TEXT, (n,), generator=gen)


def _row(parts):
    """parts: list of (token tensor, mm type) -> ids, mm."""
    ids = torch.cat([p for p, _ in parts])
    mm = torch.cat([torch.full_like(p, t) for p, t in parts])
    return ids, mm


def _qwen_block(token, n, kind):
    """[V_START] token*n [V_END] with mm types (1 image, 2 video on the placeholders only)."""
    return [(torch.tensor([V_START]), 0), (torch.full((n,), token), kind), (torch.tensor([V_END]), 0)]


def _qwen_patches(gen, grid, model):
    vc = model.config.vision_config
    t, h, w = grid
    return torch.randn(t * h * w, vc.in_channels * vc.temporal_patch_size * vc.patch_size**2, generator=gen)


def qwen_row(family, gen, visuals, pre=6, post=10):
    """One Qwen-VL prompt: ``visuals`` is a list of ("image"|"video", (t, h, w)) in patch units."""
    model = get_model(family)
    merge = model.config.vision_config.spatial_merge_size**2
    parts = [(_text(gen, pre), 0)]
    row = {"pixel_values": [], "image_grid_thw": [], "pixel_values_videos": [], "video_grid_thw": [],
           "second_per_grid_ts": []}
    for kind, grid in visuals:
        t, h, w = grid
        if kind == "image":
            parts += _qwen_block(IMG, t * h * w // merge, 1)
            row["pixel_values"].append(_qwen_patches(gen, grid, model))
            row["image_grid_thw"].append(torch.tensor([grid]))
        elif family == "qwen3_vl":
            # Qwen3-VL: every temporal patch is its own <timestamp> <vision_start> ... <vision_end> block
            for _ in range(t):
                parts += [(torch.tensor([FRAME_SEP]), 0)] + _qwen_block(VID, h * w // merge, 2)
            row["pixel_values_videos"].append(_qwen_patches(gen, grid, model))
            row["video_grid_thw"].append(torch.tensor([grid]))
        else:
            parts += _qwen_block(VID, t * h * w // merge, 2)
            row["pixel_values_videos"].append(_qwen_patches(gen, grid, model))
            row["video_grid_thw"].append(torch.tensor([grid]))
            row["second_per_grid_ts"].append(torch.tensor([0.5 + len(row["second_per_grid_ts"])]))
        parts.append((_text(gen, 3), 0))
    parts.append((_text(gen, post), 0))
    row["ids"], row["mm"] = _row(parts)
    if family != "qwen2_5_vl":
        row["second_per_grid_ts"] = []
    return row


# Placeholder counts for the tiny configs above (checked against the models' own
# "tokens: X, features: Y" errors):
#  LLaVA-OneVision / LLaVA-NeXT-Video anyres image of size (h, w): 16 tokens for the base image, the
#  unpadded crop grid, one newline per grid row (16x16 -> 2 crops, 36 tokens). Video of F 16x16
#  frames: F * 4 (2x2 pooling), plus one newline token for OneVision.
#  Idefics3: a 16x16 image -> 16 patches -> 4 tokens after the 2x2 pixel shuffle.
#  Qwen-VL: t*h*w / 4 tokens for a (t, h, w) patch grid (2x2 spatial merge).
LLAVA_IMAGE = {(16, 16): (2, 36), (16, 32): (3, 52), (32, 16): (3, 56)}


def llava_row(family, gen, visuals, pre=6, post=10):
    """``visuals``: list of ("image", (h, w)) or ("video", n_frames); at most one of each kind."""
    parts = [(_text(gen, pre), 0)]
    row = {}
    for kind, arg in visuals:
        if kind == "image":
            crops, n = LLAVA_IMAGE[arg]
            parts.append((torch.full((n,), IMG), 1))
            row["pixel_values"] = torch.randn(1, crops, 3, 16, 16, generator=gen)
            row["image_sizes"] = torch.tensor([arg])
        else:
            n = arg * 4 + (1 if family == "llava_onevision" else 0)
            parts.append((torch.full((n,), VID), 2))
            row["pixel_values_videos"] = torch.randn(1, arg, 3, 16, 16, generator=gen)
        parts.append((_text(gen, 3), 0))
    parts.append((_text(gen, post), 0))
    row["ids"], row["mm"] = _row(parts)
    return row


def idefics3_row(gen, n_images, pre=6, post=10):
    """SmolVLM-style video: frames arrive as images, each wrapped in text markers."""
    parts = [(_text(gen, pre), 0)]
    for _ in range(n_images):
        parts += [(torch.tensor([FRAME_SEP]), 0), (torch.full((4,), IMG), 1)]
    parts.append((_text(gen, post), 0))
    row = {}
    row["ids"], row["mm"] = _row(parts)
    if n_images:
        row["pixel_values"] = torch.randn(1, n_images, 3, 16, 16, generator=gen)
        row["pixel_attention_mask"] = torch.ones(1, n_images, 16, 16, dtype=torch.long)
    return row


def collate(family, rows):
    """Left-pad ``rows`` into one batch of model inputs, vision tensors joined as the processor does."""
    width = max(len(r["ids"]) for r in rows)
    b = len(rows)
    ids = torch.full((b, width), PAD, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    mm = torch.zeros((b, width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["ids"])
        ids[i, width - n:] = r["ids"]
        mask[i, width - n:] = 1
        mm[i, width - n:] = r["mm"]
    inputs = {"input_ids": ids, "attention_mask": mask}
    if family in QWEN:
        inputs["mm_token_type_ids"] = mm
        for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
            parts = [x for r in rows for x in r[key]]
            if parts:
                inputs[key] = torch.cat(parts)
    elif family == "idefics3":
        n_img = max((r["pixel_values"].shape[1] for r in rows if "pixel_values" in r), default=0)
        if n_img:
            # the processor pads every row to the same number of images with all-zero images
            pv = torch.zeros(b, n_img, 3, 16, 16)
            pam = torch.zeros(b, n_img, 16, 16, dtype=torch.long)
            for i, r in enumerate(rows):
                if "pixel_values" in r:
                    k = r["pixel_values"].shape[1]
                    pv[i, :k] = r["pixel_values"][0]
                    pam[i, :k] = r["pixel_attention_mask"][0]
            inputs["pixel_values"] = pv
            inputs["pixel_attention_mask"] = pam
    else:
        for key in ("pixel_values", "image_sizes", "pixel_values_videos"):
            parts = [r[key] for r in rows if key in r]
            if key == "pixel_values" and parts:
                # the processor zero-pads every image to the batch's largest number of anyres crops
                most = max(p.shape[1] for p in parts)
                parts = [torch.cat([p, p.new_zeros(1, most - p.shape[1], *p.shape[2:])], dim=1) for p in parts]
            if parts:
                inputs[key] = torch.cat(parts)
    return inputs


# ----------------------------------------------------------------------------------- scenarios
# Each scenario returns one row; ``size=1`` gives a shorter video (for the shorter row of a batch).

VIDEO_GRIDS = {"qwen2_vl": (4, 8, 8), "qwen2_5_vl": (4, 8, 8), "qwen3_vl": (4, 8, 8)}  # 64 visual tokens


def video_rows(family, gen, pre=6, post=10, size=0):
    if family in QWEN:
        t, h, w = VIDEO_GRIDS[family]
        return qwen_row(family, gen, [("video", (t - 2 * size, h, w))], pre, post)
    if family == "idefics3":
        return idefics3_row(gen, 12 - 4 * size, pre, post)
    return llava_row(family, gen, [("video", 12 - 4 * size)], pre, post)


def image_rows(family, gen, pre=6, post=10):
    if family in QWEN:
        return qwen_row(family, gen, [("image", (1, 8, 12))], pre, post)  # 24 visual tokens
    if family == "idefics3":
        # an image split into 2x2 tiles plus the downscaled global image, as SmolVLM's processor does
        return idefics3_row(gen, 5, pre, post)
    return llava_row(family, gen, [("image", (16, 16))], pre, post)


def text_rows(family, gen, pre=30, post=10):
    row = {"ids": _text(gen, pre + post)}
    row["mm"] = torch.zeros_like(row["ids"])
    if family in QWEN:
        row.update({k: [] for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                                     "second_per_grid_ts")})
    return row


# ----------------------------------------------------------------------------------- checks
ACCEPTANCE: dict[str, list[float]] = {}


def _describe(ref, got, prompt_len):
    if ref.shape != got.shape:
        return f"shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    lines = []
    for r in (ref != got).any(dim=1).nonzero().flatten().tolist()[:3]:
        lines.append(f"row {r}: ref {ref[r, prompt_len:].tolist()}\n       got {got[r, prompt_len:].tolist()}")
    return "generated tokens differ\n" + "\n".join(lines)


def run(family, inputs, api, budget, gamma, max_new=MAX_NEW, config_kw=None, **gen_kw):
    """Generate with sparse2dense through ``api``; return (sequences, stats).

    ``api``: "direct" (``sparse2dense.generate(config=StdConfig)``), "hf"
    (``model.generate(custom_generate=..., std_config=StdConfig)``) or "hf_kwargs"
    (``model.generate(custom_generate=..., budget=, gamma=)``, only with ``config_kw=None``).
    """
    model = get_model(family)
    config = StdConfig(budget=budget, gamma=gamma, **(config_kw or {}))
    if api == "direct":
        out = sparse2dense.generate(model, **inputs, max_new_tokens=max_new, config=config, **gen_kw)
        return out.sequences, out.stats
    if api == "hf_kwargs":
        assert not config_kw
        std_kw = dict(budget=budget, gamma=gamma)
    else:
        std_kw = dict(std_config=config)
    out = model.generate(**inputs, max_new_tokens=max_new, do_sample=False, return_dict_in_generate=True,
                         custom_generate=sparse2dense.custom_generate, **std_kw, **gen_kw)
    return out.sequences, out.std_stats


def check_parity(family, inputs, api, budget, gamma, max_new=MAX_NEW, config_kw=None, **gen_kw):
    """sparse2dense through ``api`` equals greedy ``model.generate``; returns sparse2dense's stats.

    ``gen_kw`` (e.g. ``eos_token_id``) goes to both the reference and sparse2dense.
    """
    model = get_model(family)
    ref = model.generate(**inputs, max_new_tokens=max_new, do_sample=False, **gen_kw)
    prompt_len = inputs["input_ids"].shape[1]
    if not gen_kw:
        assert ref.shape[1] == prompt_len + max_new
    seq, stats = run(family, inputs, api, budget, gamma, max_new, config_kw, **gen_kw)
    assert torch.equal(seq, ref), _describe(ref, seq, prompt_len)
    ACCEPTANCE.setdefault(family, []).append(stats.acceptance_rate)
    return stats


def n_visual(inputs):
    ids = inputs["input_ids"]
    return ((ids == IMG) | (ids == VID)).sum(dim=1).tolist()


def n_text(inputs):
    ids = inputs["input_ids"]
    visual = (ids == IMG) | (ids == VID)
    return (inputs["attention_mask"].bool() & ~visual).sum(dim=1).tolist()


def assert_selection(stats, inputs, budget):
    """Candidates are exactly each row's visual tokens; the drafter kept every text token and
    ``budget - text`` of the visual ones. Returns per row whether the drafter dropped something."""
    assert stats.n_candidates == n_visual(inputs)
    assert stats.n_visual == n_visual(inputs) and stats.n_text == n_text(inputs)
    lens = inputs["attention_mask"].sum(dim=1).tolist()
    sparse = []
    for row, (sel, length, vis, txt) in enumerate(zip(stats.n_selected, lens, n_visual(inputs), n_text(inputs))):
        assert sel == txt + min(vis, max(0, budget - txt)), f"row {row}: selected {sel}"
        sparse.append(sel < length)
    return sparse


# ----------------------------------------------------------------------------------- tests
APIS = ("direct", "hf")  # sparse2dense.generate / model.generate(custom_generate=sparse2dense.custom_generate)
GEN_SEED = 1234


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("extra,gamma", [(8, 5), (BIG, 3)])
@pytest.mark.parametrize("api", APIS)
def test_video(family, extra, gamma, api):
    check_one_visual_input(family, video_rows, GEN_SEED, extra, gamma, api)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("extra,gamma", [(4, 4), (BIG, 6)])
@pytest.mark.parametrize("api", APIS)
def test_image(family, extra, gamma, api):
    check_one_visual_input(family, image_rows, GEN_SEED + 1, extra, gamma, api)


def check_one_visual_input(family, rows, seed, extra, gamma, api):
    """Batch 1; the budget keeps every text token plus ``extra`` visual ones (BIG: everything)."""
    inputs = collate(family, [rows(family, torch.Generator().manual_seed(seed))])
    budget = n_text(inputs)[0] + extra if extra != BIG else BIG
    stats = check_parity(family, inputs, api, budget, gamma)
    assert assert_selection(stats, inputs, budget) == [extra != BIG]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("budget,gamma", [(12, 5), (BIG, 4)])
@pytest.mark.parametrize("api", APIS)
def test_text_only(family, budget, gamma, api):
    """A prompt without any vision input: candidates fall back to the text rule; still exact."""
    gen = torch.Generator().manual_seed(GEN_SEED + 2)
    inputs = collate(family, [text_rows(family, gen)])
    stats = check_parity(family, inputs, api, budget, gamma, config_kw=dict(sink_tokens=2, keep_last=6))
    if budget != BIG:
        assert stats.n_candidates == [40 - 2 - 6]
        assert stats.n_selected == [12]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["video", "image"])
@pytest.mark.parametrize("api", APIS)
def test_batch(family, kind, api):
    """Two left-padded prompts of different lengths, each with its own video (or image)."""
    gen = torch.Generator().manual_seed(GEN_SEED + 3)
    if kind == "video":
        # LLaVA processors sample the same number of frames for every video of a batch
        size = 1 if family in QWEN + ("idefics3",) else 0
        rows = [video_rows(family, gen, pre=4, post=8, size=size), video_rows(family, gen, pre=9, post=12)]
    else:
        rows = [image_rows(family, gen, pre=4, post=8), image_rows(family, gen, pre=12, post=15)]
    inputs = collate(family, rows)
    assert inputs["attention_mask"][0, 0] == 0  # row 0 is really padded
    budget = max(n_text(inputs)) + 4
    stats = check_parity(family, inputs, api, budget, 4)
    assert all(assert_selection(stats, inputs, budget))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("api", APIS)
def test_batch_text_and_vision(family, api):
    """Batch of a text-only prompt and a video prompt (the text row falls back to the text rule)."""
    gen = torch.Generator().manual_seed(GEN_SEED + 4)
    rows = [text_rows(family, gen, pre=20, post=6), video_rows(family, gen, size=1)]
    inputs = collate(family, rows)
    check_parity(family, inputs, api, max(n_text(inputs)) + 6, 5, config_kw=dict(sink_tokens=2, keep_last=6))


@pytest.mark.parametrize("family", QWEN + ("llava_onevision", "llava_next_video"))
@pytest.mark.parametrize("api", APIS)
def test_multiple_visuals(family, api):
    """Several videos / an image and a video in one prompt."""
    gen = torch.Generator().manual_seed(GEN_SEED + 5)
    if family in QWEN:
        row = qwen_row(family, gen, [("video", (2, 8, 8)), ("image", (1, 8, 8)), ("video", (4, 4, 8))])
    else:
        row = llava_row(family, gen, [("image", (32, 16)), ("video", 8)])
    inputs = collate(family, [row])
    budget = n_text(inputs)[0] + 10
    stats = check_parity(family, inputs, api, budget, 6)
    assert assert_selection(stats, inputs, budget) == [True]


@pytest.mark.parametrize("api", APIS)
def test_qwen2_vl_two_videos_batched(api):
    """Qwen2-VL: a batch of two rows, one with two videos, one with an image and a video."""
    family = "qwen2_vl"
    gen = torch.Generator().manual_seed(GEN_SEED + 6)
    rows = [qwen_row(family, gen, [("video", (2, 8, 8)), ("video", (2, 4, 4))], pre=3, post=5),
            qwen_row(family, gen, [("image", (1, 4, 8)), ("video", (4, 8, 8))], pre=8, post=12)]
    inputs = collate(family, rows)
    budget = max(n_text(inputs)) + 8
    stats = check_parity(family, inputs, api, budget, 6)
    assert all(assert_selection(stats, inputs, budget))


@pytest.mark.parametrize("family", FAMILIES)
def test_custom_generate_budget_gamma_kwargs(family):
    """``model.generate(custom_generate=..., budget=..., gamma=...)`` without a StdConfig."""
    gen = torch.Generator().manual_seed(GEN_SEED + 7)
    inputs = collate(family, [video_rows(family, gen)])
    budget = n_text(inputs)[0] + 5
    stats = check_parity(family, inputs, "hf_kwargs", budget, 7)
    assert stats.gamma == 7 and stats.budget == budget
    assert assert_selection(stats, inputs, budget) == [True]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("api", APIS)
def test_eos_batch(family, api):
    """An EOS that ends one row early: that row is padded and leaves the batch, the other keeps
    going, as in generate."""
    gen = torch.Generator().manual_seed(GEN_SEED + 8)
    size = 1 if family in QWEN + ("idefics3",) else 0
    inputs = collate(family, [video_rows(family, gen, pre=4, post=8, size=size), video_rows(family, gen, pre=9)])
    model = get_model(family)
    plain = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    p = inputs["input_ids"].shape[1]
    # the 6th token of row 0 that row 1 does not produce before it: row 0 stops there, row 1 later or never
    eos = next(int(t) for t in plain[0, p + 5:] if int(t) not in plain[1, p:p + 8].tolist())
    ref = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=eos)
    stop = ref[0, p:].tolist().index(eos)
    assert stop < ref.shape[1] - p - 1 and (ref[0, p + stop + 1:] == PAD).all(), "row 0 stops early, padded"
    assert eos not in ref[1, p:p + stop + 2].tolist(), "row 1 goes on after row 0 stopped"
    stats = check_parity(family, inputs, api, max(n_text(inputs)) + 6, 4, eos_token_id=eos)
    # row 0 left the batch: row 1 took its buffer slot (and, for Qwen-VL, its M-RoPE offsets along)
    assert stats.compactions == 1


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "budget,gamma,config_kw",
    [
        (1, 4, None),  # budget below the text tokens: the drafter sees text only
        (None, 0, None),  # gamma 0: plain dense decoding on sparse2dense's buffers
        (None, 12, dict(policy="streaming")),  # recent-window selection instead of attention scores
        (None, 5, dict(prefill_chunk=16, max_score_queries=4)),  # vision prefill stays one pass
    ],
    ids=["budget1", "gamma0", "streaming", "chunk16"],
)
def test_video_configs(family, budget, gamma, config_kw):
    gen = torch.Generator().manual_seed(GEN_SEED + 9)
    inputs = collate(family, [video_rows(family, gen)])
    budget = budget if budget is not None else n_text(inputs)[0] + 10
    stats = check_parity(family, inputs, "direct", budget, gamma, max_new=40, config_kw=config_kw)
    if gamma:
        assert assert_selection(stats, inputs, budget) == [True]
    else:
        assert stats.drafted == 0


@pytest.mark.parametrize("family", ["llava_onevision", "llava_next_video"])
@pytest.mark.parametrize("api", APIS)
def test_llava_batch_anyres_sizes(family, api):
    """Two images of different aspect ratios: different crop counts, zero-padded pixel_values."""
    gen = torch.Generator().manual_seed(GEN_SEED + 10)
    rows = [llava_row(family, gen, [("image", (16, 32))], pre=3, post=7),
            llava_row(family, gen, [("image", (16, 16))], pre=12, post=14)]
    inputs = collate(family, rows)
    assert inputs["pixel_values"].shape[:2] == (2, 3)
    budget = max(n_text(inputs)) + 6
    stats = check_parity(family, inputs, api, budget, 5)
    assert all(assert_selection(stats, inputs, budget))


@pytest.mark.parametrize("family", QWEN)
@pytest.mark.parametrize("api", APIS)
def test_qwen_batch_image_row_and_video_row(family, api):
    """Row 0 holds an image, row 1 a video (and row 1 also a second image)."""
    gen = torch.Generator().manual_seed(GEN_SEED + 11)
    rows = [qwen_row(family, gen, [("image", (1, 8, 8))], pre=5, post=9),
            qwen_row(family, gen, [("video", (2, 8, 12)), ("image", (1, 4, 4))], pre=2, post=4)]
    inputs = collate(family, rows)
    budget = max(n_text(inputs)) + 7
    stats = check_parity(family, inputs, api, budget, 6)
    assert all(assert_selection(stats, inputs, budget))


@pytest.mark.parametrize("family", QWEN)
def test_qwen_text_only_without_mm_token_type_ids(family):
    """A text-only prompt given as bare input_ids (no mm_token_type_ids at all)."""
    gen = torch.Generator().manual_seed(GEN_SEED + 12)
    inputs = collate(family, [text_rows(family, gen), text_rows(family, gen, pre=12)])
    del inputs["mm_token_type_ids"]
    for api in APIS:
        check_parity(family, inputs, api, 14, 5, config_kw=dict(sink_tokens=2, keep_last=6))


@pytest.mark.parametrize("family", FAMILIES)
def test_without_attention_mask(family):
    """Batch 1 without ``attention_mask`` (both sides default to all ones)."""
    gen = torch.Generator().manual_seed(GEN_SEED + 15)
    inputs = collate(family, [image_rows(family, gen)])
    mask = inputs.pop("attention_mask")
    model = get_model(family)
    ref = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    budget = n_text({**inputs, "attention_mask": mask})[0] + 3
    for api in APIS:
        seq, _ = run(family, inputs, api, budget, 5)
        assert torch.equal(seq, ref), _describe(ref, seq, mask.shape[1])


def test_idefics3_without_pixel_attention_mask():
    """Idefics3 frames without ``pixel_attention_mask`` (the model then treats every pixel as real)."""
    gen = torch.Generator().manual_seed(GEN_SEED + 13)
    inputs = collate("idefics3", [video_rows("idefics3", gen)])
    del inputs["pixel_attention_mask"]
    for api in APIS:
        budget = n_text(inputs)[0] + 9
        stats = check_parity("idefics3", inputs, api, budget, 6)
        assert assert_selection(stats, inputs, budget) == [True]


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_reads_smaller_budgets_of_the_visual_selection(family, monkeypatch):
    """gamma="auto", budget="auto": the drafter also reads only the best few visual entries (forced
    small here so the tiny videos have more; every such drafter is measured whatever the timings),
    in a batch whose rows hold different numbers of text (and, for Qwen-VL, visual) tokens. Output
    stays the model's own."""
    from sparse2dense.adaptive import GammaController

    monkeypatch.setattr("sparse2dense.engine.budget_variants", lambda batch: (6, 2))
    monkeypatch.setattr(GammaController, "_worth_measuring", lambda self, arm: True)
    gen = torch.Generator().manual_seed(GEN_SEED + 15)
    size = 1 if family in QWEN else 0  # LLaVA batches videos of one length
    inputs = collate(family, [video_rows(family, gen), video_rows(family, gen, pre=9, size=size)])
    stats = check_parity(family, inputs, "direct", "auto", "auto", max_new=30,
                         config_kw=dict(draft_dtype=torch.bfloat16))
    per = stats.auto["rounds_per_drafter"]
    assert [n for n in per if "@" in n] and all(per[n] > 0 for n in per if "@" in n), per


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_larger_video_default_config(family):
    """A longer video (256 visual tokens) and 64 new tokens with the library's default settings."""
    gen = torch.Generator().manual_seed(GEN_SEED + 14)
    if family == "qwen2_vl":
        inputs = collate(family, [qwen_row(family, gen, [("video", (4, 16, 16))], pre=12, post=20)])
    else:
        inputs = collate(family, [llava_row(family, gen, [("video", 64)], pre=12, post=20)])
    model = get_model(family)
    ref = model.generate(**inputs, max_new_tokens=64, do_sample=False)
    out = sparse2dense.generate(model, **inputs, max_new_tokens=64)  # budget 1024, gamma 9
    assert torch.equal(out.sequences, ref), _describe(ref, out.sequences, inputs["input_ids"].shape[1])
    budget = n_text(inputs)[0] + 64
    out = sparse2dense.generate(model, **inputs, max_new_tokens=64, budget=budget, gamma=9)
    assert torch.equal(out.sequences, ref), _describe(ref, out.sequences, inputs["input_ids"].shape[1])
    assert assert_selection(out.stats, inputs, budget) == [True]
    ACCEPTANCE.setdefault(family, []).append(out.stats.acceptance_rate)


def test_acceptance_mixed():
    """Across the cases above, every family's drafter was sometimes right and sometimes wrong.

    Otherwise the parity checks would prove little: a drafter that is always right never exercises
    rejection, one that is always wrong never exercises multi-token acceptance. Runs last (pytest
    keeps file order); when run alone it reruns one sparse video case per family.
    """
    for family in FAMILIES:
        if family not in ACCEPTANCE:
            gen = torch.Generator().manual_seed(GEN_SEED)
            inputs = collate(family, [video_rows(family, gen)])
            check_parity(family, inputs, "direct", n_text(inputs)[0] + 8, 5)
        rates = ACCEPTANCE[family]
        assert any(0.0 < r < 1.0 for r in rates), f"{family}: acceptance rates {rates}"


def test_smolvlm_class_frames_as_images():
    """SmolVLM2's own class (model_type smolvlm) goes through the same adapter as Idefics3."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    torch.manual_seed(0)
    cfg = SmolVLMConfig(text_config=dict(_TEXT, model_type="llama"),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=16, patch_size=4),
                        image_token_id=IMG, scale_factor=2)
    model = SmolVLMForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    inputs = collate("idefics3", [video_rows("idefics3", torch.Generator().manual_seed(1))])
    ref = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    for budget in (8, 10**5):
        out = sparse2dense.generate(model, **inputs, max_new_tokens=12, budget=budget, gamma=4)
        assert torch.equal(out.sequences, ref)
        via = model.generate(**inputs, max_new_tokens=12, do_sample=False, custom_generate=sparse2dense.custom_generate,
                             budget=budget, gamma=4)
        assert torch.equal(via, ref)
        assert out.stats.n_visual[0] == int((inputs["input_ids"] == IMG).sum())
