"""The lean low-precision drafter (``draft_dtype="int8"``, ``"int4"``, bf16 on Llama-style models).

Two things must hold: the output stays exactly ``model.generate``'s (verification decides every
token), and the lean forward computes the model's function (else acceptance would silently collapse
while the output stayed right). The second is checked on models whose attention is made sharp, so
that a wrong position, norm or head layout changes the logits far beyond the format's rounding; a
control run with shifted positions proves the check can fail.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import FULL_ATTENTION_ARCHS, SLIDING_ARCHS, VOCAB, bare_engine, build_model, make_batch
from test_parity_text import cfg, check_parity

import sparse2dense
from sparse2dense import StdConfig
from sparse2dense.attention import attention_routed
from sparse2dense.config import parse_dtype
from sparse2dense.drafter import make_drafter
from sparse2dense.kv import ForwardPlan
from sparse2dense.lean import LeanDecoder, supports_lean

FORMATS = ("bf16", "int8", "int4")
# Largest relative logit error each format may show against the fp32 model (measured on the models
# below: bf16 <= 0.005, int8 <= 0.014, int4 <= 0.15; RoPE positions off by 7 give about 0.3).
TOLERANCE = {"bf16": 0.02, "int8": 0.04, "int4": 0.3}


def _sharp_model(arch: str) -> torch.nn.Module:
    """A tiny model whose attention is peaked and weighs in the residual stream (Q, K, V and O
    scaled up), so positions and head layout change the logits."""
    model = build_model(arch, seed=11)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(layer.self_attn, proj).weight.mul_(6)
    return model


def _logits(model, fmt: str, shift: int = 0):
    """Logits of the fp32 model and of its lean ``fmt`` drafter for one 3-token block after a
    left-padded prompt (``shift`` moves the drafter's positions: a deliberate bug)."""
    gen = torch.Generator().manual_seed(5)
    ids, mask = make_batch(gen, [180, 120])
    engine, _ = bare_engine(model, StdConfig(budget=100000, gamma=4), ids, mask, 8)
    lean = make_drafter(model, fmt if fmt != "bf16" else torch.bfloat16)[1]
    assert isinstance(lean, LeanDecoder)
    block = torch.randint(3, VOCAB, (2, 3), generator=gen)
    runner = engine.runner
    runner.exact = None  # the reference is the transformers forward itself
    engine.select_on_join = False
    engine.prefill()
    with torch.inference_mode(), attention_routed(model):
        s = engine.slots
        col = s.dense_len[: s.n]
        q_cols = col.unsqueeze(1) + torch.arange(3)
        span = int(col.max()) + 3
        masks, _ = runner.masks(s.lo[: s.n], q_cols, span)
        plan = ForwardPlan(buffer=engine.dense_view(), write_col=col, write_col_int=None, q_len=3, span=span,
                           mask=masks)
        positions = q_cols - s.lo[: s.n].unsqueeze(1)
        ref = runner.forward(plan, engine.cache, block, positions, True)
        plan = ForwardPlan(buffer=engine.dense_view(), write_col=col, write_col_int=None, q_len=3, span=span,
                           mask=masks)
        got = runner.forward(plan, engine.cache, block, positions + shift, True, model=lean)
    return ref, got


def _rel_error(ref, got) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("arch", FULL_ATTENTION_ARCHS)
def test_lean_forward_computes_the_models_function(arch, fmt):
    model = _sharp_model(arch)
    ref, got = _logits(model, fmt)
    assert _rel_error(ref, got) < TOLERANCE[fmt]
    agree = (ref.argmax(-1) == got.argmax(-1)).float().mean()
    assert agree >= 0.5


@pytest.mark.parametrize("arch", FULL_ATTENTION_ARCHS)
def test_lean_check_catches_wrong_positions(arch):
    """Control: the same comparison with the drafter's RoPE positions off by 7 must fail it."""
    model = _sharp_model(arch)
    ref, got = _logits(model, "bf16", shift=7)
    assert _rel_error(ref, got) > TOLERANCE["bf16"] * 5


@pytest.mark.parametrize("fmt", ["int8", "int4", "bf16"])
@pytest.mark.parametrize("arch", FULL_ATTENTION_ARCHS)
def test_lean_drafters_are_lossless(tiny_model, arch, fmt):
    model = tiny_model(arch)
    gen = torch.Generator().manual_seed(17)
    rng = random.Random(f"{arch}{fmt}")
    for lens, gamma in (([400], 6), ([350, 200, 90, 300], 4), ([500], "auto"), ([260, 40], 12)):
        ids, mask = make_batch(gen, lens)
        out = check_parity(model, ids, mask, rng.choice([1, 17, 30]), cfg(32, gamma, draft_dtype=fmt),
                           both=len(lens) == 1)
        if gamma != "auto" and out.stats.rounds:
            assert out.stats.draft_dtype == ("bfloat16" if fmt == "bf16" else fmt)
            assert out.stats.draft_weights_mb > 0
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("arch", SLIDING_ARCHS)
def test_lean_drafters_with_sliding_window_models_are_lossless(tiny_model, arch):
    """The lean drafter ignores sliding windows (it only proposes); the verifier applies them."""
    model = tiny_model(arch)
    gen = torch.Generator().manual_seed(23)
    for lens, gamma in (([300], 5), ([220, 90, 160], 3)):
        ids, mask = make_batch(gen, lens)
        check_parity(model, ids, mask, 24, cfg(32, gamma, draft_dtype="int8"), both=len(lens) == 1)


def test_int_drafters_use_fewer_bytes(llama):
    sizes = {fmt: make_drafter(llama, fmt)[2] for fmt in ("int8", "int4")}
    sizes["bf16"] = make_drafter(llama, torch.bfloat16)[2]
    assert sizes["int4"] < sizes["int8"] < sizes["bf16"]


def test_auto_draft_dtype_picks_int8_on_cpu(llama):
    gen = torch.Generator().manual_seed(3)
    ids, mask = make_batch(gen, [300])
    out = check_parity(llama, ids, mask, 12, cfg(32, 4, draft_dtype="auto"), both=False)
    assert out.stats.draft_dtype == "int8"


def test_auto_draft_dtype_prefers_bf16_above_batch_4(llama):
    from sparse2dense.drafter import fast_bf16

    gen = torch.Generator().manual_seed(4)
    ids, mask = make_batch(gen, [120 + 9 * i for i in range(5)])
    out = check_parity(llama, ids, mask, 6, cfg(32, 3, draft_dtype="auto"), both=False)
    assert out.stats.draft_dtype == ("bfloat16" if fast_bf16(torch.device("cpu")) else "int8")


def test_int_formats_refuse_unsupported_models():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).eval()
    assert not supports_lean(model)
    with pytest.raises(ValueError, match="supports Llama, Mistral, Qwen2 and Qwen3"):
        make_drafter(model, "int4")


