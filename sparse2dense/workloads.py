"""Real workloads for the demo, the benchmarks and the tests: chat prompts built from real text.

The text is Python's own documentation (``pydoc_data.topics``, about 700 KB installed with every
Python): real English technical prose, so acceptance measured on it means something.
"""

from __future__ import annotations

import torch

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


def chat_prompts(tokenizer, n: int, context_tokens: int) -> list[list[int]]:
    """``n`` chat prompts as token ids: prompt ``i`` holds a different slice of the docs and question ``i``.

    Prompt i's slice is ``context_tokens - 97 * i`` tokens, so prompts differ slightly in length.
    """
    doc = tokenizer(documentation_text(), add_special_tokens=False).input_ids
    rows = []
    for i in range(n):
        size = max(64, context_tokens - 97 * i)
        start = (i * 9973) % max(1, len(doc) - size)
        context = tokenizer.decode(doc[start : start + size])
        messages = [{"role": "user", "content": f"{context}\n\n{QUESTIONS[i % len(QUESTIONS)]}"}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        rows.append(list(ids))
    return rows


def build_prompts(tokenizer, batch: int, context_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded :func:`chat_prompts` (so a batch exercises left padding).

    Returns:
        ``(input_ids, attention_mask)``, each ``[batch, prompt_len]``.
    """
    rows = chat_prompts(tokenizer, batch, context_tokens)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((batch, width), pad, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r) :] = torch.tensor(r)
        attention_mask[i, width - len(r) :] = 1
    return input_ids, attention_mask
