"""The lossless proof: Sparse-to-Dense output == ``model.generate(do_sample=False)``, token for token.

Every test compares against plain greedy ``model.generate`` on tiny fp32 random-weight models of
each supported family. The small-budget cases also check that the drafter really was sparse and was
sometimes wrong (otherwise the comparison would prove nothing), and one mutation test checks that
this harness catches an engine that commits one token too many.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import FULL_ATTENTION_ARCHS, PAD_ID, SLIDING_ARCHS, VOCAB, hf_greedy, make_batch
from transformers import (
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer
from transformers.generation.utils import GenerateDecoderOnlyOutput

import sparse2dense
import sparse2dense.engine
from sparse2dense import StdConfig, StdStats
from sparse2dense.acceptance import greedy_accept

SINK, KEEP = 2, 8  # small kept set so that small budgets leave room for real selection


def cfg(budget, gamma, **kw):
    kw.setdefault("sink_tokens", SINK)
    kw.setdefault("keep_last", KEEP)
    return StdConfig(budget=budget, gamma=gamma, **kw)


def run_std(model, ids, mask, max_new_tokens, config, **kwargs):
    kwargs.setdefault("pad_token_id", PAD_ID)
    return sparse2dense.generate(model, ids, mask, max_new_tokens=max_new_tokens, config=config, **kwargs)


def run_custom(model, ids, mask, max_new_tokens, config, **kwargs):
    kwargs.setdefault("pad_token_id", PAD_ID)
    return model.generate(
        ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
        custom_generate=sparse2dense.custom_generate, std_config=config, **kwargs,
    )


def check_parity(model, ids, mask, max_new_tokens, config, both=True, **kwargs):
    """Assert both entry points reproduce ``model.generate``; return sparse2dense's StdOutput."""
    ref = hf_greedy(model, ids, mask, max_new_tokens, **kwargs)
    out = run_std(model, ids, mask, max_new_tokens, config, **kwargs)
    assert torch.equal(out.sequences, ref), describe(ref, out.sequences, ids.shape[1])
    if both:
        via_hf = run_custom(model, ids, mask, max_new_tokens, config, **kwargs)
        assert torch.equal(via_hf, ref), describe(ref, via_hf, ids.shape[1])
    return out


def describe(ref, got, prompt_len):
    if ref.shape != got.shape:
        return f"shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    rows = (ref != got).any(dim=1).nonzero().flatten().tolist()
    lines = []
    for r in rows[:3]:
        lines.append(f"row {r}: ref {ref[r, prompt_len:].tolist()}\n       got {got[r, prompt_len:].tolist()}")
    return "generated tokens differ\n" + "\n".join(lines)


def sweep(model, rng, gen, n_cases, batch_sizes, lens=(20, 600), budgets=(8, 16, 32, 64, 128, 100000),
          gammas=range(0, 13), max_news=(1, 2, 5, 17, 32), chunks=(16, 32, 2048)):
    """Random cases; returns (failures, stats of the passing ones)."""
    failures, stats = [], []
    for _ in range(n_cases):
        b = rng.choice(batch_sizes)
        row_lens = [rng.randint(*lens) for _ in range(b)]
        case = dict(lens=row_lens, budget=rng.choice(budgets), gamma=rng.choice(list(gammas)),
                    policy=rng.choice(["paper", "streaming"]), prefill_chunk=rng.choice(chunks),
                    max_new=rng.choice(max_news))
        ids, mask = make_batch(gen, row_lens)
        config = cfg(case["budget"], case["gamma"], policy=case["policy"], prefill_chunk=case["prefill_chunk"])
        try:
            out = check_parity(model, ids, mask, case["max_new"], config, both=rng.random() < 0.5)
        except AssertionError as exc:
            failures.append(f"{case}: {str(exc).splitlines()[0]}")
            continue
        except Exception as exc:  # noqa: BLE001 - collect every failing case, then fail once
            failures.append(f"{case}: {type(exc).__name__}: {exc}")
            continue
        stats.append((case, mask.sum(dim=1).tolist(), out.stats))
    return failures, stats


