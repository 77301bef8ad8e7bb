"""``gamma="auto"`` and ``budget="auto"``: pick the fastest lossless setting while decoding.

A round that drafts ``g`` tokens costs ``g * c_draft + c_verify(g + 1)`` and commits, per row,
``E(g) = 1 + a + a^2 + ... + a^g`` tokens when each draft is accepted with probability ``a`` given
that the drafts before it were. Plain dense decoding commits 1 token per ``c_verify(1)``. The
controller measures those costs on the running workload (this model, batch, context and machine),
tracks ``a`` from the rounds so far, and drafts the ``g`` that maximises committed tokens per
second, which is ``g = 0`` (dense decoding, no drafter call at all) when no draft length can beat
dense. The first two rounds are dense and the cheaper of them is the dense cost (the first step
after prefill runs cold). While ``a`` rests on few rounds, speculation continues as long as its
optimistic bound (one standard error up) says drafting could pay, and perfect acceptance would pay
clearly, so early bad luck does not end speculation that would; dense rounds occasionally re-probe
a short draft so a drafter that starts to pay is noticed. A drafter's first measurement is taken
again, once, when one of its passes stalled for longer than two dense steps (a busy machine), so
one hiccup does not price it out of the whole answer. A measuring round ends after one draft step
when that step already cost clearly more (``give_up_ratio``) than a dense step, or than a step of a
drafter that drafts alike, since such a drafter can never be the fastest. Float copies of the same
weights (fp32, bf16) share one acceptance estimate, so their step costs alone decide between them.
Draft lengths at most double from one round to the next longest, so acceptance learnt on short
drafts is tried on longer ones step by step.
When rows finish and leave a batch, the next round's measured cost rescales every cost estimate.
With ``budget="auto"`` at batch 1, the same drafter reading only the best part of its selection is
a further arm with its own costs and acceptance (:func:`budget_variants`).

Nothing here changes which tokens are produced: every draft length gives the dense output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .config import MAX_AUTO_GAMMA


def auto_budget(n_keep: int, n_candidates: int, batch: int = 1) -> int:
    """The drafter budget ``budget="auto"`` uses for a prompt (per row; the engine takes the max).

    Keeps every non-candidate token plus 1024 candidates at batch 1 and 256 at larger batches (all
    of them when there are fewer). A draft step reads the budget's KV entries for every row, so its
    attention cost grows with ``batch * budget`` while the weights it reads stay fixed; fewer entries
    lose acceptance. Fitted to the README's sweeps on SmolLM2-135M (2-core CPU): at batch 1 a budget
    of 1024 kept acceptance at 0.9-1.0 from 1k to 8k tokens, where 500 lost a sixth of it at 4k; at
    batch 2 and 4 x 2000 tokens 256 kept acceptance at 0.94-0.95 and was the fastest budget.
    """
    return n_keep + min(n_candidates, 1024 if batch <= 1 else 256)


def budget_variants(batch: int = 1) -> tuple[int, ...]:
    """Smaller candidate counts that ``gamma="auto"`` with ``budget="auto"`` also measures and may draft with.

    At batch 1 the :func:`auto_budget` of 1024 candidates is the safe choice for acceptance, but
    reading fewer of them was faster wherever acceptance held (SmolLM2-135M, 2-core CPU, README
    sweeps: at batch 1 x 8000 tokens, int8 drafts at gamma 12 ran 2.01x over dense with 512 prompt
    entries and 1.79x with 256 against 1.81x with 1024; at batch 1 x 2000, gamma 4, 256 entries
    gave 1.36x). So the best 512 and 256 are drafters of their own: the controller measures them
    and keeps whichever commits tokens fastest on this text. Larger batches start at 256.
    """
    return (512, 256) if batch <= 1 else ()


def expected_tokens(alpha: float, g: int) -> float:
    """Committed tokens per row-round with ``g`` drafts, each accepted with probability ``alpha``."""
    if alpha >= 1.0:
        return float(g + 1)
    return (1.0 - alpha ** (g + 1)) / (1.0 - alpha)


@dataclass
class _Ema:
    """Exponentially weighted mean; ``None`` until the first observation."""

    decay: float
    value: float | None = None

    def add(self, x: float) -> None:
        self.value = x if self.value is None else self.decay * self.value + (1 - self.decay) * x


@dataclass
class _Acceptance:
    """Discounted acceptance counts of one drafter, or of drafters that draft alike (see ``pools``)."""

    acc: float = 0.0
    trials: float = 0.0

    @property
    def alpha(self) -> float:
        """Estimated per-draft acceptance probability.

        Two pseudo-trials at 0.8 act as a prior, so one unlucky early round does not switch
        speculation off for good (the data outweigh the prior after a few rounds).
        """
        return min(0.995, (self.acc + 1.6) / (self.trials + 2.0))

    @property
    def alpha_upper(self) -> float:
        """An optimistic acceptance estimate: one standard error above :attr:`alpha`.

        Speculation stays on while it says drafting could pay, so a few unlucky early rounds do
        not switch it off while they are all the evidence there is (dense rounds gather none). As
        rounds accumulate it approaches :attr:`alpha`.
        """
        a = self.alpha
        return min(0.995, a + math.sqrt(a * (1.0 - a) / (self.trials + 2.0)))


@dataclass
class _Arm:
    """One drafter the controller may use (e.g. the model's own weights, or a bf16 copy)."""

    name: str
    parent: int | None = None  # the arm whose weights it shares, reading fewer entries
    hiccup: bool = False  # whether a first measurement was already discarded as a hiccup
    cut_short: int = 0  # measuring rounds stopped after one draft step (see GammaController.give_up_after)
    c_draft: _Ema = field(default_factory=lambda: _Ema(0.7))
    acceptance: _Acceptance = field(default_factory=_Acceptance)


@dataclass
class GammaController:
    """Chooses each round's drafter and draft length from measured costs and online acceptance.

    Costs (seconds) are learnt from the rounds themselves:

    * ``c_draft``: one draft step (the sparse forward of all rows), per drafter;
    * ``c_verify(t)``: a dense pass over ``t`` tokens per row, modelled as ``c1 + slope * (t - 1)``
      where ``c1`` comes from dense rounds and the slope from verify passes of other lengths.

    Acceptance is, per drafter, the maximum-likelihood ``a`` of a geometric model, with old rounds
    discounted by ``decay`` so a change in the text is followed within a few rounds.

    Args:
        drafters: names of the drafters to choose from (index = the ``arm`` returned by
            :meth:`next_round`).
        parents: per drafter, None, or the index of the drafter it reads a smaller budget of (the
            same weights over fewer prompt entries). Such a drafter is only measured where its
            parent could pay and has the cheapest weights (see :meth:`_worth_measuring`), and its
            measuring round is as long as the parent's best draft length.
        pools: per drafter, the index of the drafter whose acceptance counts it shares (its own
            index, or empty, for none): float copies of the same weights over the same entries
            (fp32 and bf16) draft nearly the same tokens, so one shared estimate lets their step
            costs alone decide between them, instead of the noise of whichever drafted last.
    """

    drafters: tuple[str, ...] = ("model",)
    parents: tuple[int | None, ...] = ()
    pools: tuple[int, ...] = ()
    max_gamma: int = MAX_AUTO_GAMMA
    first_gamma: int = 2  # a drafter's first (measuring) round: short, as it may not pay
    first_dense_rounds: int = 2  # the dense step's cost is their minimum (the first step runs cold)
    decay: float = 0.9
    probe_every: int = 16
    margin: float = 1.03  # speculate only when the model expects >= 3% more tokens per second
    # While the acceptance rests on few rounds, drafting continues where its optimistic bound beats
    # ``margin``, unless even perfect acceptance would gain less than ``hope_margin``: a drafter that
    # could only just pay at best is not worth the rounds it takes to find out.
    hope_margin: float = 1.10
    # A drafter's first measured round is discarded once (and measured again) when a draft step, or a
    # verify pass over at most 4 tokens, took longer than this many dense steps: on a busy machine one
    # stalled pass would otherwise price a drafter out for the whole answer.
    hiccup_ratio: float = 2.0
    # Draft lengths grow at most this many times the longest drafted so far: the first tokens of an
    # answer are often the easiest to draft, and acceptance learnt from short drafts says little about
    # the late positions of a long one (batch 8 x 6000 tokens: 2, 2, then 10 drafts, most rejected).
    growth: int = 2
    # A measuring round stops after its first draft step when that step took longer than this many
    # times a dense step, or a step of a measured drafter that drafts alike (the same pool): such a
    # drafter cannot be the fastest, so its further drafts would only be paid for.
    give_up_ratio: float = 1.2
    speculate: bool = True  # False: a drafter is unavailable (dense decoding only)
    reason: str = ""
    _arms: list[_Arm] = field(default_factory=list)
    _c1: _Ema = field(default_factory=lambda: _Ema(0.7))
    _verify: dict[int, _Ema] = field(default_factory=dict)
    _since_probe: int = 0
    _probe_gap: int = 0
    _rescale: bool = False
    _dense_seen: int = 0
    _longest: int = 0  # the longest draft length observed so far
    history: list[tuple[int, int]] = field(default_factory=list)  # (arm, gamma) per round

    def __post_init__(self) -> None:
        parents = self.parents or (None,) * len(self.drafters)
        self._arms = [_Arm(name, parent=p) for name, p in zip(self.drafters, parents)]
        for arm, pool in zip(self._arms, self.pools):
            arm.acceptance = self._arms[pool].acceptance

    # -------------------------------------------------------------- observations
    def observe(self, arm: int, g: int, draft_s: float, verify_s: float, n_accepted: list[int]) -> None:
        """Record one round: drafter ``arm``, ``g`` drafts, its timings, accepted drafts per live row."""
        self.history.append((arm, g))
        if self._rescale:
            self._rescale_costs(self.round_cost(arm, g), draft_s + verify_s)
        if g == 0:
            if self._dense_seen < self.first_dense_rounds and self._c1.value is not None:
                self._c1.value = min(self._c1.value, verify_s)
            else:
                self._c1.add(verify_s)
            self._dense_seen += 1
            return
        self._longest = max(self._longest, g)
        a = self._arms[arm]
        if not self._hiccup(a, g, draft_s, verify_s):
            a.c_draft.add(draft_s / g)
            self._verify.setdefault(g + 1, _Ema(0.7)).add(verify_s)
        acc = a.acceptance
        acc.acc *= self.decay
        acc.trials *= self.decay
        for n in n_accepted:
            # Geometric model: n successes, then one failure unless every draft was accepted.
            acc.acc += n
            acc.trials += n + (1 if n < g else 0)

    def give_up_after(self, arm: int) -> float | None:
        """Seconds after which ``arm``'s draft step ends its round early (None: it never does).

        Only a measuring round (``arm``'s step cost is not yet known) can end early: when its first
        draft step took longer than ``give_up_ratio`` times a dense step, or than a step of a measured
        drafter in the same pool (one that drafts alike), the drafter can never be the fastest, so
        the round verifies that one draft instead of drafting more. Its cost is then recorded from
        that step (see :meth:`cut_short`).
        """
        a = self._arms[arm]
        c1 = self._c1.value
        if a.c_draft.value is not None or c1 is None:
            return None
        alike = [b.c_draft.value for b in self._arms
                 if b is not a and b.acceptance is a.acceptance and b.c_draft.value is not None]
        return self.give_up_ratio * min([c1, *alike])

    def cut_short(self, arm: int) -> None:
        """Record that ``arm``'s measuring round stopped after one draft step (for the stats)."""
        self._arms[arm].cut_short += 1

    def _hiccup(self, a: _Arm, g: int, draft_s: float, verify_s: float) -> bool:
        """Whether this round is ``a``'s first measurement and implausibly slow (see ``hiccup_ratio``).

        Its costs are then not recorded, so the drafter is measured again; its acceptance still
        counts. Only the first measurement is ever discarded: a drafter that is slow again is slow.
        """
        c1 = self._c1.value
        if a.hiccup or a.c_draft.value is not None or c1 is None:
            return False
        limit = self.hiccup_ratio * c1
        a.hiccup = draft_s / g > limit or (g <= 3 and verify_s > limit)
        return a.hiccup

    def batch_changed(self) -> None:
        """Rows stopped and left the batch: every step now costs less. The next round's measured
        cost rescales all cost estimates at once (dense, verify and draft steps alike), so decisions
        do not wait for each estimate to be re-measured, and the dense cost, which is only measured in
        dense rounds, does not stay at the larger batch's."""
        self._rescale = True

    def _rescale_costs(self, predicted: float | None, measured: float) -> None:
        self._rescale = False
        if not predicted or measured <= 0:
            return
        ratio = measured / predicted
        for ema in [self._c1, *self._verify.values(), *(a.c_draft for a in self._arms)]:
            if ema.value is not None:
                ema.value *= ratio

    def round_cost(self, arm: int, g: int) -> float | None:
        """Modelled seconds of a round of ``g`` drafts from ``arm`` (None before data)."""
        if g == 0:
            return self._c1.value
        cd, cv = self._arms[arm].c_draft.value, self.verify_cost(g + 1)
        return None if cd is None or cv is None else g * cd + cv

    def verify_cost(self, t: int) -> float | None:
        """Modelled seconds of a dense pass over ``t`` tokens per row (None before data)."""
        c1 = self._c1.value
        if t == 1 or not self._verify:
            return c1
        if t in self._verify:
            return self._verify[t].value
        if c1 is None:
            nearest = min(self._verify, key=lambda k: abs(k - t))
            return self._verify[nearest].value
        # Linear in t through the dense cost and the measured verify lengths.
        slopes = [(e.value - c1) / (k - 1) for k, e in self._verify.items()]
        slope = max(0.0, sum(slopes) / len(slopes))
        return c1 + slope * (t - 1)

    def expected_speedup(self, g: int, arm: int = 0, optimistic: bool = False) -> float | None:
        """Committed tokens per second with ``g`` drafts from ``arm``, relative to dense decoding
        (at the acceptance estimate, or its optimistic bound with ``optimistic``)."""
        c1, cost = self._c1.value, self.round_cost(arm, g)
        if c1 is None or cost is None:
            return None
        if g == 0:
            return 1.0
        acc = self._arms[arm].acceptance
        return expected_tokens(acc.alpha_upper if optimistic else acc.alpha, g) * c1 / cost

    def perfect_speedup(self, g: int, arm: int = 0) -> float | None:
        """The speedup of ``g`` drafts from ``arm`` if every draft were accepted (the limit)."""
        c1, cost = self._c1.value, self.round_cost(arm, g)
        return None if c1 is None or not cost else (g + 1) * c1 / cost

    # -------------------------------------------------------------- decisions
    def _worth_measuring(self, arm: int) -> bool:
        """Whether an unmeasured drafter gets a measuring round.

        One that reads a smaller budget of another's weights (see ``parents``) is measured only if
        those weights could beat dense decoding with every draft accepted, and no other weights draft
        a step more cheaply: fewer entries save the same reads whatever the weights, so only the
        cheapest weights' smaller budgets can be the fastest drafter.
        """
        parent = self._arms[arm].parent
        if parent is None:
            return True
        if (self.perfect_speedup(min(2, self.max_gamma), parent) or 0.0) <= 1.0:
            return False
        own = self._arms[parent].c_draft.value
        return all(a.c_draft.value is None or a.c_draft.value >= own for a in self._arms if a.parent is None)

    def _best_gamma(self, arm: int, limit: int) -> int:
        """The draft length (>= 1) that ``arm`` is expected to commit tokens fastest with."""
        return max(range(1, limit + 1), key=lambda g: self.expected_speedup(g, arm) or 0.0)

    def next_round(self, room: int) -> tuple[int, int]:
        """``(arm, gamma)`` for the next round; gamma is at most ``room - 1`` (tokens left)."""
        limit = max(0, min(self.max_gamma, room - 1))
        if not self.speculate or limit == 0:
            return 0, 0
        if self._dense_seen < self.first_dense_rounds:
            return 0, 0  # the first rounds measure the dense step
        limit = min(limit, max(self.first_gamma, self.growth * self._longest))
        for i, a in enumerate(self._arms):
            if a.c_draft.value is None and self._worth_measuring(i):  # measure every drafter once
                if a.parent is not None:  # the same weights over fewer entries: as long as they pay
                    return i, max(min(self.first_gamma, limit), self._best_gamma(a.parent, limit))
                return i, min(self.first_gamma, limit)
        best, best_s = (0, 0), self.margin  # the choice at the acceptance estimate
        short, short_s = (0, 0), 0.0  # the best draft length at the estimate, even below dense
        hopeful = False  # whether some draft length could pay at the optimistic acceptance
        for i in range(len(self._arms)):
            for g in range(1, limit + 1):
                s = self.expected_speedup(g, i)
                if s is not None and s > best_s:
                    best, best_s = (i, g), s
                if s is not None and s > short_s:
                    short, short_s = (i, g), s
                hopeful = hopeful or ((self.expected_speedup(g, i, optimistic=True) or 0.0) > self.margin
                                      and (self.perfect_speedup(g, i) or 0.0) > self.hope_margin)
        if best[1] == 0 and hopeful:
            # Dense looks best, but only on thin evidence: keep drafting (at the length the estimate
            # likes best) until the evidence settles it either way.
            best = short
        if best[1] == 0:
            # Dense is best for now; re-probe a short draft now and then, backing off each time, with
            # the cheapest drafter that would pay clearly if its drafts were all accepted (one whose
            # steps cost about as much as dense ones never can, whatever the text does).
            self._since_probe += 1
            if self._since_probe >= self.probe_every + self._probe_gap:
                self._since_probe = 0
                self._probe_gap = min(4 * self.probe_every, self._probe_gap + self.probe_every)
                g = min(2, limit)
                worth = [i for i in range(len(self._arms)) if (self.perfect_speedup(g, i) or 0.0) > self.hope_margin]
                if worth:
                    return min(worth, key=lambda i: self._arms[i].c_draft.value), g
            return 0, 0
        self._since_probe = 0
        self._probe_gap = 0
        return best

    def summary(self) -> dict:
        """What the controller decided, for the stats."""
        spec = [(a, g) for a, g in self.history if g > 0]
        return {
            "rounds": len(self.history),
            "speculative_rounds": len(spec),
            "dense_rounds": len(self.history) - len(spec),
            "mean_gamma": sum(g for _, g in spec) / len(spec) if spec else 0.0,
            "rounds_per_drafter": {a.name: sum(1 for i, _ in spec if i == k) for k, a in enumerate(self._arms)},
            "alpha": {a.name: round(a.acceptance.alpha, 4) for a in self._arms},
            "dense_step_ms": None if self._c1.value is None else round(1000 * self._c1.value, 3),
            "draft_step_ms": {a.name: None if a.c_draft.value is None else round(1000 * a.c_draft.value, 3)
                              for a in self._arms},
            "cut_short": {a.name: a.cut_short for a in self._arms if a.cut_short},
            "reason": self.reason,
        }


def acceptance_pools(arms, weight_names: list[str]) -> tuple[int, ...]:
    """Per arm ``(name, module, candidates, parent)``, the first arm that drafts alike (see
    ``GammaController.pools``): float copies of the same weights (e.g. the model's fp32 and a bf16
    copy) reading the same entries. Integer copies draft measurably differently (int4 accepts
    less), so they keep their own. ``weight_names``: the weights' names (``"float32"``, ``"int8"``)."""
    import torch

    keys = []
    for i, (_, _, cands, parent) in enumerate(arms):
        name = weight_names[i if parent is None else parent]
        dtype = getattr(torch, name, None)
        weights = "float" if isinstance(dtype, torch.dtype) and dtype.is_floating_point else name
        keys.append((cands, weights))
    return tuple(keys.index(k) for k in keys)
