"""Validated configuration for Sparse-to-Dense decoding."""

from __future__ import annotations

from dataclasses import dataclass, fields

POLICIES = ("paper", "streaming")


@dataclass(slots=True)
class StdConfig:
    """How the drafter is built and how many tokens it drafts per round.

    Vocabulary used across the package:

    * **candidate**: a prompt token whose KV entry the drafter may drop (visual tokens for
      Video-LLMs; the middle of the prompt for text-only models).
    * **kept**: a prompt token that is never dropped (sinks, instruction and question tokens).
    * **budget**: KV entries per layer and KV head that the drafter keeps from the prompt
      (kept tokens plus the selected candidates). Tokens generated later are added on top.
    * **gamma**: draft tokens proposed per round. A round commits 1..gamma+1 tokens: the accepted
      drafts plus one **bonus** token taken from the dense (verifier) logits.

    Attributes:
        budget: prompt KV entries the drafter attends to, per layer and KV head.
        gamma: draft tokens per round (0 means plain dense decoding).
        policy: how candidates are scored. ``"paper"``: mean attention that the kept (text) query
            tokens pay to each candidate during prefill. ``"streaming"``: keep the most recent
            candidates (sink tokens + recent window, as in StreamingLLM).
        sink_tokens: text-only default: leading prompt tokens that are always kept.
        keep_last: text-only default: trailing prompt tokens (the question) that are always kept.
        max_score_queries: at most this many kept query tokens (the latest ones) score candidates.
        prefill_chunk: prompt tokens per prefill forward pass; bounds prefill memory.
    """

    budget: int = 1024
    gamma: int = 9
    policy: str = "paper"
    sink_tokens: int = 4
    keep_last: int = 64
    max_score_queries: int = 256
    prefill_chunk: int = 2048

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "policy":
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{f.name} must be an integer, got {value!r}.")
        if self.budget < 1:
            raise ValueError(f"budget must be at least 1, got {self.budget}.")
        if not 0 <= self.gamma <= 64:
            raise ValueError(f"gamma must be between 0 and 64, got {self.gamma}.")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {self.policy!r}.")
        if self.sink_tokens < 0:
            raise ValueError(f"sink_tokens must be >= 0, got {self.sink_tokens}.")
        if self.keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 (the question must stay visible), got {self.keep_last}.")
        if self.max_score_queries < 1:
            raise ValueError(f"max_score_queries must be >= 1, got {self.max_score_queries}.")
        if self.prefill_chunk < 16:
            raise ValueError(f"prefill_chunk must be >= 16, got {self.prefill_chunk}.")
