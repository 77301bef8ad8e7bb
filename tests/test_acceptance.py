"""Pure functions: greedy_accept, build_mask, and StdConfig validation."""

from __future__ import annotations

import pytest
import torch

from sparse2dense import StdConfig
from sparse2dense.acceptance import greedy_accept
from sparse2dense.kv import build_mask

NEG_INF = float("-inf")


# ------------------------------------------------------------------------------------ greedy_accept
def T(rows):
    return torch.tensor(rows, dtype=torch.long)


def test_all_drafts_accepted_bonus_is_last_target():
    n, bonus = greedy_accept(T([[5, 6, 7]]), T([[5, 6, 7, 9]]))
    assert n.tolist() == [3]
    assert bonus.tolist() == [9]
    assert n.dtype == torch.long and bonus.dtype == torch.long


def test_no_draft_accepted_bonus_is_first_target():
    n, bonus = greedy_accept(T([[1, 6, 7]]), T([[4, 6, 7, 9]]))
    assert n.tolist() == [0]
    assert bonus.tolist() == [4]


def test_mismatch_in_the_middle_stops_acceptance_even_if_later_drafts_match():
    # d_3 differs; d_4, d_5 match their targets but must not count (longest matching prefix only)
    n, bonus = greedy_accept(T([[1, 2, 3, 4, 5]]), T([[1, 2, 8, 4, 5, 6]]))
    assert n.tolist() == [2]
    assert bonus.tolist() == [8]


def test_batch_rows_accept_different_counts():
    draft = T([[1, 2, 3], [1, 2, 3], [1, 2, 3], [9, 2, 3]])
    target = T([[1, 2, 3, 4], [1, 7, 3, 4], [1, 2, 8, 4], [1, 2, 3, 4]])
    n, bonus = greedy_accept(draft, target)
    assert n.tolist() == [3, 1, 2, 0]
    assert bonus.tolist() == [4, 7, 8, 1]


def test_gamma_zero_gives_the_dense_token():
    n, bonus = greedy_accept(torch.zeros(3, 0, dtype=torch.long), T([[4], [5], [6]]))
    assert n.tolist() == [0, 0, 0]
    assert bonus.tolist() == [4, 5, 6]


def test_committed_block_equals_dense_choices_on_random_inputs():
    gen = torch.Generator().manual_seed(0)
    for gamma in range(1, 13):
        target = torch.randint(0, 4, (16, gamma + 1), generator=gen)
        draft = torch.where(torch.rand(16, gamma, generator=gen) < 0.7, target[:, :-1], torch.randint(0, 4, (16, gamma), generator=gen))
        n, bonus = greedy_accept(draft, target)
        for row in range(16):
            k = 0
            while k < gamma and int(draft[row, k]) == int(target[row, k]):
                k += 1
            assert int(n[row]) == k
            assert int(bonus[row]) == int(target[row, k])
            committed = draft[row, :k].tolist() + [int(bonus[row])]
            assert committed == target[row, : k + 1].tolist()


@pytest.mark.parametrize(
    "draft_shape,target_shape",
    [
        ((1, 3), (1, 3)),  # target must have gamma + 1 columns
        ((1, 3), (1, 5)),
        ((2, 3), (1, 4)),  # batch mismatch
        ((3,), (4,)),  # 1-D
        ((1, 1, 3), (1, 1, 4)),  # 3-D
    ],
)
def test_greedy_accept_rejects_bad_shapes(draft_shape, target_shape):
    with pytest.raises(ValueError, match="gamma"):
        greedy_accept(torch.zeros(draft_shape, dtype=torch.long), torch.zeros(target_shape, dtype=torch.long))


# ------------------------------------------------------------------------------------ build_mask
def reference_mask(lo, q_cols, span, window=None):
    b, t = q_cols.shape
    out = torch.full((b, 1, 1, t, span), NEG_INF)
    for row in range(b):
        for i in range(t):
            q = int(q_cols[row, i])
            for j in range(span):
                ok = int(lo[row]) <= j <= q
                if window is not None and q - j >= window:
                    ok = False
                if j == q:
                    ok = True
                if ok:
                    out[row, 0, 0, i, j] = 0.0
    return out


def allowed(mask):
    return mask == 0


