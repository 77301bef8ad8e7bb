"""The exact lean forward: decode-time passes at the model's own precision (verification, dense steps,
drafting with the model's weights) run :class:`~sparse2dense.lean.LeanDecoder` in format ``"model"``
on Llama, Mistral, Qwen2 and Qwen3. It must give the model's logits bit for bit, in every dtype, on
full-attention and sliding-window layers, or losslessness would rest on float luck.
"""

from __future__ import annotations

import pytest
import torch
from conftest import FULL_ATTENTION_ARCHS, SLIDING_ARCHS, VOCAB, bare_engine, build_model, make_batch

from sparse2dense import StdConfig
from sparse2dense.attention import attention_routed
from sparse2dense.drafter import make_drafter
from sparse2dense.kv import ForwardPlan
from sparse2dense.lean import EXACT, LeanDecoder, lean_decoder, supports_exact


def _run(model, lens):
    gen = torch.Generator().manual_seed(5)
    ids, mask = make_batch(gen, lens)
    engine, _ = bare_engine(model, StdConfig(budget=100000, gamma=4), ids, mask, 8)
    return engine, torch.randint(3, VOCAB, (len(lens), 4), generator=gen)


def _both(model, lens, t, shift=0):
    """Verification logits (and captured queries) of a ``t``-token block through the model's forward
    and through the exact forward (``shift`` moves the exact forward's positions: a deliberate bug)."""
    engine, block = _run(model, lens)
    block = block[:, :t]
    runner = engine.runner
    exact = runner.exact
    assert isinstance(exact, LeanDecoder) and exact.fmt == EXACT
    out = []
    engine.select_on_join = False
    engine.prefill()
    a = engine.adapter  # verification captures the verifier's queries, as re-selection does
    reselect = torch.zeros(a.num_layers, len(lens), a.num_q_heads, 1, a.head_dim, dtype=engine.dense.k.dtype)
    with torch.inference_mode(), attention_routed(model):
        s = engine.slots
        col = s.dense_len[: s.n]
        q_cols = col.unsqueeze(1) + torch.arange(t)
        span = int(col.max()) + t
        masks, sliding = runner.masks(s.lo[: s.n], q_cols, span)
        for use, moved in ((None, 0), (exact, shift)):
            runner.exact = use
            uniform = len(lens) == 1
            plan = ForwardPlan(buffer=engine.dense_view(), write_col=None if uniform else col,
                               write_col_int=int(col[0]) if uniform else None, q_len=t, span=span, mask=masks,
                               mask_sliding=sliding, window=runner.window,
                               capture=lambda i, q: reselect[i].copy_(q[:, :, :1]))
            logits = runner.forward(plan, engine.cache, block, q_cols - s.lo[: s.n].unsqueeze(1) + moved, True)
            out.append((logits, reselect.clone()))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", FULL_ATTENTION_ARCHS + SLIDING_ARCHS)
def test_exact_forward_is_bit_identical(arch, dtype):
    model = build_model(arch, seed=11).to(dtype)
    # A left-padded batch with a verify block of 4, and batch 1 with a single-token step.
    for lens, t in (([180, 120], 4), ([150], 1)):
        (ref, ref_q), (got, got_q) = _both(model, lens, t)
        assert torch.equal(ref, got), f"{arch} {dtype} lens {lens}: max diff {(ref - got).abs().max()}"
        assert torch.equal(ref_q, got_q)  # the queries re-selection reads


@pytest.mark.parametrize("arch", FULL_ATTENTION_ARCHS)
def test_exact_check_catches_a_position_error(arch):
    """Control: the same comparison fails when the exact forward's positions are off by one."""
    model = build_model(arch, seed=11)
    (ref, _), (got, _) = _both(model, [180, 120], 4, shift=1)
    assert not torch.equal(ref, got)


def test_engine_routes_decode_passes_through_the_exact_forward(llama, monkeypatch):
    engine, _ = _run(llama, [40])
    seen = []
    original = LeanDecoder.__call__

    def spy(self, ids, positions, all_logits):
        seen.append((self.fmt, tuple(ids.shape)))
        return original(self, ids, positions, all_logits)

    monkeypatch.setattr(LeanDecoder, "__call__", spy)
    engine.prefill()
    with torch.inference_mode(), attention_routed(llama):
        engine.chooser.refresh()
        engine.drafter.draft(2, engine.chooser)
        engine.runner.verify(engine.dense_view(), engine.cache, engine.slots, torch.zeros(1, 4, dtype=torch.long))
    assert seen == [(EXACT, (1, 1)), (EXACT, (1, 1)), (EXACT, (1, 4))]  # prefill keeps the model's forward


def test_exact_forward_is_only_for_supported_models():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).eval()
    assert not supports_exact(gpt2)
    gelu_llama = build_model("llama", hidden_act="gelu")
    assert not supports_exact(gelu_llama)  # other activations keep the model's own forward
    with pytest.raises(ValueError, match="not a Llama-style"):
        LeanDecoder(gpt2, EXACT)


def test_exact_forward_owns_no_weights(llama):
    exact = lean_decoder(llama, EXACT)
    assert exact.nbytes() == 0
    assert exact.layers[0].qkv.linears[0][0] is llama.model.layers[0].self_attn.q_proj.weight


def test_cached_forwards_follow_changed_weights():
    """A weight copy made before the model's weights change is rebuilt, not reused."""
    model = build_model("llama", seed=3)
    int8 = make_drafter(model, "int8")[1]
    assert make_drafter(model, "int8")[1] is int8  # cached while nothing changes
    bf16 = make_drafter(model, torch.bfloat16)[1]
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(2)
    assert make_drafter(model, "int8")[1] is not int8
    assert make_drafter(model, torch.bfloat16)[1] is not bf16
