"""Continuous batching on Video-LLM families: each request (its own video or image, or text only)
joins a running batch and gets exactly ``model.generate``'s tokens for that request alone.

Qwen2-VL and Qwen3-VL carry per-row M-RoPE offsets that must travel with their row when the batch
changes; LLaVA-OneVision and Idefics3 (SmolVLM) use plain positions. Models and inputs are the tiny
real transformers classes of ``test_parity_vision.py``.
"""

from __future__ import annotations

import pytest
import torch
from test_parity_vision import collate, get_model, image_rows, text_rows, video_rows

from sparse2dense import Engine

FAMILIES = ("qwen2_vl", "qwen3_vl", "llava_onevision", "idefics3")


def _request(family, row):
    inputs = collate(family, [row])
    ids = inputs.pop("input_ids")
    inputs.pop("attention_mask")
    return ids, inputs


def _alone(model, ids, extra, max_new):
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **extra, max_new_tokens=max_new,
                         do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("gamma", [4, "auto"])
def test_video_requests_join_a_running_batch(family, gamma):
    model = get_model(family)
    gen = torch.Generator().manual_seed(40)
    rows = [video_rows(family, gen), image_rows(family, gen, pre=9), text_rows(family, gen),
            video_rows(family, gen, pre=3, post=14, size=1), image_rows(family, gen)]
    lengths = [24, 12, 18, 30, 9]
    requests = [_request(family, row) for row in rows]
    engine = Engine(model, max_batch=2, budget=12, gamma=gamma, max_seq_len=512)
    handles = []
    for (ids, extra), k in zip(requests, lengths):
        handles.append(engine.submit(ids, max_new_tokens=k, **extra))
        engine.step()
        engine.step()
    engine.run()
    for h, (ids, extra), k in zip(handles, requests, lengths):
        assert h.tokens == _alone(model, ids, extra, k), (family, h)
    assert engine.stats.compactions > 0 and max(r[0] for r in engine.stats.round_log) == 2
    assert any(0 < h.stats.n_selected < h.prompt_len for h in handles), "some drafter must be sparse"


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_sampled_video_request_is_schedule_independent(family):
    model = get_model(family)
    gen = torch.Generator().manual_seed(41)
    ids, extra = _request(family, video_rows(family, gen))
    other_ids, other_extra = _request(family, image_rows(family, gen))
    outs = []
    for gamma, batch in ((0, 1), (4, 2)):
        engine = Engine(model, max_batch=batch, budget=12, gamma=gamma, max_seq_len=512)
        if batch > 1:
            engine.submit(other_ids, max_new_tokens=20, **other_extra)
            engine.step()
        h = engine.submit(ids, max_new_tokens=20, do_sample=True, seed=3, temperature=0.8, **extra)
        engine.run()
        outs.append(h.tokens)
    assert outs[0] == outs[1]


def test_control_m_rope_offsets_left_behind_are_caught(monkeypatch):
    """The parity above depends on a row's M-RoPE offsets moving with it when compaction moves the
    row: with the offsets left behind, a Qwen2-VL row decodes at another row's positions."""
    import sparse2dense.slots

    real = sparse2dense.slots.Slots.move

    def move_without_offsets(self, dst, src, swap):
        saved, self.offsets = self.offsets, None
        real(self, dst, src, swap)
        self.offsets = saved

    monkeypatch.setattr(sparse2dense.slots.Slots, "move", move_without_offsets)
    with pytest.raises(AssertionError):
        test_video_requests_join_a_running_batch("qwen2_vl", 4)
