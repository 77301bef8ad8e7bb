"""Batch compaction: rows that stop leave the forward passes, and the output stays ``generate``'s.

A batch decodes until its slowest row is done. Once enough rows have stopped (EOS, or
``max_new_tokens`` reached rounds before the others), the engine drops them: a live row from the
back of the batch takes the buffer slot of a stopped row in front, and every pass runs on the live
rows only. These tests check, on the tiny models of every family, that:

* the output is token for token that of ``model.generate``, with compaction really happening and
  really moving rows (a control with the K/V moves switched off must fail);
* a second decode from the same prefill (what the bench does) sees every row's prompt K/V back in
  place;
* nothing is dropped where something sees the batch as a whole (logits processors, sampling).
"""

from __future__ import annotations

import pytest
import torch
from conftest import FULL_ATTENTION_ARCHS, PAD_ID, SLIDING_ARCHS, VOCAB, hf_greedy, make_batch

import sparse2dense
import sparse2dense.engine
from sparse2dense import StdConfig
from sparse2dense.generation import batch_engine

SINK, KEEP = 2, 8


def cfg(budget, gamma, **kw):
    return StdConfig(budget=budget, gamma=gamma, sink_tokens=SINK, keep_last=KEEP, **kw)


def eos_case(model, seed, lens, at=4):
    """A left-padded batch and an EOS id that ends row 0 early (so a front row stops first)."""
    ids, mask = make_batch(torch.Generator().manual_seed(seed), lens)
    plain = hf_greedy(model, ids, mask, 24)
    return ids, mask, int(plain[0, ids.shape[1] + at])


def generate(model, ids, mask, max_new, config, **kw):
    kw.setdefault("pad_token_id", PAD_ID)
    return sparse2dense.generate(model, ids, mask, max_new_tokens=max_new, config=config, **kw)


@pytest.mark.parametrize("arch", FULL_ATTENTION_ARCHS + SLIDING_ARCHS)
@pytest.mark.parametrize("gamma", [0, 3, 7, "auto"])
def test_rows_stopping_apart_are_dropped_losslessly(tiny_model, arch, gamma):
    model = tiny_model(arch)
    compacted = 0
    for seed, lens in ((1, [220, 180, 90, 160]), (2, [150, 149, 148, 20, 90, 130]), (3, [300, 60])):
        ids, mask, eos = eos_case(model, seed, lens)
        ref = hf_greedy(model, ids, mask, 24, eos_token_id=eos)
        budget = "auto" if gamma == "auto" else 24
        out = generate(model, ids, mask, 24, cfg(budget, gamma), eos_token_id=eos)
        assert torch.equal(out.sequences, ref), (seed, lens)
        compacted += out.stats.compactions
        assert out.stats.batch_size == len(lens)
        assert [row[0] for row in out.stats.round_log][0] == len(lens)
        assert len(out.stats.round_log) == out.stats.rounds
    assert compacted > 0, "no case dropped a row; the test proves less than it claims"


def test_rows_reaching_max_new_tokens_rounds_apart(llama):
    """Row 0 drafts with its whole prompt (accepts everything) and finishes rounds before the
    others, whose drafters keep 4 entries (often wrong). Its slot goes to the last row."""
    ids = torch.randint(3, VOCAB, (4, 64), generator=torch.Generator().manual_seed(0))
    context = torch.zeros(4, 64, dtype=torch.bool)
    context[1:, :-4] = True
    ref = llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    out = sparse2dense.generate(llama, ids, max_new_tokens=16, budget=4, gamma=8, context_mask=context)
    assert torch.equal(out.sequences, ref)
    assert out.stats.compactions > 0
    rows = [r[0] for r in out.stats.round_log]
    assert rows[0] == 4 and rows[-1] < 4


def test_a_row_left_alone_drafts_as_it_did_in_the_batch(llama, monkeypatch):
    """Rows keep different numbers of prompt entries (short prompts fit the budget), so a short
    row's selection starts at a later column of the draft buffer than the longest row's. When such a
    row is left alone, its drafts must still start there (a single row reads unmasked): every round
    accepts exactly what it accepts when no row is dropped."""
    checked = 0
    for seed, lens in ((5, [300, 40]), (6, [260, 30, 45]), (7, [200, 50])):
        ids, mask, eos = eos_case(llama, seed, lens, at=2)
        ref = hf_greedy(llama, ids, mask, 24, eos_token_id=eos)
        kept = generate(llama, ids, mask, 24, cfg(64, 4), eos_token_id=eos)
        assert torch.equal(kept.sequences, ref)
        monkeypatch.setattr(sparse2dense.engine.Engine, "_compactable", lambda self: False)
        whole = generate(llama, ids, mask, 24, cfg(64, 4), eos_token_id=eos)
        monkeypatch.undo()
        assert whole.stats.compactions == 0
        assert min(kept.stats.n_selected) < max(kept.stats.n_selected)
        if kept.stats.compactions and kept.stats.round_log[-1][0] == 1:
            checked += 1
        assert (kept.stats.accepted, kept.stats.rounds) == (whole.stats.accepted, whole.stats.rounds)
    assert checked > 0, "no case left a row alone"