def assert_drafter_was_exercised(stats):
    """Over the small-budget cases: drafts were made, the drafter was sparse and sometimes wrong."""
    small = [(c, v, s) for c, v, s in stats if c["budget"] <= 64 and c["gamma"] > 0 and c["max_new"] > 2]
    assert small, "no small-budget case ran"
    assert all(s.drafted > 0 for _, _, s in small)
    assert any(s.acceptance_rate < 1.0 for _, _, s in small), "the sparse drafter never disagreed with dense"
    assert any(s.accepted > 0 for _, _, s in small), "the sparse drafter never agreed with dense"
    sparse_rows = 0
    for c, valid, s in small:
        assert s.n_selected == [expected_selected(v, c["budget"]) for v in valid], (c, s.n_selected, valid)
        sparse_rows += sum(sel < v for sel, v in zip(s.n_selected, valid))
    assert sparse_rows > 0, "the drafter never dropped a prompt entry"


def expected_selected(valid, budget, sink=SINK, keep_last=KEEP):
    """Prompt entries the drafter keeps for a row of ``valid`` tokens (text default candidates)."""
    n_keep = min(valid, sink + keep_last)
    n_cand = valid - n_keep
    return n_keep + min(max(budget - n_keep, 0), n_cand)


# --------------------------------------------------------------------------------- random sweeps
@pytest.mark.parametrize("arch", FULL_ATTENTION_ARCHS)
def test_random_sweep_batch_1(tiny_model, arch):
    model = tiny_model(arch)
    rng, gen = random.Random(f"b1-{arch}"), torch.Generator().manual_seed(11)
    failures, stats = sweep(model, rng, gen, n_cases=20, batch_sizes=[1])
    assert not failures, "\n".join(failures)
    assert_drafter_was_exercised(stats)


@pytest.mark.parametrize("arch", FULL_ATTENTION_ARCHS)
def test_random_sweep_left_padded_batches(tiny_model, arch):
    model = tiny_model(arch)
    rng, gen = random.Random(f"bn-{arch}"), torch.Generator().manual_seed(12)
    failures, stats = sweep(model, rng, gen, n_cases=10, batch_sizes=range(2, 9), lens=(20, 400))
    assert not failures, f"{len(failures)} failing case(s):\n" + "\n".join(failures)
    assert_drafter_was_exercised(stats)


# --------------------------------------------------------------------------------- targeted cases
@pytest.mark.parametrize("gamma", range(0, 13))
def test_every_gamma(llama, gamma):
    gen = torch.Generator().manual_seed(100 + gamma)
    drafted = []
    for length, budget in [(150, 16), (420, 8), (60, 100000)]:
        ids, mask = make_batch(gen, [length])
        out = check_parity(llama, ids, mask, 24, cfg(budget, gamma), both=budget == 16)
        assert len(out.stats.per_position_acceptance) == gamma
        drafted.append(out.stats.drafted)
    if gamma == 0:
        assert drafted == [0, 0, 0]
    else:
        assert all(d > 0 for d in drafted)


@pytest.mark.parametrize("arch", FULL_ATTENTION_ARCHS)
@pytest.mark.parametrize("budget", [8, 16, 48, 128])
def test_small_budgets_are_sparse_and_lossless(tiny_model, arch, budget):
    model = tiny_model(arch)
    gen = torch.Generator().manual_seed(budget)
    outs = []
    for length in (200, 350, 600):
        ids, mask = make_batch(gen, [length])
        out = check_parity(model, ids, mask, 32, cfg(budget, 6), both=length == 200)
        s = out.stats
        n_cand = length - SINK - KEEP
        assert s.n_candidates == [n_cand]
        assert s.n_selected == [expected_selected(length, budget)]
        assert s.n_selected[0] < length
        assert s.drafted > 0
        outs.append(s)
    assert any(s.acceptance_rate < 1.0 for s in outs), [s.acceptance_rate for s in outs]


