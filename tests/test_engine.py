"""The request-level engine: rows join and leave a running batch, and every request's output is
what ``model.generate`` gives for that request alone.

Requests arrive while others decode (staggered), with different prompt lengths, ``max_new_tokens``,
EOS ids, processors and sampling settings, on the tiny text models of every family (these tests)
and on Video-LLM families (``test_engine_vision.py``). Greedy requests are compared token for token
with ``model.generate(do_sample=False)`` run on that request alone. Seeded sampled requests are
compared with the same request decoded densely, alone (the per-position noise makes a seeded
sample independent of the schedule), and their distribution with the exact one. Planted bugs (a
joining row that keeps a stale slot's length, noise that ignores the position) must be caught.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch
from conftest import FULL_ATTENTION_ARCHS, FIRST_TOKEN, PAD_ID, SLIDING_ARCHS, VOCAB, build_model

import sparse2dense
import sparse2dense.slots
from sparse2dense import AdmissionError, Engine, StdConfig


def prompt(gen, n):
    return torch.randint(FIRST_TOKEN, VOCAB, (n,), generator=gen)


def alone(model, ids, max_new, **kw):
    """Reference: greedy ``model.generate`` on this one request."""
    out = model.generate(ids.view(1, -1), attention_mask=torch.ones(1, ids.numel(), dtype=torch.long),
                         max_new_tokens=max_new, do_sample=False, pad_token_id=PAD_ID, **kw)
    return out[0, ids.numel():].tolist()


def staggered(engine, requests, every=1, steps_between=1):
    """Submit ``requests`` (dicts of submit() arguments) one every ``every`` submissions, stepping the
    engine ``steps_between`` times in between, then run to the end. Returns the handles."""
    handles = []
    for i, req in enumerate(requests):
        handles.append(engine.submit(**req))
        if (i + 1) % every == 0:
            for _ in range(steps_between):
                engine.step()
    engine.run()
    return handles


def trimmed(tokens, eos):
    """``generate``'s row up to and including its first EOS (it pads after it)."""
    return tokens[: tokens.index(eos) + 1] if eos is not None and eos in tokens else tokens


CASES = [(260, 20), (90, 31), (400, 12), (150, 25), (60, 18), (330, 9), (200, 27)]


@pytest.mark.parametrize("arch", FULL_ATTENTION_ARCHS + SLIDING_ARCHS)
@pytest.mark.parametrize("gamma", [0, 4, "auto"])
def test_staggered_arrivals_equal_generate_alone(tiny_model, arch, gamma):
    model = tiny_model(arch)
    gen = torch.Generator().manual_seed(7)
    reqs = [dict(input_ids=prompt(gen, n), max_new_tokens=k) for n, k in CASES]
    engine = Engine(model, max_batch=3, budget="auto" if gamma == "auto" else 24, gamma=gamma, max_seq_len=512)
    handles = staggered(engine, reqs, every=2, steps_between=2)
    for h, req in zip(handles, reqs):
        assert h.done and h.finish_reason == "length"
        assert h.tokens == alone(model, req["input_ids"], req["max_new_tokens"]), (arch, h)
    rows = [r[0] for r in engine.stats.round_log]
    assert max(rows) == 3 and min(rows) < 3, "the batch must fill up and drain"
    assert engine.stats.compactions > 0
    if gamma == 4:
        assert engine.stats.drafted > 0 and 0 < engine.stats.accepted < engine.stats.drafted


def test_rows_stopping_at_their_own_eos(llama):
    gen = torch.Generator().manual_seed(11)
    reqs, refs = [], []
    for n, k in CASES[:5]:
        ids = prompt(gen, n)
        plain = alone(llama, ids, k)
        eos = plain[min(3 + n % 5, k - 1)]
        reqs.append(dict(input_ids=ids, max_new_tokens=k, eos_token_id=eos))
        refs.append(trimmed(alone(llama, ids, k, eos_token_id=eos), eos))
    engine = Engine(llama, max_batch=2, budget=24, gamma=5, max_seq_len=512)
    handles = staggered(engine, reqs)
    for h, ref, req in zip(handles, refs, reqs):
        assert h.tokens == ref
        assert h.finish_reason == ("stop" if ref[-1] == req["eos_token_id"] else "length")
        assert h.stats.new_tokens == len(ref)


