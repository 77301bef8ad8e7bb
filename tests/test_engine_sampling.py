"""Seeded sampling in the engine draws from exactly dense sampling's distribution.

Each of thousands of requests (one seed each) samples three tokens on the peaked tiny model of
``test_sampling.py``, where the sparse drafter is often wrong; a chi-square test compares the
outcomes with the exact distribution computed from the dense model. The test of the test plants a
noise that ignores the token position (one Gumbel vector for every position), and the same
comparison must reject it.
"""

from __future__ import annotations

import pytest
import torch
from test_sampling import CFG, PROMPT_LEN, goodness_of_fit, peaked_model, prompt

import sparse2dense.tokens
from sparse2dense import Engine

N = 2000


def sample_engine(model, ids, n=N, **settings):
    engine = Engine(model, max_batch=32, config=CFG, max_seq_len=PROMPT_LEN + 8, prefill_tokens_per_step=2048)
    handles = [engine.submit(ids[0], max_new_tokens=3, do_sample=True, seed=1000 + i, **settings) for i in range(n)]
    engine.run()
    return torch.tensor([h.tokens for h in handles]), engine.stats


@pytest.fixture(scope="module")
def model():
    return peaked_model()


@pytest.mark.parametrize("settings", [{}, {"temperature": 0.7, "top_p": 0.9}, {"temperature": 1.3, "top_k": 4}],
                         ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "default")
def test_seeded_distribution_matches_dense_sampling(model, settings):
    ids = prompt()
    samples, stats = sample_engine(model, ids, **settings)
    assert stats.drafted > 0 and stats.accepted < stats.drafted, "the drafter must differ from dense here"
    p12, p3 = goodness_of_fit(model, ids, samples, **settings)
    assert p12 > 1e-3 and p3 > 1e-3, (p12, p3)


def test_the_test_rejects_noise_that_ignores_the_position(model, monkeypatch):
    real = sparse2dense.tokens.gumbel_noise
    monkeypatch.setattr(sparse2dense.tokens, "gumbel_noise", lambda seed, index, vocab: real(seed, 0, vocab))
    ids = prompt()
    samples, _ = sample_engine(model, ids)
    p12, p3 = goodness_of_fit(model, ids, samples)
    assert min(p12, p3) < 1e-6, (p12, p3)