@pytest.mark.parametrize("arch", FULL_ATTENTION_ARCHS)
def test_budget_larger_than_context_drafts_exactly_like_dense(tiny_model, arch):
    model = tiny_model(arch)
    gen = torch.Generator().manual_seed(3)
    for lens in ([37], [250], [510], [300, 90, 180]):
        ids, mask = make_batch(gen, lens)
        out = check_parity(model, ids, mask, 20, StdConfig(budget=100000, gamma=5), both=len(lens) == 1)
        assert out.stats.n_selected == mask.sum(dim=1).tolist()
        assert out.stats.drafted > 0
        assert out.stats.acceptance_rate == 1.0, out.stats.per_position_acceptance


@pytest.mark.parametrize("batch_size", range(1, 9))
def test_left_padding_of_different_lengths(llama, batch_size):
    gen = torch.Generator().manual_seed(batch_size)
    rng = random.Random(batch_size)
    lens = [rng.randint(30, 300) for _ in range(batch_size)]
    lens[0] = 300  # at least one long row; the others are padded by different amounts
    ids, mask = make_batch(gen, lens)
    out = check_parity(llama, ids, mask, 24, cfg(24, 5))
    assert out.stats.drafted > 0


@pytest.mark.parametrize("policy", ["paper", "streaming"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_policies(tiny_model, arch, policy):
    model = tiny_model(arch)
    gen = torch.Generator().manual_seed(5)
    rates = []
    for lens in ([300], [500], [260, 120]):
        ids, mask = make_batch(gen, lens)
        out = check_parity(model, ids, mask, 20, cfg(32, 4, policy=policy), both=len(lens) == 1)
        rates.append(out.stats.acceptance_rate)
    assert any(r < 1.0 for r in rates)


def test_policies_choose_different_entries(llama, monkeypatch):
    """The two policies are not accidentally the same selection."""
    import sparse2dense.selection as selection

    captured = {}
    real = selection.build_draft_cache

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        captured[args[6]] = result.buffer.k[:, :, :, : result.base].clone()
        return result

    monkeypatch.setattr(sparse2dense.engine, "build_draft_cache", spy)
    ids, mask = make_batch(torch.Generator().manual_seed(8), [400])
    for policy in ("paper", "streaming"):
        run_std(llama, ids, mask, 4, cfg(32, 3, policy=policy))
    assert set(captured) == {"paper", "streaming"}
    assert not torch.equal(captured["paper"], captured["streaming"])


@pytest.mark.parametrize("arch", SLIDING_ARCHS)
@pytest.mark.parametrize("gamma", [0, 4])
def test_sliding_window_models(tiny_model, arch, gamma):
    model = tiny_model(arch)
    gen = torch.Generator().manual_seed(21)
    for lens, chunk in (([300], 2048), ([200], 32), ([260, 100, 30], 16), ([45], 16)):
        ids, mask = make_batch(gen, lens)
        check_parity(model, ids, mask, 24, cfg(24, gamma, prefill_chunk=chunk), both=lens == [300])


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 5, 9])
@pytest.mark.parametrize("lens", [[200], [200, 80, 150]])
def test_max_new_tokens_smaller_than_gamma(llama, max_new_tokens, lens):
    gen = torch.Generator().manual_seed(max_new_tokens)
    ids, mask = make_batch(gen, lens)
    out = check_parity(llama, ids, mask, max_new_tokens, cfg(16, 9))
    assert out.sequences.shape == (len(lens), ids.shape[1] + max_new_tokens)
    assert out.stats.new_tokens == len(lens) * max_new_tokens
    if max_new_tokens == 1:
        assert out.stats.drafted == 0 and out.stats.rounds == 0