def test_a_row_joins_as_another_leaves(llama, monkeypatch):
    """A fills slot 0, B slot 1; B finishes first and its slot is taken by C, which arrives in the
    round B leaves. C must decode from its own prompt, not from B's leftovers."""
    gen = torch.Generator().manual_seed(3)
    a, b, c = prompt(gen, 300), prompt(gen, 280), prompt(gen, 120)
    engine = Engine(llama, max_batch=2, budget=24, gamma=3, max_seq_len=512)
    ha = engine.submit(a, max_new_tokens=40)
    hb = engine.submit(b, max_new_tokens=6)
    while not hb.done:
        engine.step()
    assert engine.slots.rows[1][0].handles[0] is hb  # B's slot, now a hole
    hc = engine.submit(c, max_new_tokens=20)
    engine.step()
    assert engine.slots.rows[1][0].handles[0] is hc, "C takes the slot B left"
    engine.run()
    assert ha.tokens == alone(llama, a, 40)
    assert hb.tokens == alone(llama, b, 6)
    assert hc.tokens == alone(llama, c, 20)


def _stale_length_place(real):
    def place(self, group, start, candidates, keep, offsets):
        stale = self.dense_len[start : start + group.size].clone()
        real(self, group, start, candidates, keep, offsets)
        self.dense_len[start : start + group.size] = torch.maximum(stale, self.dense_len[start : start + group.size])
    return place


def test_planted_bug_a_joining_row_with_a_stale_length_is_caught(llama, monkeypatch):
    """The control for the tests above: a joining row that keeps the longer committed length its slot
    had (a bug a slot table could have) reads the previous row's K/V, and its output changes."""
    gen = torch.Generator().manual_seed(5)
    first, second = prompt(gen, 400), prompt(gen, 100)

    def run():
        engine = Engine(llama, max_batch=1, budget=24, gamma=3, max_seq_len=512)
        h1 = engine.submit(first, max_new_tokens=10)
        h2 = engine.submit(second, max_new_tokens=16)
        engine.run()
        return h1.tokens, h2.tokens

    ref1, ref2 = alone(llama, first, 10), alone(llama, second, 16)
    assert run() == (ref1, ref2)
    monkeypatch.setattr(sparse2dense.slots.Slots, "place", _stale_length_place(sparse2dense.slots.Slots.place))
    got1, got2 = run()
    assert got1 == ref1 and got2 != ref2


def test_per_request_processors_and_settings(llama):
    """Rows with their own logits processors (repetition penalty), EOS and lengths share a batch."""
    gen = torch.Generator().manual_seed(21)
    reqs, refs = [], []
    for i, (n, k) in enumerate(CASES[:4]):
        ids = prompt(gen, n)
        kw = {"repetition_penalty": 1.4} if i % 2 else {}
        reqs.append(dict(input_ids=ids, max_new_tokens=k, **kw))
        refs.append(alone(llama, ids, k, **kw))
    engine = Engine(llama, max_batch=4, budget=24, gamma=4, max_seq_len=512)
    handles = staggered(engine, reqs)
    assert [h.tokens for h in handles] == refs


def _sampled(n, k, seed, **kw):
    return dict(max_new_tokens=k, do_sample=True, seed=seed, **kw)


def test_mixed_greedy_and_seeded_sampled_rows():
    """Sampled rows with a seed give exactly the tokens of the same request decoded densely alone
    (schedule-independent noise); greedy rows in the same batch stay generate's. The model is the
    peaked one of test_sampling.py, where the sparse drafter is often wrong."""
    from test_sampling import CFG, peaked_model

    model = peaked_model("qwen2", seed=3)
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, 8, (n,), generator=gen) for n, _ in CASES]
    settings = [{}, {"temperature": 0.8, "top_p": 0.9}, {}, {"temperature": 1.2, "top_k": 4}, {"min_p": 0.05},
                {}, {"temperature": 0.7}]
    reqs = []
    for i, ((n, k), ids, st) in enumerate(zip(CASES, prompts, settings)):
        reqs.append(dict(input_ids=ids, **(_sampled(n, k, 100 + i, **st) if st else dict(max_new_tokens=k))))
    engine = Engine(model, max_batch=3, config=CFG, max_seq_len=512)
    handles = staggered(engine, reqs, every=2)
    for h, req in zip(handles, reqs):
        if req.get("do_sample"):
            ref_engine = Engine(model, max_batch=1, gamma=0, max_seq_len=512)
            ref = ref_engine.submit(**req)
            ref_engine.run()
            assert h.tokens == ref.tokens
        else:
            assert h.tokens == alone(model, req["input_ids"], req["max_new_tokens"])
    sampled = [h for h, r in zip(handles, reqs) if r.get("do_sample")]
    assert sum(h.stats.drafted for h in sampled) > sum(h.stats.accepted for h in sampled) > 0, \
        "the drafter must be sometimes right and sometimes wrong"


