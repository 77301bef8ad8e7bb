"""gamma="auto", budget="auto", draft_dtype, the "last" policy, re-selection and sparse-only decoding.

Every lossless setting is compared token for token with ``model.generate(do_sample=False)`` on tiny
fp32 models; the controller's decisions are checked on synthetic costs where the right answer is
known, so a controller that ignores its measurements fails.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import FULL_ATTENTION_ARCHS, PAD_ID, bare_engine, make_batch
from test_parity_text import cfg, check_parity

import sparse2dense
from sparse2dense import StdConfig
from sparse2dense.adaptive import GammaController, auto_budget, expected_tokens
from sparse2dense.attention import attention_routed
from sparse2dense.drafter import copy_nbytes, draft_model


def _prompt_entries(engine):
    """The drafter buffer's selected prompt entries (all rows, layers and heads)."""
    d = engine.drafter
    return d.buffer.k[:, : engine.slots.n, :, : d.base].clone()


# --------------------------------------------------------------------------------- lossless settings
@pytest.mark.parametrize("arch", FULL_ATTENTION_ARCHS)
def test_auto_gamma_and_budget_are_lossless(tiny_model, arch):
    model = tiny_model(arch)
    gen = torch.Generator().manual_seed(21)
    rng = random.Random(arch)
    for lens in ([420], [300, 120, 260], [64], [700, 500]):
        ids, mask = make_batch(gen, lens)
        out = check_parity(model, ids, mask, rng.choice([1, 9, 40]), cfg("auto", "auto"), both=len(lens) == 1)
        assert out.stats.gamma_mode == "auto"
        assert out.stats.speculation in ("on", "off", "partial")
        if out.stats.speculation == "off":
            assert out.stats.fallback_reason


