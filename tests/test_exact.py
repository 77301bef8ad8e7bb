"""The exact lean forward: decode-time passes at the model's own precision (verification, dense steps,
drafting with the model's weights) run :class:`~sparse2dense.lean.LeanDecoder` in format ``"model"``
on Llama, Mistral, Qwen2 and Qwen3. It must give the model's logits bit for bit, in every dtype, on
full-attention and sliding-window layers, or losslessness would rest on float luck.
"""

from __future__ import annotations

import pytest
import torch
from conftest import FULL_ATTENTION_ARCHS, SLIDING_ARCHS, VOCAB, build_model, make_batch

from sparse2dense import StdConfig
from sparse2dense.adapters import get_adapter
from sparse2dense.attention import attention_routed
from sparse2dense.drafter import make_drafter
from sparse2dense.engine import _Run
from sparse2dense.kv import ForwardPlan
from sparse2dense.lean import EXACT, LeanDecoder, lean_decoder, supports_exact


def _run(model, lens, reselect=False):
    gen = torch.Generator().manual_seed(5)
    ids, mask = make_batch(gen, lens)
    cfg = StdConfig(budget=100000, gamma=4)
    run = _Run(model, get_adapter(model), cfg, ids, mask, 8, [], 0, None, None, None, None, {}, None)
    if reselect:  # have verification capture the verifier's queries, as re-selection does
        a = run.adapter
        n_q = model.config.num_attention_heads
        run.reselect_queries = torch.zeros(a.num_layers, len(lens), n_q, 1, a.head_dim, dtype=run.dense.k.dtype)
    return run, torch.randint(3, VOCAB, (len(lens), 4), generator=gen)


def _both(model, lens, t, shift=0):
    """Verification logits (and captured queries) of a ``t``-token block through the model's forward
    and through the exact forward (``shift`` moves the exact forward's positions: a deliberate bug)."""
    run, block = _run(model, lens, reselect=True)
    block = block[:, :t]
    exact = run.exact
    assert isinstance(exact, LeanDecoder) and exact.fmt == EXACT
    out = []
    with torch.inference_mode(), attention_routed(model):
        run.prefill()
        col = run.dense_len
        q_cols = col.unsqueeze(1) + torch.arange(t)
        span = int(col.max()) + t
        masks, sliding = run._masks(run.pad, q_cols, span)
        for use, moved in ((None, 0), (exact, shift)):
            run.exact = use
            uniform = len(lens) == 1
            plan = ForwardPlan(buffer=run.dense, write_col=None if uniform else col,
                               write_col_int=int(col[0]) if uniform else None, q_len=t, span=span, mask=masks,
                               mask_sliding=sliding, window=run.window, capture=run._capture_last_query)
            logits = run._forward(plan, block, q_cols - run.pad.unsqueeze(1) + moved, True)
            out.append((logits, run.reselect_queries.clone()))
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
    run, _ = _run(llama, [40])
    seen = []
    original = LeanDecoder.__call__

    def spy(self, ids, positions, all_logits):
        seen.append((self.fmt, tuple(ids.shape)))
        return original(self, ids, positions, all_logits)

    monkeypatch.setattr(LeanDecoder, "__call__", spy)
    with torch.inference_mode(), attention_routed(llama):
        run.prefill()
        run.select()
        run._draft(2)
        run._verify(torch.zeros(1, 3, dtype=torch.long))
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