@pytest.mark.parametrize("chunk", [16, 32, 100])
@pytest.mark.parametrize("policy", ["paper", "streaming"])
def test_chunked_prefill(tiny_model, chunk, policy):
    for arch in ("llama", "qwen2"):
        model = tiny_model(arch)
        gen = torch.Generator().manual_seed(chunk)
        for lens in ([333], [333, 170, 64]):
            ids, mask = make_batch(gen, lens)
            out = check_parity(model, ids, mask, 16, cfg(32, 5, policy=policy, prefill_chunk=chunk),
                               both=len(lens) > 1)
            assert out.stats.drafted > 0


def test_chunked_prefill_scores_like_one_pass(llama, monkeypatch):
    """The paper policy picks the same entries whether the prompt is prefilled in one or many chunks."""
    captured = []
    real = sparse2dense.engine.build_draft_cache

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        captured.append(result.buffer.k[:, :, :, : result.base].clone())
        return result

    monkeypatch.setattr(sparse2dense.engine, "build_draft_cache", spy)
    ids, mask = make_batch(torch.Generator().manual_seed(9), [400, 250])
    for chunk in (2048, 16):
        run_std(llama, ids, mask, 3, cfg(40, 2, prefill_chunk=chunk, max_score_queries=5))
    assert torch.allclose(captured[0], captured[1], atol=1e-5)


def test_context_mask_chooses_candidates(llama):
    gen = torch.Generator().manual_seed(4)
    ids, mask = make_batch(gen, [300, 200])
    context = torch.zeros_like(mask, dtype=torch.bool)
    context[:, 120:260] = True  # only these may be dropped (row 1 starts at column 100)
    config = cfg(8, 5)
    ref = hf_greedy(llama, ids, mask, 20)
    out = run_std(llama, ids, mask, 20, config, context_mask=context)
    assert torch.equal(out.sequences, ref)
    assert out.stats.n_candidates == [140, 140]
    assert out.stats.n_selected == [300 - 140, 200 - 140]
    via_hf = run_custom(llama, ids, mask, 20, config, context_mask=context)
    assert torch.equal(via_hf, ref)


def test_gamma_zero_is_plain_dense_decoding(llama):
    ids, mask = make_batch(torch.Generator().manual_seed(2), [250, 100])
    out = check_parity(llama, ids, mask, 12, cfg(16, 0))
    s = out.stats
    assert s.drafted == 0 and s.accepted == 0
    assert s.rounds == 11  # the first token comes from prefill
    assert s.mean_accepted_per_round == 1.0
    assert s.per_position_acceptance == []
    assert s.n_selected == []  # no drafter was built


# --------------------------------------------------------------------------------- EOS
def first_index(tokens, value):
    return tokens.index(value)


def test_eos_inside_an_accepted_block_batch_1(tiny_model, monkeypatch):
    """EOS that the drafter got right is committed, and nothing after it."""
    record = []

    def spy(draft, target):
        n, bonus = greedy_accept(draft, target)
        record.append((draft.clone(), n.clone(), bonus.clone()))
        return n, bonus

    monkeypatch.setattr(sparse2dense.engine, "greedy_accept", spy)
    mid_block = 0
    cases = 0
    for arch in FULL_ATTENTION_ARCHS:
        model = tiny_model(arch)
        gen = torch.Generator().manual_seed(31)
        for length in (120, 300, 450):
            ids, mask = make_batch(gen, [length])
            plain = hf_greedy(model, ids, mask, 30)[0, length:].tolist()
            for pos in (4, 9):
                eos = plain[pos]
                stop = first_index(plain, eos)
                record.clear()
                out = check_parity(model, ids, mask, 30, cfg(100000 if pos == 9 else 32, 6), eos_token_id=eos)
                cases += 1
                seq = out.sequences[0, length:].tolist()
                assert seq == plain[: stop + 1], "the row must end right after its first EOS"
                assert out.stats.new_tokens == stop + 1
                if stop > 0:  # the EOS came from a verify round: was it inside the committed block?
                    draft, n, bonus = record[-1]
                    block = draft[0, : int(n[0])].tolist() + [int(bonus[0])]
                    if eos in block[:-1]:
                        mid_block += 1
    assert cases == 24
    assert mid_block > 0, "no case had the EOS inside an accepted block; the test proves less than it claims"


