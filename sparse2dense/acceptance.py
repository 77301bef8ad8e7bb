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


def speculative_sample(
    draft: torch.Tensor,
    q: torch.Tensor,
    p: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling: the committed tokens are distributed exactly as dense sampling's.

    Draft token d_i (sampled from q_i) is accepted with probability ``min(1, p_i(d_i) / q_i(d_i))``.
    At the first rejection the replacement token is drawn from the residual
    ``normalize(max(0, p_i - q_i))``; when every draft is accepted the bonus token is drawn from
    ``p_{gamma+1}``. (Leviathan et al., 2023; Chen et al., 2023.)

    Args:
        draft: LongTensor ``[batch, gamma]``: d_1..d_gamma.
        q: float ``[batch, gamma, vocab]``: the drafter's (processed) distributions d_i was drawn from.
        p: float ``[batch, gamma + 1, vocab]``: the dense (processed) distributions at each position.
        generator: optional ``torch.Generator`` for the uniform draws and the resampling.

    Returns:
        ``(n_accepted, next_token)``: LongTensor ``[batch]`` accepted drafts (0..gamma), and
        LongTensor ``[batch]`` the token committed after them (residual sample or bonus sample).
    """
    b, g = draft.shape
    if q.shape[:2] != (b, g) or p.shape[:2] != (b, g + 1) or q.shape[2] != p.shape[2]:
        raise ValueError(
            f"expected q [batch, gamma, vocab] and p [batch, gamma + 1, vocab] for draft {tuple(draft.shape)}, "
            f"got {tuple(q.shape)} and {tuple(p.shape)}."
        )
    if g == 0:
        return draft.new_zeros(b), torch.multinomial(p[:, 0], 1, generator=generator).squeeze(1)
    idx = draft.unsqueeze(-1)
    p_d = p[:, :g].gather(2, idx).squeeze(-1)  # [B, g]
    q_d = q.gather(2, idx).squeeze(-1)
    u = torch.rand(b, g, generator=generator, device=draft.device, dtype=p.dtype)
    # u * q < p  <=>  u < p / q for q > 0 (a drawn token always has q > 0); no division needed.
    accept = (u * q_d < p_d).to(torch.int64)
    n_accepted = accept.cumprod(dim=1).sum(dim=1)
    # Distribution of the next token: residual at the first rejection, p_{gamma+1} otherwise.
    rows = torch.arange(b, device=draft.device)
    pos = n_accepted.clamp(max=g - 1)
    residual = (p[rows, pos] - q[rows, pos]).clamp(min=0)
    mass = residual.sum(dim=-1, keepdim=True)
    # p == q up to rounding leaves no residual mass; rejection then had probability ~0, and p is the
    # correct fallback.
    residual = torch.where(mass > 0, residual / mass.clamp(min=torch.finfo(p.dtype).tiny), p[rows, pos])
    dist = torch.where((n_accepted == g).unsqueeze(1), p[:, g], residual)
    next_token = torch.multinomial(dist, 1, generator=generator).squeeze(1)
    return n_accepted, next_token
