"""Settings of the vLLM drafter, read from ``SPARSE2DENSE_VLLM_*`` environment variables.

vLLM's ``SpeculativeConfig`` has no field for a custom proposer's own options, so they travel as
environment variables, which every vLLM worker process inherits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

PREFIX = "SPARSE2DENSE_VLLM_"


@dataclass(frozen=True, slots=True)
class DraftSettings:
    """How the drafter selects KV entries and how much memory it may use.

    Attributes:
        budget: prompt KV entries per layer and KV head that a draft step reads.
        sink_tokens: leading prompt tokens always kept (attention sinks).
        keep_last: trailing prompt tokens always kept (the question or instruction).
        score_queries: the last prompt tokens whose attention scores the candidates, as in the paper.
        min_prompt: prompts shorter than this are decoded without drafts (a draft step would read
            nearly everything a dense step reads, so it cannot pay).
        max_generated: generated tokens a request's draft cache holds; past it the request decodes
            without drafts.
        pool_tokens: draft-cache entries for all running requests together (0: room for
            ``max_num_seqs`` requests of ``budget + max_generated`` entries, but at most a quarter
            of vLLM's own KV cache).
    """

    budget: int = 1024
    sink_tokens: int = 4
    keep_last: int = 64
    score_queries: int = 64
    min_prompt: int = 2048
    max_generated: int = 1024
    pool_tokens: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{PREFIX}{f.name.upper()} must be a non-negative integer, got {value!r}")
        for name in ("budget", "keep_last", "score_queries"):
            if getattr(self, name) < 1:
                raise ValueError(f"{PREFIX}{name.upper()} must be at least 1")
        if self.sink_tokens + self.keep_last > self.budget:
            raise ValueError(f"{PREFIX}BUDGET ({self.budget}) must hold the sink and kept tokens "
                             f"({self.sink_tokens} + {self.keep_last})")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "DraftSettings":
        """Settings from ``SPARSE2DENSE_VLLM_BUDGET`` and friends; unset ones keep their defaults."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = environ.get(PREFIX + f.name.upper())
            if raw is None:
                continue
            try:
                values[f.name] = int(raw)
            except ValueError:
                raise ValueError(f"{PREFIX}{f.name.upper()} must be an integer, got {raw!r}") from None
        unknown = sorted(k for k in environ if k.startswith(PREFIX)
                         and k[len(PREFIX):].lower() not in {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown setting {unknown[0]}; known: "
                             + ", ".join(PREFIX + f.name.upper() for f in fields(cls)))
        return cls(**values)
