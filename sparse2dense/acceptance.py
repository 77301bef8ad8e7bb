"""Acceptance rules: pure functions on token tensors.

Names follow the speculative-decoding literature: ``draft`` tokens d_1..d_gamma are proposed by the
sparse drafter; ``target`` tokens t_1..t_{gamma+1} are what dense decoding picks at each position of the
verify pass. The verify pass feeds ``[last, d_1, ..., d_gamma]``, so t_i is dense decoding's choice
after having seen d_1..d_{i-1}.
"""

from __future__ import annotations

import torch


def greedy_accept(draft: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Longest matching prefix plus one bonus token.

    Args:
        draft: LongTensor ``[batch, gamma]``: d_1..d_gamma.
        target: LongTensor ``[batch, gamma + 1]``: dense argmax after ``last, d_1, ..., d_gamma``.

    Returns:
        ``(n_accepted, bonus)``: LongTensor ``[batch]`` with the number of accepted drafts
        (0..gamma), and LongTensor ``[batch]`` with the bonus token ``target[b, n_accepted[b]]``.
        The committed block of row b is ``draft[b, :n_accepted[b]]`` followed by ``bonus[b]``,
        which is exactly what dense greedy decoding would emit.
    """
    if draft.ndim != 2 or target.ndim != 2 or target.shape != (draft.shape[0], draft.shape[1] + 1):
        raise ValueError(
            f"expected draft [batch, gamma] and target [batch, gamma + 1], got {tuple(draft.shape)} and {tuple(target.shape)}."
        )
    matches = (draft == target[:, :-1]).to(torch.int64)
    # cumprod turns the first mismatch and everything after it into zeros.
    n_accepted = matches.cumprod(dim=1).sum(dim=1)
    bonus = target.gather(1, n_accepted.unsqueeze(1)).squeeze(1)
    return n_accepted, bonus
