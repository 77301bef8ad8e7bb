"""Side-by-side timing of dense baselines and Sparse-to-Dense on identical inputs.

Decode-phase time is what speculative decoding changes, so every method reports it separately
from prefill:

* transformers ``generate``: a streamer notes when the first new token arrives (the end of
  prefill); decode time is from there to the end.
* sparse2dense: one prefill is shared by the dense loop (``gamma=0``) and StD, which decode in turn
  from the same state, so both decode from byte-identical caches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers.generation.streamers import BaseStreamer

from .config import StdConfig
from .generation import batch_engine


@dataclass
class MethodResult:
    """One method's run. ``decode_s`` excludes prefill (and selection, reported separately)."""

    name: str
    sequences: torch.Tensor
    prefill_s: float
    decode_s: float
    steps: int  # decode steps after the first token: max new tokens per row - 1
    selection_s: float = 0.0
    stats: dict = field(default_factory=dict)

    @property
    def ms_per_token(self) -> float:
        return 1000 * self.decode_s / self.steps if self.steps else float("nan")


class _FirstTokenClock(BaseStreamer):
    """Notes when generate() hands over its first new token (the end of prefill)."""

    def __init__(self):
        self.calls = 0
        self.first_new: float | None = None

    def put(self, value):
        self.calls += 1
        if self.calls == 2 and self.first_new is None:  # call 1 is the prompt
            self.first_new = time.perf_counter()

    def end(self):
        pass


def time_hf_generate(model, input_ids, attention_mask, max_new_tokens: int, cache_implementation: str | None = None,
                     name: str | None = None, **kwargs) -> MethodResult:
    """Greedy ``model.generate`` with decode time measured from the first new token."""
    clock = _FirstTokenClock()
    extra = {"cache_implementation": cache_implementation} if cache_implementation else {}
    t0 = time.perf_counter()
    with torch.inference_mode():
        seq = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                             do_sample=False, streamer=clock, **extra, **kwargs)
    t1 = time.perf_counter()
    first = clock.first_new if clock.first_new is not None else t1
    steps = seq.shape[1] - input_ids.shape[1] - 1
    label = name or f"transformers generate ({cache_implementation or 'dynamic'} cache)"
    return MethodResult(label, seq, first - t0, t1 - first, steps)


def compare_methods(model, input_ids, attention_mask, max_new_tokens: int, config: StdConfig,
                    eos_token_id=None, pad_token_id=None, order=("std", "dense"), progress=None,
                    **model_inputs) -> dict[str, MethodResult]:
    """Prefill once, then decode with StD and with the dense loop from the same state.

    Returns ``{"std": ..., "dense": ...}`` (keys as in ``order``).
    """
    engine, group = batch_engine(model, input_ids, attention_mask, max_new_tokens, config, eos_token_id=eos_token_id,
                                 pad_token_id=pad_token_id, progress=progress, model_inputs=model_inputs)
    results: dict[str, MethodResult] = {}
    engine.prefill()
    snap = engine.snapshot()
    for method in order:
        engine.restore(snap)
        engine.decode(gamma=0 if method == "dense" else config.gamma)
        out = engine.output(group)
        steps = out.sequences.shape[1] - group.width - 1
        name = "sparse2dense dense loop" if method == "dense" else "sparse2dense StD"
        results[method] = MethodResult(
            name, out.sequences, out.stats.time_prefill, out.stats.time_decode, steps,
            selection_s=out.stats.time_selection if method != "dense" else 0.0, stats=out.stats.to_dict(),
        )
    return results