def test_build_mask_is_causal():
    t = 6
    mask = build_mask(torch.tensor([0]), torch.arange(t).unsqueeze(0), t)
    assert mask.shape == (1, 1, 1, t, t)
    assert mask.dtype == torch.float32
    assert torch.equal(allowed(mask)[0, 0, 0], torch.ones(t, t, dtype=torch.bool).tril())
    assert set(mask.unique().tolist()) == {0.0, NEG_INF}


def test_build_mask_hides_left_padding_per_row():
    q_cols = torch.tensor([[5, 6], [5, 6]])
    mask = build_mask(torch.tensor([2, 0]), q_cols, 7)
    a = allowed(mask)[:, 0, 0]
    assert a[0, 0].tolist() == [False, False, True, True, True, True, False]
    assert a[0, 1].tolist() == [False, False, True, True, True, True, True]
    assert a[1, 0].tolist() == [True] * 6 + [False]


def test_build_mask_sliding_window():
    t = 8
    mask = build_mask(torch.tensor([0]), torch.arange(t).unsqueeze(0), t, window=3)
    a = allowed(mask)[0, 0, 0]
    for i in range(t):
        assert a[i].nonzero().flatten().tolist() == list(range(max(0, i - 2), i + 1))


def test_build_mask_query_always_sees_itself():
    # a padding query (column 1 < lo = 4) would otherwise have an empty row -> NaN softmax
    mask = build_mask(torch.tensor([4]), torch.tensor([[1, 4]]), 5)
    a = allowed(mask)[0, 0, 0]
    assert a[0].tolist() == [False, True, False, False, False]
    assert a[1].tolist() == [False, False, False, False, True]
    # and below its row's first column, and outside a window
    mask = build_mask(torch.tensor([4]), torch.tensor([[3]]), 5, window=1)
    assert allowed(mask)[0, 0, 0, 0].tolist() == [False, False, False, True, False]
    assert not torch.isnan(torch.softmax(mask, dim=-1)).any()


def test_build_mask_matches_reference_on_random_inputs():
    gen = torch.Generator().manual_seed(1)
    for _ in range(25):
        b = int(torch.randint(1, 4, (1,), generator=gen))
        t = int(torch.randint(1, 5, (1,), generator=gen))
        span = int(torch.randint(t + 1, 20, (1,), generator=gen))
        lo = torch.randint(0, span, (b,), generator=gen)
        start = torch.randint(0, span - t + 1, (b,), generator=gen)
        q_cols = start.unsqueeze(1) + torch.arange(t)
        window = int(torch.randint(1, 6, (1,), generator=gen)) if bool(torch.rand(1, generator=gen) < 0.5) else None
        got = build_mask(lo, q_cols, span, window=window)
        assert torch.equal(got, reference_mask(lo, q_cols, span, window=window)), (lo, q_cols, window)


# ------------------------------------------------------------------------------------ StdConfig
def test_stdconfig_defaults_are_valid():
    cfg = StdConfig()
    assert (cfg.budget, cfg.gamma, cfg.policy, cfg.sink_tokens, cfg.keep_last) == (1024, 9, "paper", 4, 64)
    StdConfig(budget=1, gamma=0, policy="streaming", sink_tokens=0, keep_last=1, max_score_queries=1, prefill_chunk=16)
    StdConfig(gamma=64)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"budget": 0}, "budget"),
        ({"budget": -5}, "budget"),
        ({"budget": 1.5}, "budget"),
        ({"budget": "16"}, "budget"),
        ({"budget": True}, "budget"),
        ({"gamma": -1}, "gamma"),
        ({"gamma": 65}, "gamma"),
        ({"gamma": 2.0}, "gamma"),
        ({"policy": "random"}, "policy"),
        ({"policy": None}, "policy"),
        ({"sink_tokens": -1}, "sink_tokens"),
        ({"keep_last": 0}, "keep_last"),
        ({"max_score_queries": 0}, "max_score_queries"),
        ({"prefill_chunk": 15}, "prefill_chunk"),
        ({"prefill_chunk": 0}, "prefill_chunk"),
    ],
)
def test_stdconfig_rejects_bad_values_with_one_sentence(kwargs, field):
    with pytest.raises(ValueError) as info:
        StdConfig(**kwargs)
    message = str(info.value)
    assert field in message
    assert "\n" not in message
    assert message.endswith(".")
