"""Lossless sampling: StD's output distribution equals dense sampling's, measured against the
exact distribution.

The model is tiny (vocabulary 8) with weights scaled up so that its attention is peaked: the
sparse drafter then differs clearly from the dense model (about half of the drafts are rejected),
and verification has real work to do. For a short prompt, the exact distribution of the first two
generated tokens (64 outcomes) and of the third token (8 outcomes) is computed by running the
dense model on every prefix with the same logits processors that generation uses. A chi-square
goodness-of-fit test then compares thousands of StD samples (one batch, one row per sample) with it.

The test of the test replaces the acceptance rule with a plausible wrong one and checks that the
same comparison rejects it decisively.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import sparse2dense
import sparse2dense.engine

VOCAB = 8
PROMPT_LEN = 80
N_SAMPLES = 3000
CFG = sparse2dense.StdConfig(budget=6, gamma=3, keep_last=2, sink_tokens=1)


def peaked_model(kind: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  initializer_range=0.3)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common)).eval()
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return model


@pytest.fixture(scope="module")
def model():
    return peaked_model()


def prompt(seed: int = 5) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(seed))


def processors(model, ids, **settings):
    gen_cfg = copy.deepcopy(model.generation_config)
    gen_cfg.do_sample = True
    for k, v in settings.items():
        setattr(gen_cfg, k, v)
    return model._get_logits_processor(generation_config=gen_cfg, input_ids_seq_length=ids.shape[1],
                                       encoder_input_ids=ids, logits_processor=None, device="cpu", model_kwargs={})


@torch.no_grad()
def exact_distributions(model, ids, **settings):
    """Exact P(t1, t2) ``[V, V]`` and P(t3) ``[V]`` of dense sampling with these settings."""
    procs = processors(model, ids, **settings)

    def next_probs(prefixes):
        logits = model(prefixes).logits[:, -1].float()
        return torch.softmax(procs(prefixes, logits), dim=-1)

    p1 = next_probs(ids)[0]  # [V]
    pre2 = torch.cat([ids.repeat(VOCAB, 1), torch.arange(VOCAB).unsqueeze(1)], dim=1)
    p2 = next_probs(pre2)  # [V(t1), V(t2)]
    joint12 = p1.unsqueeze(1) * p2
    t1, t2 = torch.meshgrid(torch.arange(VOCAB), torch.arange(VOCAB), indexing="ij")
    pre3 = torch.cat([ids.repeat(VOCAB * VOCAB, 1), t1.reshape(-1, 1), t2.reshape(-1, 1)], dim=1)
    p3 = next_probs(pre3)  # [V*V, V]
    marg3 = (joint12.reshape(-1, 1) * p3).sum(dim=0)
    return joint12.double(), marg3.double()


def chi_square_pvalue(observed: torch.Tensor, expected_probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson goodness-of-fit p-value; cells with small expectation are pooled into one."""
    observed = observed.double().flatten()
    expected = expected_probs.flatten() * observed.sum()
    small = expected < min_expected
    if bool(small.any()):
        observed = torch.cat([observed[~small], observed[small].sum().view(1)])
        expected = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = expected > 0
    if bool((observed[~keep] > 0).any()):
        return 0.0  # an outcome with probability zero occurred
    observed, expected = observed[keep], expected[keep]
    stat = ((observed - expected) ** 2 / expected).sum()
    df = observed.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), stat / 2.0))


def sample_std(model, ids, n=N_SAMPLES, seed=0, **settings):
    torch.manual_seed(seed)
    batch = ids.repeat(n, 1)
    out = sparse2dense.generate(model, batch, max_new_tokens=3, config=CFG, do_sample=True, **settings)
    return out.sequences[:, PROMPT_LEN:], out.stats


def goodness_of_fit(model, ids, samples, **settings):
    joint12, marg3 = exact_distributions(model, ids, **settings)
    counts12 = torch.bincount(samples[:, 0] * VOCAB + samples[:, 1], minlength=VOCAB * VOCAB)
    counts3 = torch.bincount(samples[:, 2], minlength=VOCAB)
    return chi_square_pvalue(counts12, joint12), chi_square_pvalue(counts3, marg3)


SETTINGS = [
    {},  # transformers' defaults: temperature 1, top_k 50 (no-op with 8 tokens)
    {"temperature": 0.7, "top_p": 0.9},
    {"temperature": 1.3, "top_k": 4},
    {"temperature": 0.9, "repetition_penalty": 1.5},
    {"min_p": 0.1},
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "default")
def test_distribution_matches_dense_sampling(model, settings):
    ids = prompt()
    samples, stats = sample_std(model, ids, **settings)
    assert stats.drafted > 0 and stats.acceptance_rate < 0.95, "the drafter must differ from dense here"
    p12, p3 = goodness_of_fit(model, ids, samples, **settings)
    assert p12 > 1e-3 and p3 > 1e-3, (p12, p3)


