"""When drafting pays: measured step costs per batch size decide each round, as ``gamma="auto"``
does in sparse2dense's own engine (:mod:`sparse2dense.adaptive`).

With ``n`` drafting requests, acceptance ``a`` and ``g`` drafts, a round makes
``n * (1 - a**(g + 1)) / (1 - a)`` tokens in ``g * draft_step + verify_pass`` seconds, while plain
decoding makes ``n`` tokens per ``dense_pass``. The gate drafts when the first rate is higher,
measures whichever option it has not seen at a batch size, and re-measures the losing option
every ``probe_every`` rounds so that the costs stay current.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class _Costs:
    dense: float | None = None   # seconds per target pass without drafts
    verify: float | None = None  # seconds per target pass verifying the drafts
    draft: float | None = None   # seconds per draft step
    rounds: int = 0


@dataclass(slots=True)
class SpeculationGate:
    """Per-batch-size cost estimates and the on/off decision.

    Attributes:
        gamma: drafts per round. smoothing: weight of a new measurement in the running estimates.
        probe_every: rounds between re-measurements of the option not taken.
    """

    gamma: int
    smoothing: float = 0.3
    probe_every: int = 32
    acceptance: float = 0.7
    costs: dict[int, _Costs] = field(default_factory=dict)
    decisions: dict[str, int] = field(default_factory=lambda: {"draft": 0, "dense": 0})

    def _mix(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.smoothing) * old + self.smoothing * new

    def record_pass(self, n: int, drafted: bool, seconds: float) -> None:
        """A target pass over ``n`` drafting-capable requests took ``seconds`` (no prefill in it)."""
        c = self.costs.setdefault(n, _Costs())
        if drafted:
            c.verify = self._mix(c.verify, seconds)
        else:
            c.dense = self._mix(c.dense, seconds)

    def record_draft(self, n: int, seconds_per_step: float) -> None:
        c = self.costs.setdefault(n, _Costs())
        c.draft = self._mix(c.draft, seconds_per_step)

    def record_acceptance(self, accepted: int, drafted: int) -> None:
        if drafted:
            self.acceptance = self._mix(self.acceptance, accepted / drafted)

    def expected_tokens(self) -> float:
        """Tokens one request gains per round: accepted drafts plus the verifier's own token."""
        a = min(self.acceptance, 0.999)
        return (1 - a ** (self.gamma + 1)) / (1 - a)

    def should_draft(self, n: int) -> bool:
        """Draft this round for ``n`` requests?"""
        c = self.costs.setdefault(n, _Costs())
        c.rounds += 1
        if c.verify is None or c.draft is None:
            choice = True
        elif c.dense is None:
            choice = False
        else:
            draft_rate = self.expected_tokens() / (self.gamma * c.draft + c.verify)
            choice = draft_rate > 1 / c.dense
            if c.rounds % self.probe_every == 0:
                choice = not choice
        self.decisions["draft" if choice else "dense"] += 1
        return choice