def test_draft_dtype_names():
    assert parse_dtype("INT8") == "int8"
    assert parse_dtype("int4") == "int4"
    with pytest.raises(ValueError, match="'int8' or 'int4'"):
        parse_dtype("int3")
    with pytest.raises(ValueError, match="draft_dtype"):
        StdConfig(draft_dtype="fp8")


def test_generate_accepts_int_draft_dtype(llama):
    gen = torch.Generator().manual_seed(9)
    ids, mask = make_batch(gen, [200])
    ref = llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    out = sparse2dense.generate(llama, ids, mask, max_new_tokens=10, budget=32, gamma=3, draft_dtype="int4")
    assert torch.equal(out.sequences, ref)
    assert out.stats.draft_dtype == "int4"


@pytest.mark.parametrize("draft_dtype", [None, "int8"])
def test_bf16_model_left_padded_batch_runs(draft_dtype):
    """A bf16 model at batch > 1: masks reach the fused attention kernel in the model's precision."""
    model = build_model("llama", seed=2).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(8)
    ids, mask = make_batch(gen, [150, 90, 120])
    out = sparse2dense.generate(model, ids, mask, max_new_tokens=8, budget=32, gamma=3, draft_dtype=draft_dtype)
    assert out.sequences.shape == (3, ids.shape[1] + 8)
    assert out.stats.drafted > 0