def test_control_without_the_kv_moves_fails(llama, monkeypatch):
    """The parity above depends on the moved rows taking their K/V along: with the moves switched
    off, a row that changes slot decodes from another row's cache and the output changes."""
    ids, mask, eos = eos_case(llama, 1, [220, 180, 90, 160])
    config = cfg(24, 3)
    ref = hf_greedy(llama, ids, mask, 24, eos_token_id=eos)
    out = generate(llama, ids, mask, 24, config, eos_token_id=eos)
    assert torch.equal(out.sequences, ref) and out.stats.compactions > 0
    monkeypatch.setattr(sparse2dense.engine, "_move_row", lambda *a: None)
    broken = generate(llama, ids, mask, 24, config, eos_token_id=eos)
    assert not torch.equal(broken.sequences, ref)


def test_reselection_with_rows_dropped(llama):
    ids, mask, eos = eos_case(llama, 2, [150, 149, 148, 20, 90, 130])
    ref = hf_greedy(llama, ids, mask, 24, eos_token_id=eos)
    out = generate(llama, ids, mask, 24, cfg(16, 3, reselect_every=2), eos_token_id=eos)
    assert torch.equal(out.sequences, ref)
    assert out.stats.compactions > 0 and out.stats.reselections > 0


def test_no_eos_rows_stopped_by_a_criterion_keep_generating(llama):
    """Without an EOS id, transformers keeps a row that a stopping criterion stopped generating until
    every row has stopped; rows dropped at max_new_tokens must still count for that final length."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopRow0After(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 64 + 6, dtype=torch.bool)

    ids = torch.randint(3, VOCAB, (3, 64), generator=torch.Generator().manual_seed(4))
    stop = StoppingCriteriaList([StopRow0After()])
    ref = llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                         stopping_criteria=stop, pad_token_id=PAD_ID)
    out = sparse2dense.generate(llama, ids, max_new_tokens=12, budget=4, gamma=5, stopping_criteria=stop,
                                pad_token_id=PAD_ID)
    assert torch.equal(out.sequences, ref)


def test_second_decode_from_the_same_prefill_after_compaction(llama):
    """The bench decodes several methods from one prefill: compaction must leave every row's prompt
    K/V where restore() expects it."""
    ids, mask, eos = eos_case(llama, 1, [220, 180, 90, 160])
    engine, group = batch_engine(llama, ids, mask, 24, cfg(24, 3), eos_token_id=[eos], pad_token_id=PAD_ID)
    ref = hf_greedy(llama, ids, mask, 24, eos_token_id=eos)
    engine.prefill()
    snap = engine.snapshot()
    prompt_k = engine.dense.k[:, :, :, : ids.shape[1]].clone()
    for gamma in (3, 0, 2):
        engine.restore(snap)
        assert torch.equal(engine.dense.k[:, :, :, : ids.shape[1]], prompt_k)
        engine.select()
        engine.decode(gamma=gamma)
        out = engine.output(group)
        assert torch.equal(out.sequences, ref), gamma
        assert out.stats.compactions > 0


def test_nothing_is_dropped_when_the_batch_is_seen_whole(llama):
    ids, mask, eos = eos_case(llama, 1, [220, 180, 90, 160])
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    procs = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.3)])
    ref = hf_greedy(llama, ids, mask, 24, eos_token_id=eos, logits_processor=procs)
    out = generate(llama, ids, mask, 24, cfg(24, 3), eos_token_id=eos, logits_processor=procs)
    assert torch.equal(out.sequences, ref)
    assert out.stats.compactions == 0
    sampled = generate(llama, ids, mask, 24, cfg(24, 3), eos_token_id=eos, do_sample=True,
                       generator=torch.Generator().manual_seed(0))
    assert sampled.stats.compactions == 0
