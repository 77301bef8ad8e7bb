"""Statistics are output: what each call and each request did, round by round.

Vocabulary (used by every counter here):

* a **round** is one verify pass of the decoding batch; a row takes part in the rounds it is still
  generating in (a *row-round*);
* **drafted** / **accepted** count draft tokens proposed and kept; the **bonus** token that every
  round commits after the accepted drafts comes from the verifier, so a round commits
  ``accepted + 1`` tokens per row and ``mean_accepted_per_round`` is 1.0 for dense decoding and
  ``gamma + 1`` for a perfect drafter.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass
class StdStats:
    """Statistics of one engine (for :func:`sparse2dense.generate`: of the call, all rows together).

    ``mean_accepted_per_round`` counts committed tokens per row-round, the bonus token included,
    so plain dense decoding scores 1.0 and a perfect drafter scores ``gamma + 1``.
    """

    batch_size: int = 0
    prompt_len: int = 0
    new_tokens: int = 0  # tokens generated, summed over rows (padding after EOS excluded)
    rounds: int = 0  # verify passes after prefill
    drafted: int = 0  # draft tokens proposed, summed over active rows
    accepted: int = 0  # draft tokens accepted, summed over active rows
    mean_accepted_per_round: float = 0.0
    acceptance_rate: float = 0.0
    per_position_acceptance: list[float] = field(default_factory=list)  # P(d_i accepted | d_i drafted)
    gamma: int = 0  # the fixed draft length, or the largest one gamma="auto" may choose
    gamma_mode: str = "fixed"  # "fixed" or "auto"
    budget: int = 0  # the budget used (resolved when budget="auto")
    policy: str = "paper"
    draft_dtype: str | None = None  # the drafter's weight precision when it differs from the model's
    draft_weights_mb: float = 0.0  # memory of the drafter's own weight copy (0: shares the model's)
    speculation: str = "on"  # "on", "off" (dense decoding only) or "partial" (auto turned it off at times)
    fallback_reason: str = ""  # why speculation was turned off, when it was
    auto: dict = field(default_factory=dict)  # gamma="auto": rounds, dense rounds, mean gamma, costs
    reselections: int = 0  # times the drafter's selection was refreshed during decoding
    compactions: int = 0  # times rows that had stopped were dropped from the forward passes
    # One entry per round: [rows decoded, draft length, draft seconds, verify seconds].
    round_log: list[list[float]] = field(default_factory=list)
    n_visual: list[int] = field(default_factory=list)  # visual (image/video) prompt tokens per row
    n_text: list[int] = field(default_factory=list)  # other non-padding prompt tokens per row
    n_candidates: list[int] = field(default_factory=list)  # droppable prompt tokens per row
    n_selected: list[int] = field(default_factory=list)  # prompt KV entries the drafter keeps per row
    dense_cache_mb: float = 0.0
    draft_cache_mb: float = 0.0
    time_prefill: float = 0.0
    time_selection: float = 0.0
    time_draft: float = 0.0
    time_verify: float = 0.0
    time_decode: float = 0.0  # everything after prefill and selection
    time_total: float = 0.0
    tokens_per_second: float = 0.0  # new_tokens / time_decode

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StdOutput:
    """``sequences``: LongTensor ``[B, prompt_len + new]`` laid out like ``model.generate``."""

    sequences: torch.Tensor
    stats: StdStats


@dataclass
class RequestStats:
    """Statistics of one request of an :class:`~sparse2dense.Engine` (``handle.stats``).

    Times are seconds from :meth:`~sparse2dense.Engine.submit`; ``time_first_token`` is the time to
    first token (queueing and prefill included).
    """

    prompt_tokens: int = 0
    new_tokens: int = 0
    rounds: int = 0  # rounds this request's row took part in while generating
    drafted: int = 0
    accepted: int = 0
    acceptance_rate: float = 0.0
    mean_accepted_per_round: float = 0.0  # committed tokens per round, the bonus token included
    speculation: str = "off"  # "on" when at least one of its rounds drafted
    drafters: dict[str, int] = field(default_factory=dict)  # rounds per drafter (gamma="auto" arms)
    n_candidates: int = 0  # droppable prompt tokens
    n_selected: int = 0  # prompt KV entries its drafter reads
    time_queued: float = 0.0  # until its prefill started
    time_prefill: float = 0.0
    time_first_token: float | None = None
    time_total: float | None = None

    def finish(self) -> None:
        """Derive the rates from the counters."""
        self.acceptance_rate = self.accepted / self.drafted if self.drafted else 0.0
        if self.rounds:
            self.mean_accepted_per_round = (self.new_tokens - 1) / self.rounds if self.new_tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(stats: StdStats, committed: int, row_rounds: int, accept_at: list[int], draft_at: list[int]) -> None:
    """Fill the derived fields of ``stats`` from the round counters (see :class:`StdStats`)."""
    stats.mean_accepted_per_round = committed / row_rounds if row_rounds else 1.0
    stats.acceptance_rate = stats.accepted / stats.drafted if stats.drafted else 0.0
    stats.per_position_acceptance = [a / d if d else 0.0 for a, d in zip(accept_at[: stats.gamma], draft_at[: stats.gamma])]
    stats.tokens_per_second = stats.new_tokens / stats.time_decode if stats.time_decode > 0 else 0.0