@pytest.mark.parametrize("arch", FULL_ATTENTION_ARCHS)
def test_eos_rows_finish_at_different_times(tiny_model, arch):
    model = tiny_model(arch)
    gen = torch.Generator().manual_seed(41)
    finished_apart = 0
    for lens in ([220, 180, 90], [300, 60], [150, 149, 148, 20]):
        ids, mask = make_batch(gen, lens)
        width = ids.shape[1]
        plain = hf_greedy(model, ids, mask, 24)
        eos = int(plain[0, width + 5])
        out = check_parity(model, ids, mask, 24, cfg(24, 7), eos_token_id=eos)
        lengths = []
        for row in range(len(lens)):
            gen_row = plain[row, width:].tolist()
            expected = gen_row[: first_index(gen_row, eos) + 1] if eos in gen_row else gen_row
            got = out.sequences[row, width:].tolist()
            assert got[: len(expected)] == expected
            assert all(t == PAD_ID for t in got[len(expected):])
            lengths.append(len(expected))
        assert out.stats.new_tokens == sum(lengths)
        finished_apart += len(set(lengths)) > 1
    assert finished_apart > 0


def test_several_eos_ids_and_default_pad(llama):
    ids, mask = make_batch(torch.Generator().manual_seed(6), [260, 200])
    plain = hf_greedy(llama, ids, mask, 20)[:, 260:]
    eos = [int(plain[0, 7]), int(plain[1, 3])]
    # pad_token_id defaults to the first EOS in both libraries
    ref = llama.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, eos_token_id=eos)
    out = sparse2dense.generate(llama, ids, mask, max_new_tokens=20, config=cfg(16, 4), eos_token_id=eos)
    assert torch.equal(out.sequences, ref)


# --------------------------------------------------------------------------------- rows finishing apart
def test_rows_finishing_at_different_rounds_by_max_new_tokens(llama):
    """Row 0 drafts with its whole prompt (accepts everything), row 1 with 4 entries (often wrong).

    Row 0 reaches max_new_tokens several rounds before row 1; rounds keep running for row 1.
    """
    ids = torch.randint(3, VOCAB, (2, 64), generator=torch.Generator().manual_seed(0))
    context = torch.zeros(2, 64, dtype=torch.bool)
    context[1, :-4] = True
    ref = llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    out = sparse2dense.generate(llama, ids, max_new_tokens=12, budget=4, gamma=8, context_mask=context)
    assert torch.equal(out.sequences, ref)
    assert out.stats.n_selected == [64, 4]


# --------------------------------------------------------------------------------- processors, criteria, streamer
def test_logits_processors_batch_1(tiny_model):
    for arch in ("llama", "qwen2"):
        model = tiny_model(arch)
        gen = torch.Generator().manual_seed(51)
        rates = []
        for length in (200, 380):
            ids, mask = make_batch(gen, [length])
            kw = dict(repetition_penalty=1.3, no_repeat_ngram_size=3)
            ref = hf_greedy(model, ids, mask, 30, **kw)
            got = run_custom(model, ids, mask, 30, cfg(24, 5), return_dict_in_generate=True, **kw)
            assert torch.equal(got.sequences, ref), describe(ref, got.sequences, length)
            rates.append(got.std_stats.acceptance_rate)
            assert ref[0, length:].unique().numel() > 6  # the processors changed the repetitive output
        assert any(0 < r < 1 for r in rates)