def test_a_seed_reproduces_and_different_seeds_differ(tiny_model):
    model = tiny_model("llama")
    ids = prompt(torch.Generator().manual_seed(1), 200)
    outs = []
    for seed, gamma, batch in ((5, 4, 2), (5, 0, 1), (6, 4, 2)):
        engine = Engine(model, max_batch=batch, budget=24, gamma=gamma, max_seq_len=512)
        other = engine.submit(prompt(torch.Generator().manual_seed(2), 150), max_new_tokens=30)
        h = engine.submit(ids, max_new_tokens=30, do_sample=True, seed=seed)
        engine.run()
        assert other.done
        outs.append(h.tokens)
    assert outs[0] == outs[1] and outs[0] != outs[2]


def test_cancel_running_and_waiting_requests(llama):
    gen = torch.Generator().manual_seed(4)
    a, b, c = prompt(gen, 200), prompt(gen, 150), prompt(gen, 100)
    engine = Engine(llama, max_batch=1, budget=24, gamma=3, max_seq_len=512)
    ha, hb, hc = (engine.submit(p, max_new_tokens=30) for p in (a, b, c))
    engine.step()
    engine.step()
    engine.cancel(ha)  # running
    engine.cancel(hb)  # still waiting (the batch holds one row)
    engine.run()
    assert (ha.finish_reason, hb.finish_reason) == ("cancelled", "cancelled")
    assert ha.done and hb.done and hb.tokens == []
    assert ha.tokens == alone(llama, a, 30)[: len(ha.tokens)] and len(ha.tokens) < 30
    assert hc.tokens == alone(llama, c, 30)


def test_requests_that_cannot_fit_are_refused_and_others_go_on(llama):
    gen = torch.Generator().manual_seed(6)
    engine = Engine(llama, max_batch=2, budget=24, gamma=3, max_seq_len=300, max_new_tokens=40)
    ok_ids = prompt(gen, 200)
    ok = engine.submit(ok_ids, max_new_tokens=30)
    engine.step()
    with pytest.raises(AdmissionError, match="max_seq_len=300"):
        engine.submit(prompt(gen, 290), max_new_tokens=20)
    with pytest.raises(AdmissionError, match="max_new_tokens=40"):
        engine.submit(prompt(gen, 10), max_new_tokens=41)
    with pytest.raises(AdmissionError, match="context of 4096"):
        Engine(llama, max_batch=1, max_seq_len=4096).submit(prompt(gen, 4000), max_new_tokens=200)
    for bad, match in ((dict(input_ids=torch.ones(2, 5, dtype=torch.long)), "one request"),
                       (dict(input_ids=torch.ones(5)), "integer tensor"),
                       (dict(input_ids=prompt(gen, 5), max_new_tokens=0), "positive integer"),
                       (dict(input_ids=prompt(gen, 5), do_sample=True, temperature=0), "temperature"),
                       (dict(input_ids=prompt(gen, 5), do_sample=True, seed="x"), "seed"),
                       (dict(input_ids=prompt(gen, 5), stop_strings=["x"]), "tokenizer")):
        with pytest.raises(ValueError, match=match):
            engine.submit(**{"max_new_tokens": 4, **bad})
    engine.run()
    assert ok.tokens == alone(llama, ok_ids, 30)


def test_refused_request_leaves_running_rows_exact(llama):
    gen = torch.Generator().manual_seed(8)
    ids = prompt(gen, 250)
    engine = Engine(llama, max_batch=2, budget=24, gamma=3, max_seq_len=300)
    h = engine.submit(ids, max_new_tokens=40)
    engine.step()
    with pytest.raises(AdmissionError):
        engine.submit(prompt(gen, 299), max_new_tokens=5)
    engine.run()
    assert h.tokens == alone(llama, ids, 40)


def test_buffers_never_grow_and_a_join_copies_nobody(llama, monkeypatch):
    """Buffers are allocated once; a row that joins while others decode moves no other row's K/V."""
    gen = torch.Generator().manual_seed(12)
    engine = Engine(llama, max_batch=3, budget=24, gamma=4, max_seq_len=512)
    ptrs = (engine.dense.k.data_ptr(), engine.drafter.buffer.k.data_ptr())
    first = engine.submit(prompt(gen, 300), max_new_tokens=30)
    engine.step()
    engine.step()
    before = engine.dense.k[:, 0, :, :300].clone()
    moves = []
    monkeypatch.setattr(sparse2dense.engine, "_move_row", lambda *a: moves.append(a))
    engine.submit(prompt(gen, 100), max_new_tokens=10)
    engine.step()
    assert engine.slots.n == 2 and moves == []
    assert torch.equal(engine.dense.k[:, 0, :, :300], before)
    monkeypatch.undo()
    for n, k in CASES:
        engine.submit(prompt(gen, n), max_new_tokens=k)
    engine.run()
    assert first.done
    assert (engine.dense.k.data_ptr(), engine.drafter.buffer.k.data_ptr()) == ptrs