def test_distribution_with_left_padded_mixed_batch():
    """Two different prompts of different lengths in one left-padded batch, Qwen2."""
    model = peaked_model("qwen2", seed=3)
    a, b = prompt(11), prompt(12)[:, 20:]
    n = 1500
    ids = torch.zeros(2 * n, PROMPT_LEN, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[:n], mask[:n] = a, 1
    ids[n:, 20:], mask[n:, 20:] = b, 1
    torch.manual_seed(7)
    out = sparse2dense.generate(model, ids, mask, max_new_tokens=3, config=CFG, do_sample=True, temperature=0.8)
    for rows, p in ((slice(0, n), a), (slice(n, 2 * n), b)):
        samples = out.sequences[rows, PROMPT_LEN:]
        p12, p3 = goodness_of_fit(model, p, samples, temperature=0.8)
        assert p12 > 1e-3 and p3 > 1e-3, (p12, p3)


def test_the_test_rejects_a_wrong_acceptance_rule(model, monkeypatch):
    """Accepting every draft (sampling from the drafter) must be caught by the same comparison."""
    from sparse2dense.acceptance import speculative_sample

    def accept_everything(draft, q, p, generator=None):
        n, _ = speculative_sample(draft, q, p, generator)
        g = draft.shape[1]
        bonus = torch.multinomial(p[:, g], 1, generator=generator).squeeze(1)
        return torch.full_like(n, g), bonus

    monkeypatch.setattr(sparse2dense.engine, "speculative_sample", accept_everything)
    ids = prompt()
    samples, _ = sample_std(model, ids)
    p12, p3 = goodness_of_fit(model, ids, samples)
    assert min(p12, p3) < 1e-6, (p12, p3)


def test_the_test_rejects_resampling_from_p_instead_of_the_residual(model, monkeypatch):
    """A subtler bug: on rejection, drawing from p instead of max(0, p - q) biases the output."""
    from sparse2dense.acceptance import speculative_sample

    def wrong_residual(draft, q, p, generator=None):
        n, nxt = speculative_sample(draft, q, p, generator)
        rows = torch.arange(draft.shape[0])
        redraw = torch.multinomial(p[rows, n], 1, generator=generator).squeeze(1)
        return n, torch.where(n < draft.shape[1], redraw, nxt)

    monkeypatch.setattr(sparse2dense.engine, "speculative_sample", wrong_residual)
    ids = prompt()
    samples, _ = sample_std(model, ids, n=6000)
    p12, p3 = goodness_of_fit(model, ids, samples)
    assert min(p12, p3) < 1e-4, (p12, p3)


def test_same_seed_same_output(model):
    ids = prompt().repeat(4, 1)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(sparse2dense.generate(model, ids, max_new_tokens=10, config=CFG, do_sample=True).sequences)
    assert torch.equal(runs[0], runs[1])
    gen_runs = [sparse2dense.generate(model, ids, max_new_tokens=10, config=CFG, do_sample=True,
                                      generator=torch.Generator().manual_seed(9)).sequences for _ in range(2)]
    assert torch.equal(gen_runs[0], gen_runs[1])


def test_custom_generate_sampling_is_seeded_and_valid(model):
    ids = prompt().repeat(3, 1)
    outs = []
    for _ in range(2):
        torch.manual_seed(5)
        outs.append(model.generate(ids, max_new_tokens=8, do_sample=True, temperature=0.8, top_p=0.95,
                                   custom_generate=sparse2dense.custom_generate, std_config=CFG))
    assert torch.equal(outs[0], outs[1])
    assert outs[0].shape == (3, PROMPT_LEN + 8)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_top_k_1_is_greedy(kind):
    model = peaked_model(kind, seed=1)
    ids = torch.randint(0, VOCAB, (3, 120), generator=torch.Generator().manual_seed(2))
    ref = model.generate(ids, max_new_tokens=12, do_sample=False)
    got = sparse2dense.generate(model, ids, max_new_tokens=12, config=CFG, do_sample=True, top_k=1)
    assert torch.equal(got.sequences, ref)
    via = model.generate(ids, max_new_tokens=12, do_sample=True, top_k=1, custom_generate=sparse2dense.custom_generate,
                         std_config=CFG)
    assert torch.equal(via, ref)


def test_speculative_sample_unit():
    """The rule itself on hand-made distributions."""
    from sparse2dense.acceptance import speculative_sample

    q = torch.tensor([[[0.5, 0.5, 0.0]]])
    p_same = torch.tensor([[[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]])
    n, nxt = speculative_sample(torch.tensor([[1]]), q, p_same)
    assert n.item() == 1 and nxt.item() == 2  # p == q: always accepted; bonus from p_2
    p_zero = torch.tensor([[[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]])
    n, nxt = speculative_sample(torch.tensor([[1]]), q, p_zero)
    assert n.item() == 0 and nxt.item() == 2  # p(d)=0: rejected; residual is all on token 2
    with pytest.raises(ValueError):
        speculative_sample(torch.tensor([[1]]), q, p_zero[:, :1])


@pytest.mark.parametrize("bad", [{"temperature": 0}, {"top_p": 1.5}, {"top_k": -1}, {"min_p": -0.1},
                                 {"repetition_penalty": 0}])
def test_bad_sampling_settings(model, bad):
    with pytest.raises(ValueError):
        sparse2dense.generate(model, prompt(), max_new_tokens=2, do_sample=True, **bad)