def test_logits_processors_direct_api(llama):
    ids, mask = make_batch(torch.Generator().manual_seed(52), [300])
    ref = hf_greedy(llama, ids, mask, 25, repetition_penalty=1.3, no_repeat_ngram_size=3)
    procs = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.3), NoRepeatNGramLogitsProcessor(3)])
    out = run_std(llama, ids, mask, 25, cfg(24, 5), logits_processor=procs)
    assert torch.equal(out.sequences, ref)


def test_no_repeat_ngram_left_padded_batch(llama):
    ids, mask = make_batch(torch.Generator().manual_seed(53), [260, 150, 90])
    ref = hf_greedy(llama, ids, mask, 24, no_repeat_ngram_size=3)
    got = run_custom(llama, ids, mask, 24, cfg(24, 5), no_repeat_ngram_size=3)
    assert torch.equal(got, ref), describe(ref, got, ids.shape[1])


def test_repetition_penalty_left_padded_batch(llama):
    """transformers builds RepetitionPenaltyLogitsProcessor with one prompt_ignore_length per row."""
    ids, mask = make_batch(torch.Generator().manual_seed(54), [260, 150])
    ref = hf_greedy(llama, ids, mask, 20, repetition_penalty=1.3)
    got = run_custom(llama, ids, mask, 20, cfg(24, 5), repetition_penalty=1.3)
    assert torch.equal(got, ref), describe(ref, got, ids.shape[1])


class StopOnToken(StoppingCriteria):
    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


def test_stopping_criteria_batch_1(tiny_model):
    stopped_early = 0
    for arch in ("llama", "qwen3"):
        model = tiny_model(arch)
        gen = torch.Generator().manual_seed(61)
        for length in (150, 400):
            ids, mask = make_batch(gen, [length])
            plain = hf_greedy(model, ids, mask, 30)[0, length:].tolist()
            token = plain[6]
            crit = lambda: StoppingCriteriaList([StopOnToken(token)])  # noqa: E731
            ref = hf_greedy(model, ids, mask, 30, stopping_criteria=crit())
            assert ref[0, length:].tolist() == plain[: first_index(plain, token) + 1]
            got = run_custom(model, ids, mask, 30, cfg(24, 6), stopping_criteria=crit())
            assert torch.equal(got, ref)
            out = run_std(model, ids, mask, 30, cfg(24, 6), stopping_criteria=crit())
            assert torch.equal(out.sequences, ref)
            stopped_early += ref.shape[1] < length + 30
    assert stopped_early > 0


def test_stopping_criteria_batch_with_eos(llama):
    ids, mask = make_batch(torch.Generator().manual_seed(62), [200, 150, 100])
    width = ids.shape[1]
    plain = hf_greedy(llama, ids, mask, 30)
    token = int(plain[1, width + 6])
    unused = next(t for t in range(VOCAB - 1, 0, -1) if t not in plain[:, width:])
    kw = dict(eos_token_id=unused, stopping_criteria=StoppingCriteriaList([StopOnToken(token)]))
    ref = hf_greedy(llama, ids, mask, 30, **kw)
    got = run_custom(llama, ids, mask, 30, cfg(24, 6), **kw)
    assert torch.equal(got, ref), describe(ref, got, width)


def test_stopping_criteria_batch_without_eos(llama):
    """Without an EOS id, transformers keeps generating real tokens in rows a criterion stopped."""
    ids, mask = make_batch(torch.Generator().manual_seed(62), [200, 150, 100])
    width = ids.shape[1]
    plain = hf_greedy(llama, ids, mask, 30)
    token = int(plain[1, width + 6])
    kw = dict(stopping_criteria=StoppingCriteriaList([StopOnToken(token)]))
    ref = hf_greedy(llama, ids, mask, 30, **kw)
    got = run_custom(llama, ids, mask, 30, cfg(24, 6), **kw)
    assert torch.equal(got, ref), describe(ref, got, width)


