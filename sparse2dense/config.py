"""Validated configuration for Sparse-to-Dense decoding."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

POLICIES = ("paper", "streaming", "last")
AUTO = "auto"
DRAFT_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
# gamma="auto" chooses each round's draft length in [0, MAX_AUTO_GAMMA].
MAX_AUTO_GAMMA = 12


# Weight-only integer formats for the drafter (Llama-style text models, CPU kernels).
INT_DRAFT_FORMATS = ("int8", "int4")


def parse_dtype(value) -> torch.dtype | str | None:
    """``None``, ``"auto"``, a floating ``torch.dtype`` (or a name such as ``"bf16"``), ``"int8"`` or ``"int4"``."""
    if value is None or value == AUTO or isinstance(value, torch.dtype) and value in DRAFT_DTYPES.values():
        return value
    if isinstance(value, str):
        name = value.lower().removeprefix("torch.")
        if name in DRAFT_DTYPES:
            return DRAFT_DTYPES[name]
        if name in INT_DRAFT_FORMATS:
            return name
    raise ValueError(
        "draft_dtype must be None, 'auto', torch.float32, torch.bfloat16, torch.float16, 'int8' or 'int4'; "
        f"got {value!r}.")


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
        budget: prompt KV entries the drafter attends to, per layer and KV head, or ``"auto"``
            (chosen from the prompt length, see :func:`sparse2dense.adaptive.auto_budget`; with
            ``gamma="auto"``, smaller budgets read from the same selection are measured too, see
            :func:`sparse2dense.adaptive.budget_variants`).
        gamma: draft tokens per round (0 means plain dense decoding), or ``"auto"``: each round's
            draft length is chosen from measured step costs and the acceptance seen so far, and
            speculation switches itself off when it cannot pay (see :mod:`sparse2dense.adaptive`).
        policy: how candidates are scored. ``"paper"``: mean attention that the kept (text) query
            tokens pay to each candidate during prefill. ``"last"``: the same, scored by the last
            ``observe_last`` prompt tokens only (candidates or not). ``"streaming"``: keep the most
            recent candidates (sink tokens + recent window, as in StreamingLLM).
        sink_tokens: text-only default: leading prompt tokens that are always kept.
        keep_last: text-only default: trailing prompt tokens (the question) that are always kept.
        max_score_queries: at most this many kept query tokens (the latest ones) score candidates.
        observe_last: ``"last"`` policy: how many final prompt tokens score candidates.
        reselect_every: 0 keeps the selection made after prefill; N > 0 re-selects the drafter's
            prompt entries every N rounds from the verifier's own queries of the latest committed
            token (scores accumulated with exponential decay).
        draft_dtype: the drafter's weights. None: the model's own. ``torch.bfloat16`` (or
            ``torch.float16``): a lower-precision copy of the language model's weights. ``"int8"``
            / ``"int4"``: weight-only integer copies run by a lean forward pass
            (:mod:`sparse2dense.lean`; Llama, Mistral, Qwen2 and Qwen3 text models on CPU). The
            verifier keeps the model's precision, so the output is unchanged; a copy costs memory
            (reported in the stats). ``"auto"`` picks from what the model and hardware support and
            free memory holds twice over (int8 on CPU for those families, else bf16 where the
            hardware multiplies it natively); with ``gamma="auto"`` a float copy is measured against
            the model's own weights and each round uses the faster. With ``gamma="auto"``, None
            means ``"auto"`` too; pass the model's own dtype to keep its weights.
        prefill_chunk: prompt tokens per prefill forward pass; bounds prefill memory.
    """

    budget: int | str = 1024
    gamma: int | str = 9
    policy: str = "paper"
    sink_tokens: int = 4
    keep_last: int = 64
    max_score_queries: int = 256
    observe_last: int = 32
    reselect_every: int = 0
    draft_dtype: torch.dtype | str | None = None
    prefill_chunk: int = 2048

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("policy", "draft_dtype") or (f.name in ("budget", "gamma") and value == AUTO):
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                allowed = " or 'auto'" if f.name in ("budget", "gamma") else ""
                raise ValueError(f"{f.name} must be an integer{allowed}, got {value!r}.")
        if self.budget != AUTO and self.budget < 1:
            raise ValueError(f"budget must be at least 1, got {self.budget}.")
        if self.gamma != AUTO and not 0 <= self.gamma <= 64:
            raise ValueError(f"gamma must be between 0 and 64, got {self.gamma}.")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {self.policy!r}.")
        if self.sink_tokens < 0:
            raise ValueError(f"sink_tokens must be >= 0, got {self.sink_tokens}.")
        if self.keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 (the question must stay visible), got {self.keep_last}.")
        if self.max_score_queries < 1:
            raise ValueError(f"max_score_queries must be >= 1, got {self.max_score_queries}.")
        if self.observe_last < 1:
            raise ValueError(f"observe_last must be >= 1, got {self.observe_last}.")
        if self.reselect_every < 0:
            raise ValueError(f"reselect_every must be >= 0, got {self.reselect_every}.")
        if self.prefill_chunk < 16:
            raise ValueError(f"prefill_chunk must be >= 16, got {self.prefill_chunk}.")
        self.draft_dtype = parse_dtype(self.draft_dtype)

    @property
    def auto_gamma(self) -> bool:
        return self.gamma == AUTO

    @property
    def max_gamma(self) -> int:
        """The largest draft length any round may use (buffers are sized for it)."""
        return MAX_AUTO_GAMMA if self.gamma == AUTO else int(self.gamma)

    @property
    def speculative(self) -> bool:
        """Whether a drafter is built at all (``gamma=0`` is plain dense decoding)."""
        return self.gamma == AUTO or self.gamma > 0