def test_callbacks_and_streamers_see_every_token_once(llama):
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.tokens, self.ended = [], False

        def put(self, value):
            self.tokens += value.flatten().tolist()

        def end(self):
            self.ended = True

    gen = torch.Generator().manual_seed(13)
    seen: dict[int, list[int]] = {}
    streamers = [Collect() for _ in range(3)]
    engine = Engine(llama, max_batch=2, budget=24, gamma=4, max_seq_len=512)
    reqs = [dict(input_ids=prompt(gen, n), max_new_tokens=k, streamer=s,
                 callback=lambda h, new: seen.setdefault(h.id, []).extend(new))
            for (n, k), s in zip(CASES[:3], streamers)]
    handles = staggered(engine, reqs)
    for h, s in zip(handles, streamers):
        assert seen[h.id] == h.tokens == s.tokens and s.ended


def test_concurrent_submitters(llama):
    """Requests submitted from other threads while a loop thread steps the engine."""
    gen = torch.Generator().manual_seed(14)
    reqs = [(prompt(gen, n), k) for n, k in CASES * 2]
    engine = Engine(llama, max_batch=4, budget=24, gamma="auto", max_seq_len=512)
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            if engine.pending():
                engine.step()
            else:
                time.sleep(0.001)

    worker = threading.Thread(target=loop)
    worker.start()
    handles = [None] * len(reqs)

    def client(indices):
        rng = random.Random(indices[0])
        for i in indices:
            time.sleep(rng.random() * 0.02)
            handles[i] = engine.submit(reqs[i][0], max_new_tokens=reqs[i][1])

    clients = [threading.Thread(target=client, args=(list(range(j, len(reqs), 3)),)) for j in range(3)]
    for t in clients:
        t.start()
    for t in clients:
        t.join()
    deadline = time.time() + 120
    while not all(h.done for h in handles) and time.time() < deadline:
        time.sleep(0.01)
    stop.set()
    worker.join()
    for h, (ids, k) in zip(handles, reqs):
        assert h.tokens == alone(llama, ids, k)


def test_engine_settings_are_validated(llama):
    for kwargs, match in ((dict(max_batch=0), "max_batch"), (dict(max_seq_len=5000), "context of 4096"),
                          (dict(gamma=-1), "gamma"), (dict(budget=0), "budget"),
                          (dict(prefill_tokens_per_step=0), "prefill_tokens_per_step")):
        with pytest.raises(ValueError, match=match):
            Engine(llama, **kwargs)
    engine = Engine(llama, max_batch=2, config=StdConfig(budget=16, gamma=2), max_seq_len=256)
    assert engine.cfg.budget == 16 and engine.max_new_tokens == 256


def test_generate_is_a_batch_through_the_engine(llama, monkeypatch):
    """generate() runs its batch as one group of an Engine sized for it."""
    made = []
    real = Engine.__init__

    def spy(self, *a, **kw):
        made.append(kw)
        real(self, *a, **kw)

    monkeypatch.setattr(Engine, "__init__", spy)
    ids = torch.randint(FIRST_TOKEN, VOCAB, (3, 64), generator=torch.Generator().manual_seed(1))
    sparse2dense.generate(llama, ids, max_new_tokens=5, budget=8, gamma=2)
    assert made and made[0]["max_batch"] == 3 and made[0]["max_seq_len"] == 64 + 5


def test_a_fresh_model_per_architecture_decodes_alike():
    """Not only the cached fixtures: a model built here (different weights) passes too."""
    model = build_model("qwen3", seed=4)
    gen = torch.Generator().manual_seed(15)
    reqs = [dict(input_ids=prompt(gen, n), max_new_tokens=k) for n, k in CASES[:4]]
    engine = Engine(model, max_batch=2, budget=24, gamma=4, max_seq_len=512)
    for h, r in zip(staggered(engine, reqs), reqs):
        assert h.tokens == alone(model, r["input_ids"], r["max_new_tokens"])