class Collector(BaseStreamer):
    def __init__(self):
        self.puts = []
        self.ends = 0

    def put(self, value):
        self.puts.append(value.detach().cpu().clone())

    def end(self):
        self.ends += 1


def test_streamer_via_custom_generate(llama):
    ids, mask = make_batch(torch.Generator().manual_seed(71), [240])
    streamer = Collector()
    got = run_custom(llama, ids, mask, 30, cfg(24, 6), streamer=streamer)
    assert torch.equal(got, hf_greedy(llama, ids, mask, 30))
    assert torch.equal(streamer.puts[0].flatten(), ids[0])  # transformers puts the prompt first
    streamed = [t for chunk in streamer.puts[1:] for t in chunk.flatten().tolist()]
    assert streamed == got[0, 240:].tolist()
    assert streamer.ends == 1


def test_streamer_via_direct_api(llama):
    ids, mask = make_batch(torch.Generator().manual_seed(71), [240])
    streamer = Collector()
    out = run_std(llama, ids, mask, 30, cfg(24, 6), streamer=streamer)
    assert torch.equal(out.sequences, hf_greedy(llama, ids, mask, 30))
    assert torch.equal(streamer.puts[0].flatten(), ids[0])  # the prompt first, as model.generate does
    streamed = [t for chunk in streamer.puts[1:] for t in chunk.flatten().tolist()]
    assert streamed == out.sequences[0, 240:].tolist()
    assert any(chunk.numel() > 1 for chunk in streamer.puts), "tokens should arrive in accepted blocks"
    assert streamer.ends == 1


def test_return_dict_in_generate(llama):
    ids, mask = make_batch(torch.Generator().manual_seed(72), [200, 120])
    ref = hf_greedy(llama, ids, mask, 15, return_dict_in_generate=True)
    got = run_custom(llama, ids, mask, 15, cfg(16, 4), return_dict_in_generate=True)
    assert isinstance(got, GenerateDecoderOnlyOutput)
    assert torch.equal(got.sequences, ref.sequences)
    assert isinstance(got.std_stats, StdStats)
    assert got.std_stats.drafted > 0


def test_budget_and_gamma_kwargs_through_model_generate(llama):
    ids, mask = make_batch(torch.Generator().manual_seed(73), [300])
    ref = hf_greedy(llama, ids, mask, 20, return_dict_in_generate=True)
    got = llama.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=PAD_ID,
                         custom_generate=sparse2dense.custom_generate, budget=80, gamma=3,
                         return_dict_in_generate=True)
    assert torch.equal(got.sequences, ref.sequences)
    assert got.std_stats.budget == 80 and got.std_stats.gamma == 3
    assert len(got.std_stats.per_position_acceptance) == 3


# --------------------------------------------------------------------------------- stats
def test_stats_add_up_round_by_round(tiny_model, monkeypatch):
    record = []

    def spy(draft, target):
        n, bonus = greedy_accept(draft, target)
        record.append((draft.shape[1], int(n[0])))
        return n, bonus

    monkeypatch.setattr(sparse2dense.engine, "greedy_accept", spy)
    for arch in ("llama", "mistral"):
        model = tiny_model(arch)
        gen = torch.Generator().manual_seed(81)
        for length, budget, gamma, max_new in [(300, 16, 5, 40), (200, 100000, 9, 33), (450, 8, 12, 25), (90, 24, 1, 10)]:
            ids, mask = make_batch(gen, [length])
            record.clear()
            s = check_parity(model, ids, mask, max_new, cfg(budget, gamma), both=False).stats
            assert s.rounds == len(record) > 0
            assert s.drafted == sum(g for g, _ in record)
            assert s.accepted == sum(n for _, n in record)
            assert 0 <= s.accepted <= s.drafted
            assert s.new_tokens == max_new  # no EOS: every position is a real token
            assert s.accepted + s.rounds == max_new - 1  # tokens committed by the rounds (1st: prefill)
            assert 1.0 <= s.mean_accepted_per_round <= gamma + 1
            assert s.mean_accepted_per_round == pytest.approx((s.accepted + s.rounds) / s.rounds)
            assert s.acceptance_rate == pytest.approx(s.accepted / s.drafted)
            assert len(s.per_position_acceptance) == gamma
            for i, p in enumerate(s.per_position_acceptance):
                drafted_i = sum(1 for g, _ in record if g > i)
                accepted_i = sum(1 for g, n in record if g > i and n > i)
                assert p == pytest.approx(accepted_i / drafted_i if drafted_i else 0.0)
            assert (s.batch_size, s.prompt_len, s.gamma, s.budget) == (1, length, gamma, budget)
            assert s.time_total >= s.time_prefill >= 0 and s.time_decode >= 0
            assert s.tokens_per_second > 0
            assert s.to_dict()["rounds"] == s.rounds