@pytest.mark.parametrize("draft_dtype", [torch.bfloat16, torch.float16, "bf16", "auto"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_low_precision_drafter_is_lossless(tiny_model, arch, draft_dtype):
    model = tiny_model(arch)
    gen = torch.Generator().manual_seed(7)
    stats = []
    for lens, gamma in (([400], 6), ([350, 200, 90, 300], 4), ([500], "auto")):
        ids, mask = make_batch(gen, lens)
        out = check_parity(model, ids, mask, 30, cfg(32, gamma, draft_dtype=draft_dtype), both=len(lens) == 1)
        stats.append(out.stats)
    fixed = stats[0]
    if draft_dtype != "auto":
        assert fixed.draft_dtype in ("bfloat16", "float16")
        assert fixed.draft_weights_mb > 0
        assert fixed.drafted > 0 and fixed.accepted > 0
    # the model itself is untouched: its parameters stay fp32
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_draft_copy_shares_nothing_it_should_not(llama):
    copy = draft_model(llama, torch.bfloat16)
    assert copy is draft_model(llama, torch.bfloat16)  # made once
    assert draft_model(llama, torch.float32) is llama
    lang = [p for p in copy.parameters()]
    assert all(p.dtype == torch.bfloat16 for p in lang)
    assert not any(p is q for p in lang for q in llama.parameters())
    n = sum(p.numel() for p in llama.parameters())
    assert copy_nbytes(llama, torch.bfloat16) == 2 * n
    # rotary frequencies stay in full precision
    assert all(b.dtype == torch.float32 for name, b in copy.named_buffers() if "inv_freq" in name)


@pytest.mark.parametrize("policy", ["last", "paper", "streaming"])
@pytest.mark.parametrize("reselect_every", [0, 1, 3])
def test_policies_and_reselection_are_lossless(llama, policy, reselect_every):
    gen = torch.Generator().manual_seed(31)
    for lens in ([450], [380, 150, 300]):
        ids, mask = make_batch(gen, lens)
        out = check_parity(llama, ids, mask, 28, cfg(24, 5, policy=policy, reselect_every=reselect_every),
                           both=False)
        assert out.stats.drafted > 0
        if reselect_every and policy != "streaming":
            assert out.stats.reselections > 0
        else:
            assert out.stats.reselections == 0


def test_reselection_changes_the_drafter(llama):
    """Re-selection really re-gathers: the draft cache's prompt region differs from the initial one."""
    gen = torch.Generator().manual_seed(2)
    ids, mask = make_batch(gen, [500])
    engine, _ = bare_engine(llama, cfg(24, 4, reselect_every=2), ids, mask, 20)
    engine.prefill()
    before = _prompt_entries(engine)
    engine.decode()
    assert engine.stats.reselections > 0
    assert not torch.equal(before, _prompt_entries(engine))


def test_last_policy_scores_with_other_queries_than_paper(llama):
    gen = torch.Generator().manual_seed(4)
    ids, mask = make_batch(gen, [400])
    picks = {}
    for policy in ("paper", "last"):
        engine, _ = bare_engine(llama, cfg(24, 4, policy=policy, observe_last=3), ids, mask, 4)
        engine.prefill()
        picks[policy] = _prompt_entries(engine)
    assert not torch.equal(picks["paper"], picks["last"])


def test_one_prefill_serves_several_policies(llama):
    """The bench selects each policy from one prefill; each must equal its own fresh run."""
    gen = torch.Generator().manual_seed(8)
    ids, mask = make_batch(gen, [420, 300])
    shared, _ = bare_engine(llama, cfg(24, 4), ids, mask, 4)
    shared.score_policies, shared.keep_capture = {"paper", "last"}, True
    shared.prefill()
    for policy in ("paper", "last", "streaming"):
        shared.select(policy)
        got = _prompt_entries(shared)
        alone, _ = bare_engine(llama, cfg(24, 4, policy=policy), ids, mask, 4)
        alone.prefill()
        assert torch.equal(got, _prompt_entries(alone)), policy


# --------------------------------------------------------------------------------- smaller budgets
@pytest.mark.parametrize("lens", [[300], [300, 220], [260, 90, 310]])
def test_reading_fewer_entries_of_a_selection_is_that_budget(llama, lens):
    """The selection is laid out best-last, so a drafter that starts reading at a later column reads
    exactly what a selection made with the smaller budget holds: it drafts the same tokens."""
    ids, mask = make_batch(torch.Generator().manual_seed(sum(lens)), lens)
    drafts, differs = {}, False
    for budget in (72, 200):
        engine, _ = bare_engine(llama, cfg(budget, 8), ids, mask, 12)
        engine.prefill()
        with torch.inference_mode(), attention_routed(llama):
            engine.chooser.refresh()
            drafts[budget] = engine.drafter.draft(8, engine.chooser)[0]
            if budget == 200:
                n_keep = engine.slots.keep[: len(lens)].sum(dim=1)
                assert bool((n_keep == n_keep[0]).all())
                engine.drafter.lo = engine.drafter.first_column(72 - int(n_keep[0]))
                fewer = engine.drafter.draft(8, engine.chooser)[0]
    assert torch.equal(fewer, drafts[72])
    differs = not torch.equal(drafts[200], drafts[72])
    assert differs or len(lens) > 1  # the control: the whole selection drafts otherwise (one row suffices)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_auto_budget_variants_are_lossless(tiny_model, arch, monkeypatch):
    """budget="auto" with gamma="auto" also drafts from the best part of the selection; every such
    drafter is measured here (whatever the timings say) and the output stays the model's own."""
    model = tiny_model(arch)
    monkeypatch.setattr("sparse2dense.engine.budget_variants", lambda batch: (40, 8))
    monkeypatch.setattr(GammaController, "_worth_measuring", lambda self, arm: True)
    gen = torch.Generator().manual_seed(11)
    for lens in ([300], [280, 120, 300], [200, 190]):
        ids, mask = make_batch(gen, lens)
        out = check_parity(model, ids, mask, 30, StdConfig(budget="auto", gamma="auto", draft_dtype=torch.bfloat16),
                           both=len(lens) == 1)
        per = out.stats.auto["rounds_per_drafter"]
        variants = [name for name in per if "@" in name]
        assert variants and all(per[name] > 0 for name in variants), per


def test_measuring_rounds_cut_short_are_lossless_and_float_copies_pool(llama, monkeypatch):
    """Every measuring round stops after one draft step here (whatever the timings say); the output
    stays the model's own. The fp32 and bf16 drafters share an acceptance estimate per budget; int8
    keeps its own."""
    monkeypatch.setattr("sparse2dense.engine.budget_variants", lambda batch: (40, 8))
    monkeypatch.setattr(GammaController, "give_up_after",
                        lambda self, arm: 0.0 if self._arms[arm].c_draft.value is None else None)
    made = []
    real_init = GammaController.__init__

    def spy(self, *args, **kwargs):
        made.append(kwargs)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(GammaController, "__init__", spy)
    gen = torch.Generator().manual_seed(13)
    for lens in ([300], [280, 120]):
        ids, mask = make_batch(gen, lens)
        out = check_parity(llama, ids, mask, 24, StdConfig(budget=64, gamma="auto", draft_dtype=torch.bfloat16),
                           both=len(lens) == 1)
        cut = out.stats.auto["cut_short"]
        assert cut.get("float32", 0) >= 1 and cut.get("bfloat16", 0) >= 1, out.stats.auto
        assert next(g for _, g, _, _ in out.stats.round_log if g > 0) == 1
        assert made[-1]["pools"] == (0, 0)
    monkeypatch.setattr("sparse2dense.engine.auto_budget", lambda keep, cands, batch=1: keep + 64)
    ids, mask = make_batch(gen, [300])
    check_parity(llama, ids, mask, 12, StdConfig(budget="auto", gamma="auto", draft_dtype=torch.bfloat16), both=False)
    assert made[-1]["drafters"][:2] == ("float32", "bfloat16") and made[-1]["pools"] == (0, 0, 2, 2, 4, 4)
    check_parity(llama, ids, mask, 12, StdConfig(budget="auto", gamma="auto"), both=False)
    assert made[-1]["drafters"][0] == "int8" and made[-1]["pools"] == (0, 1, 2)


def test_controller_measures_a_smaller_budget_only_where_its_weights_could_pay():
    rng = random.Random(12)
    cheap = GammaController(drafters=("int8", "int8@324"), parents=(None, 0))
    chosen = _feed(cheap, c1=1.0, c_draft=0.0, verify_slope=0.05, alpha=0.95, rounds=60, rng=rng, arm_costs=(0.5, 0.3))
    late = [a for a, g in chosen[10:] if g > 0]
    assert late and sum(a == 1 for a in late) > 0.9 * len(late)  # the cheaper reads win
    costly = GammaController(drafters=("bfloat16", "bfloat16@324"), parents=(None, 0))
    chosen = _feed(costly, c1=1.0, c_draft=0.0, verify_slope=0.05, alpha=0.95, rounds=60, rng=rng,
                   arm_costs=(1.2, 1.0))
    assert all(a == 0 for a, _ in chosen)  # weights that cannot pay at any budget: not measured again
    assert costly.summary()["draft_step_ms"]["bfloat16@324"] is None
    # Of two weights that pay, only the cheaper one's smaller budget is measured, and its measuring
    # round drafts as long as the model expects its weights to pay at the full budget.
    two = GammaController(drafters=("float32", "bfloat16", "float32@324", "bfloat16@324"), parents=(None, None, 0, 1))
    chosen = _feed(two, c1=1.0, c_draft=0.0, verify_slope=0.02, alpha=0.97, rounds=60, rng=rng,
                   arm_costs=(0.3, 0.45, 0.2, 0.35))
    assert 3 not in {a for a, _ in chosen}
    first_small = next(g for a, g in chosen if a == 2)
    assert first_small > 2  # a plain measuring round drafts 2


# --------------------------------------------------------------------------------- sparse-only (lossy)
def test_sparse_only_is_the_drafter_alone(llama):
    """With the whole prompt in budget the drafter is the dense model: sparse-only == dense; with a
    small budget it differs somewhere (it is lossy, which is why it is only a bench method)."""
    gen = torch.Generator().manual_seed(9)
    ids, mask = make_batch(gen, [300])
    seqs = {}
    for budget in (100000, 8):
        engine, group = bare_engine(llama, cfg(budget, 4), ids, mask, 40)
        engine.prefill()
        snap = engine.snapshot()
        engine.decode(gamma=0)
        dense = engine.output(group).sequences.clone()
        engine.restore(snap)
        engine.decode(sparse_only=True)
        seqs[budget] = (dense, engine.output(group).sequences.clone())
    dense, full = seqs[100000]
    assert torch.equal(dense, full)
    dense, sparse = seqs[8]
    assert sparse.shape == dense.shape
    assert not torch.equal(dense, sparse)


# --------------------------------------------------------------------------------- the controller
def _feed(ctl: GammaController, c1: float, c_draft: float, verify_slope: float, alpha: float, rounds: int,
          rng: random.Random, arm_costs=None) -> list[int]:
    """Simulate rounds with known costs and acceptance; returns the gammas chosen."""
    chosen = []
    for _ in range(rounds):
        arm, g = ctl.next_round(room=1000)
        cd = arm_costs[arm] if arm_costs else c_draft
        n = 0
        while n < g and rng.random() < alpha:
            n += 1
        ctl.observe(arm, g, g * cd, c1 + verify_slope * g, [n])
        chosen.append((arm, g))
    return chosen


def test_controller_turns_speculation_off_when_drafts_cost_as_much_as_dense():
    ctl = GammaController()
    chosen = _feed(ctl, c1=1.0, c_draft=0.95, verify_slope=0.3, alpha=0.6, rounds=200, rng=random.Random(0))
    late = [g for _, g in chosen[50:]]
    assert sum(g == 0 for g in late) > 0.8 * len(late)
    assert ctl.summary()["dense_rounds"] > 150


def test_controller_drafts_long_when_drafts_are_cheap_and_accepted():
    ctl = GammaController()
    chosen = _feed(ctl, c1=1.0, c_draft=0.1, verify_slope=0.02, alpha=0.95, rounds=100, rng=random.Random(1))
    late = [g for _, g in chosen[20:]]
    assert min(late) >= 6 and sum(late) / len(late) >= 9


def test_controller_picks_gamma_that_maximises_modelled_speed():
    ctl = GammaController()
    _feed(ctl, c1=1.0, c_draft=0.3, verify_slope=0.1, alpha=0.7, rounds=300, rng=random.Random(2))
    best = max(range(0, 13), key=lambda g: expected_tokens(0.7, g) / (g * 0.3 + 1 + 0.1 * g) if g else 1.0)
    arm, g = ctl.next_round(room=1000)
    assert abs(g - best) <= 1, (g, best, ctl.summary())


def test_controller_prefers_the_cheaper_drafter():
    ctl = GammaController(drafters=("float32", "bfloat16"))
    chosen = _feed(ctl, c1=1.0, c_draft=0.0, verify_slope=0.05, alpha=0.85, rounds=100, rng=random.Random(3),
                   arm_costs=(0.4, 0.15))
    late = [a for a, g in chosen[20:] if g > 0]
    assert late and sum(a == 1 for a in late) > 0.9 * len(late)


def test_controller_keeps_drafting_after_an_unlucky_start():
    """Batch 2 x 2000 on SmolLM2 with int8 drafts: the first speculative round rejected half of one
    row's drafts, and the controller then decoded densely though drafting paid. Thin evidence must
    not switch speculation off."""
    ctl = GammaController()
    ctl.observe(0, 0, 0.0, 1.0, [0, 0])  # the dense round
    ctl.observe(0, 4, 4 * 0.55, 1.8, [4, 2])  # unlucky: row 2 accepts 2 of 4
    ctl.observe(0, 1, 0.55, 1.4, [1, 0])
    rng = random.Random(5)
    chosen = []
    for _ in range(30):  # the true acceptance is 0.95, where drafting 3-5 tokens pays ~1.2x
        arm, g = ctl.next_round(room=1000)
        accepted = []
        for _row in range(2):
            n = 0
            while n < g and rng.random() < 0.95:
                n += 1
            accepted.append(n)
        ctl.observe(arm, g, g * 0.55, 1.0 + 0.2 * g, accepted)
        chosen.append(g)
    assert sum(g > 0 for g in chosen) >= 25, chosen
    assert ctl.expected_speedup(4) > 1.03  # and the evidence now says so on its own


def test_controller_takes_the_dense_cost_from_a_warm_step():
    """Batch 2 x 2000 on SmolLM2 with fp32 drafts: the first decode step ran cold (47 ms against 43
    for every later dense step), which made 2-token drafts look 4% faster than dense when they were
    5% slower. The dense cost is the cheaper of the first two dense steps."""
    ctl = GammaController()
    assert ctl.next_round(room=1000) == (0, 0)
    ctl.observe(0, 0, 0.0, 0.047, [0, 0])
    assert ctl.next_round(room=1000) == (0, 0)
    ctl.observe(0, 0, 0.0, 0.043, [0, 0])
    assert ctl.summary()["dense_step_ms"] == 43.0
    rng = random.Random(6)
    chosen = []
    for _ in range(60):
        arm, g = ctl.next_round(room=1000)
        accepted = [sum(1 for _ in range(g) if rng.random() < 0.95) for _row in range(2)]
        verify = {0: 0.043, 1: 0.059, 2: 0.065, 3: 0.071, 4: 0.079}.get(g, 0.079 + 0.008 * (g - 4))
        ctl.observe(arm, g, 0.032 * g, verify, accepted)
        chosen.append(g)
    assert sum(g == 0 for g in chosen[20:]) > 0.8 * 40, chosen


def test_controller_measures_again_after_a_hiccup():
    """Batch 1 x 2000 on SmolLM2 with int8 drafts: in one repeat the measuring round's 3-token verify
    pass took 139 ms (about 45 normally, 36 for a dense step), and the controller decoded densely for
    the rest of the answer. A stalled first measurement is taken again, once."""
    ctl = GammaController()
    for _ in range(2):
        ctl.observe(*ctl.next_round(room=1000), 0.0, 0.036, [0])
    arm, g = ctl.next_round(room=1000)
    assert g == 2
    ctl.observe(arm, g, 2 * 0.020, 0.139, [2])  # the hiccup
    rng = random.Random(8)
    chosen = []
    for _ in range(40):
        arm, g = ctl.next_round(room=1000)
        n = 0
        while n < g and rng.random() < 0.95:
            n += 1
        ctl.observe(arm, g, 0.020 * g, 0.036 + 0.003 * g, [n])
        chosen.append(g)
    assert chosen[0] == 2 and sum(g > 0 for g in chosen) >= 38, chosen
    # A drafter that is that slow every time is dropped after its second measurement.
    slow = GammaController()
    chosen = _feed(slow, c1=1.0, c_draft=2.5, verify_slope=0.1, alpha=0.95, rounds=30, rng=rng)
    assert [g for _, g in chosen[:6]] == [0, 0, 2, 2, 0, 0] and all(g == 0 for _, g in chosen[4:]), chosen


def test_controller_lengthens_drafts_step_by_step():
    """Batch 8 x 6000 tokens on SmolLM2 with bf16 drafts: after two 2-token rounds with every draft
    accepted, the controller drafted 10 tokens at once (acceptance then looked like 0.98), and most
    were rejected. Draft lengths now at most double from the longest so far."""
    ctl = GammaController(drafters=("bfloat16",))
    chosen = []
    for _ in range(12):
        arm, g = ctl.next_round(room=1000)
        ctl.observe(arm, g, 0.05 * g, 0.211 + 0.0285 * g, [g] * 8)  # every draft accepted
        chosen.append(g)
    assert chosen[:6] == [0, 0, 2, 4, 8, 12], chosen
    unbounded = GammaController(drafters=("bfloat16",), growth=100)
    chosen = []
    for _ in range(4):
        arm, g = unbounded.next_round(room=1000)
        unbounded.observe(arm, g, 0.05 * g, 0.211 + 0.0285 * g, [g] * 8)
        chosen.append(g)
    assert chosen[3] > 4, chosen  # the control: without the bound the model drafts long at once


def test_controller_ends_a_measuring_round_that_cannot_pay():
    """Batch 1 x 1000 tokens on SmolLM2 with a bf16 copy (the README's context sweep at f8f09b1): its
    measuring round drafted two tokens at 43 ms a step against a 33.6 ms dense step, though its first
    step already showed it could never pay. A measuring round now stops after one draft step that
    cost more than ``give_up_ratio`` dense steps, or steps of a measured drafter that drafts alike."""
    ctl = GammaController(drafters=("float32", "bfloat16"), pools=(0, 0))
    assert ctl.give_up_after(1) is None  # nothing to compare with before a dense step
    for _ in range(2):
        ctl.observe(*ctl.next_round(room=1000), 0.0, 0.0336, [0])
    assert ctl.give_up_after(0) == pytest.approx(1.2 * 0.0336)
    assert ctl.give_up_after(1) == pytest.approx(1.2 * 0.0336)
    ctl.observe(0, 2, 2 * 0.031, 0.040, [2])  # the model's own weights, measured at 31 ms a step
    assert ctl.give_up_after(0) is None  # a measured drafter's rounds are never cut
    assert ctl.give_up_after(1) == pytest.approx(1.2 * 0.031)  # the alike drafter's step is the bar
    ctl.cut_short(1)
    ctl.observe(1, 1, 0.043, 0.038, [1])
    assert ctl.summary()["cut_short"] == {"bfloat16": 1}
    assert all(a == 0 for a, g in (ctl.next_round(room=1000) for _ in range(5)))
    # Drafters that do not draft alike (int4 accepts less) are only held to the dense step.
    apart = GammaController(drafters=("float32", "int4"))
    for _ in range(2):
        apart.observe(*apart.next_round(room=1000), 0.0, 0.0336, [0])
    apart.observe(0, 2, 2 * 0.031, 0.040, [2])
    assert apart.give_up_after(1) == pytest.approx(1.2 * 0.0336)


def test_float_copies_share_one_acceptance_estimate():
    """Batch 8 x 6000 tokens on SmolLM2 (the README command at f8f09b1): after one long bf16 round
    lowered the bf16 copy's acceptance estimate, the controller drafted three rounds with the fp32
    weights (63 against 46 ms a step), which draft nearly the same tokens. Float copies of the same
    weights now share one estimate, so the step cost alone decides between them."""
    picks = {}
    for pools in ((0, 0), ()):
        ctl = GammaController(drafters=("float32", "bfloat16"), pools=pools)
        for _ in range(2):
            ctl.observe(0, 0, 0.0, 0.211, [0] * 8)
        ctl.observe(0, 2, 2 * 0.063, 0.27, [2] * 8)
        ctl.observe(1, 2, 2 * 0.046, 0.27, [2] * 8)
        ctl.observe(1, 4, 4 * 0.046, 0.33, [4] * 8)
        ctl.observe(1, 8, 8 * 0.046, 0.44, [8, 1, 2, 3, 8, 0, 5, 8])  # one long round rejects early
        alpha = ctl.summary()["alpha"]
        picks[pools] = ctl.next_round(room=1000)[0], alpha["float32"], alpha["bfloat16"]
    assert picks[(0, 0)][0] == 1 and picks[(0, 0)][1] == picks[(0, 0)][2]
    assert picks[()][0] == 0 and picks[()][1] > picks[()][2]  # the control: separate estimates


def test_controller_rescales_costs_when_the_batch_shrinks():
    ctl = GammaController()
    for verify in (1.0, 1.0):
        ctl.observe(0, 0, 0.0, verify, [0] * 8)
    ctl.observe(0, 4, 4 * 0.3, 1.4, [4] * 8)
    before = ctl.round_cost(0, 4)
    ctl.batch_changed()  # rows left: the next round costs half as much, and so does everything
    ctl.observe(0, 4, 4 * 0.15, 0.7, [4] * 4)
    assert ctl.round_cost(0, 0) == pytest.approx(0.5)
    assert ctl.round_cost(0, 4) == pytest.approx(before / 2)
    assert ctl.expected_speedup(4) == pytest.approx(5 * 0.5 / (before / 2), rel=0.05)


def test_controller_reprobes_only_drafters_that_could_pay():
    """Dense stretches re-probe a short draft now and then, in case the text turns predictable;
    but a drafter whose steps cost more than a dense step cannot pay whatever the text does (a bf16
    copy at batch 1 on the CPU measured: 40 against 31 ms), so it is not re-probed."""
    rng = random.Random(7)
    costly = GammaController()
    chosen = _feed(costly, c1=1.0, c_draft=1.3, verify_slope=0.1, alpha=0.95, rounds=120, rng=rng)
    assert [g for _, g in chosen[3:]] == [0] * 117
    cheap_but_rejected = GammaController()
    chosen = _feed(cheap_but_rejected, c1=1.0, c_draft=0.2, verify_slope=0.1, alpha=0.2, rounds=120, rng=rng)
    late = [g for _, g in chosen[60:]]
    assert 0 < sum(g > 0 for g in late) < 0.1 * len(late)


def test_controller_respects_room():
    ctl = GammaController()
    _feed(ctl, c1=1.0, c_draft=0.05, verify_slope=0.01, alpha=0.95, rounds=30, rng=random.Random(4))
    assert ctl.next_round(room=3)[1] <= 2
    assert ctl.next_round(room=1)[1] == 0


def test_auto_budget_rule():
    assert auto_budget(68, 10) == 78  # everything fits
    assert auto_budget(68, 8000) == 68 + 1024
    assert auto_budget(68, 600) == 68 + 600
    assert auto_budget(68, 8000, batch=2) == 68 + 256
    assert auto_budget(68, 8000, batch=4) == 68 + 256
    assert auto_budget(68, 8000, batch=16) == 68 + 256


def test_short_prompt_auto_decodes_densely_and_says_why(llama):
    gen = torch.Generator().manual_seed(1)
    ids, mask = make_batch(gen, [40])
    own = StdConfig(budget="auto", gamma="auto", draft_dtype=torch.float32)  # the model's own weights
    out = check_parity(llama, ids, mask, 12, own)
    assert out.stats.speculation == "off"
    assert "budget" in out.stats.fallback_reason
    assert out.stats.drafted == 0
    # By default gamma="auto" also picks cheaper weights (int8 on CPU): that drafter costs less than
    # dense decoding even when it reads the whole prompt, so it is built and measured.
    out = check_parity(llama, ids, mask, 12, StdConfig(budget="auto", gamma="auto"))
    assert out.stats.draft_dtype == "int8"
    assert "budget" not in out.stats.fallback_reason


def test_own_weights_are_not_probed_where_they_would_be_the_dense_model(llama):
    """With a bf16 copy, gamma="auto" measures the model's own weights too, but not where the
    budget covers the whole prompt: that drafter would cost a dense step per draft."""
    ids, mask = make_batch(torch.Generator().manual_seed(2), [40, 30])
    fits = check_parity(llama, ids, mask, 12, StdConfig(budget="auto", gamma="auto", draft_dtype=torch.bfloat16))
    assert list(fits.stats.auto["rounds_per_drafter"]) == ["bfloat16"]
    sparse = check_parity(llama, ids, mask, 12, StdConfig(budget=16, gamma="auto", draft_dtype=torch.bfloat16))
    assert list(sparse.stats.auto["rounds_per_drafter"]) == ["float32", "bfloat16"]


@pytest.mark.parametrize("bad", [dict(gamma="fast"), dict(budget="big"), dict(draft_dtype="int3"),
                                 dict(reselect_every=-1), dict(observe_last=0), dict(policy="random")])
def test_bad_settings_raise_one_sentence(bad):
    with pytest.raises(ValueError) as err:
        StdConfig(**bad)
    assert "\n" not in str(err.value)


def test_generate_accepts_auto_keywords(llama):
    gen = torch.Generator().manual_seed(5)
    ids, mask = make_batch(gen, [300])
    ref = check_parity(llama, ids, mask, 16, cfg(32, 4), both=False).sequences
    out = sparse2dense.generate(llama, ids, mask, max_new_tokens=16, gamma="auto", budget="auto",
                                draft_dtype=torch.bfloat16, pad_token_id=PAD_ID)
    assert torch.equal(out.sequences, ref)


def test_custom_generate_accepts_auto_and_draft_dtype(llama):
    gen = torch.Generator().manual_seed(6)
    ids, mask = make_batch(gen, [350])
    ref = llama.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=PAD_ID)
    out = llama.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=PAD_ID,
                         custom_generate=sparse2dense.custom_generate, gamma="auto", budget="auto",
                         draft_dtype=torch.bfloat16, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    assert out.std_stats.gamma_mode == "auto"