def test_stats_batch_bounds(llama):
    gen = torch.Generator().manual_seed(82)
    ids, mask = make_batch(gen, [300, 280, 120, 50])
    gamma = 6
    s = check_parity(llama, ids, mask, 20, cfg(16, gamma), both=False).stats
    assert s.rounds > 0 and s.drafted > 0
    assert s.accepted <= s.drafted <= s.rounds * gamma * 4
    assert 1.0 <= s.mean_accepted_per_round <= gamma + 1
    assert s.new_tokens == 4 * 20
    assert len(s.per_position_acceptance) == gamma
    assert all(0.0 <= p <= 1.0 for p in s.per_position_acceptance)


def test_mean_accepted_counts_committed_tokens_when_eos_cuts_a_block(llama):
    """StdStats: mean_accepted_per_round "counts committed tokens per row-round, the bonus token included".

    With batch 1, every token after the first one is committed by a round, so
    mean_accepted_per_round * rounds must equal new_tokens - 1, also when an EOS ends the row inside
    an accepted block (drafts after the EOS are not committed).
    """
    gen = torch.Generator().manual_seed(83)
    for length in (150, 250, 400):
        ids, mask = make_batch(gen, [length])
        plain = hf_greedy(llama, ids, mask, 30)[0, length:].tolist()
        eos = plain[4]
        s = check_parity(llama, ids, mask, 30, cfg(100000, 8), eos_token_id=eos, both=False).stats
        committed_by_rounds = s.new_tokens - 1
        assert s.mean_accepted_per_round * s.rounds == pytest.approx(committed_by_rounds), (
            f"rounds={s.rounds} accepted={s.accepted} new_tokens={s.new_tokens}"
        )


# --------------------------------------------------------------------------------- the harness can fail
def test_harness_detects_an_engine_that_accepts_one_draft_too_many(llama, monkeypatch):
    """Mutation test: commit one extra (unverified) draft per round; parity must break."""

    def too_greedy(draft, target):
        n, _ = greedy_accept(draft, target)
        n = torch.clamp(n + 1, max=draft.shape[1])
        return n, target.gather(1, n.unsqueeze(1)).squeeze(1)

    gen = torch.Generator().manual_seed(91)
    cases = [make_batch(gen, [length]) for length in (200, 350, 500)]
    refs = [hf_greedy(llama, ids, mask, 24) for ids, mask in cases]
    # sanity: the real engine passes on exactly these cases
    for (ids, mask), ref in zip(cases, refs):
        assert torch.equal(run_std(llama, ids, mask, 24, cfg(16, 5)).sequences, ref)
    monkeypatch.setattr(sparse2dense.engine, "greedy_accept", too_greedy)
    differ = 0
    for (ids, mask), ref in zip(cases, refs):
        differ += not torch.equal(run_std(llama, ids, mask, 24, cfg(16, 5)).sequences, ref)
        with pytest.raises(AssertionError):
            check_parity(llama, ids, mask, 24, cfg(16, 5), both=False)
    assert differ == len(cases)
