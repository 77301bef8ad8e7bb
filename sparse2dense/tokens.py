"""Token choice: how each row of the decoding batch turns logits into tokens.

Every row belongs to a :class:`~sparse2dense.requests.Group` that says how:

* its logits processors (temperature, top-k/p, penalties, ...) run on its own rows, at every
  position with the prefix dense decoding would have there;
* ``greedy`` rows take the argmax;
* ``seeded`` rows (a request's ``seed=``) take ``argmax(scores + G_j)``, where ``G_j`` is Gumbel
  noise that depends only on the request's seed and the index ``j`` of the new token. By the
  Gumbel-max trick that is a sample from ``softmax(scores)``. The drafter uses the same noise at
  the same index, so verification is the greedy rule on noisy scores: the output is exactly the
  dense sample, whatever the batch, the draft lengths or the drafter; the seed reproduces it;
* ``shared`` rows (:func:`sparse2dense.generate` with ``do_sample=True``) draw from one random
  generator for the whole group, as ``model.generate`` does, and are verified with the
  speculative-sampling rule (:func:`~sparse2dense.acceptance.speculative_sample`).

Tensors crossing these functions: logits and scores ``[n, T, V]`` float32 for the ``n`` rows of
the decoding batch; drafts ``[n, k]`` long.
"""

from __future__ import annotations

import copy

import torch

# Processors that read only the scores (never the token ids): one call can serve every position.
_STATELESS = {"TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper",
              "TypicalLogitsWarper", "EpsilonLogitsWarper", "EtaLogitsWarper"}
_MASK64 = (1 << 64) - 1


def _mix(seed: int, index: int) -> int:
    """A 63-bit seed for (request seed, token index): splitmix64 of their combination."""
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def gumbel_noise(seed: int, index: int, vocab: int) -> torch.Tensor:
    """Gumbel(0, 1) noise ``[vocab]`` float32 for new token ``index`` of a request seeded ``seed``
    (CPU generator, so the same on every device)."""
    gen = torch.Generator().manual_seed(_mix(seed, index))
    return torch.empty(vocab, dtype=torch.float32).exponential_(generator=gen).log_().neg_()


def check_setting(name: str, value) -> None:
    """One-sentence ``ValueError`` for a sampling setting out of range."""
    if name == "top_k":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"top_k must be a non-negative integer, got {value!r}.")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}.")
    if name in ("temperature", "repetition_penalty") and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}.")
    if name in ("top_p", "min_p") and not 0 <= value <= 1:
        raise ValueError(f"{name} must be between 0 and 1, got {value}.")


def default_processors(model, input_ids, do_sample: bool, **settings):
    """The logits processors ``model.generate`` would build for these settings (None if none).

    Uses transformers' own builder so the processors, their order and their defaults (e.g.
    ``top_k=50`` when sampling) are exactly those of ``model.generate``.
    """
    overrides = {k: v for k, v in settings.items() if v is not None}
    for name, value in overrides.items():
        check_setting(name, value)
    if not do_sample and not overrides:
        return None
    base = getattr(model, "generation_config", None)
    if base is None or not hasattr(model, "_get_logits_processor"):
        raise ValueError("sampling settings need a transformers model with a generation_config.")
    gen_cfg = copy.deepcopy(base)
    gen_cfg.do_sample = do_sample
    for name, value in overrides.items():
        setattr(gen_cfg, name, value)
    procs = model._get_logits_processor(
        generation_config=gen_cfg, input_ids_seq_length=input_ids.shape[1], encoder_input_ids=input_ids,
        logits_processor=None, device=input_ids.device, model_kwargs={},
    )
    return procs if len(procs) else None


def _stateless(procs) -> bool:
    return all(type(p).__name__ in _STATELESS for p in procs)


class TokenChooser:
    """Token choice for the rows of the decoding batch held by ``slots`` (see the module docstring).

    The layout (which rows process, sample or carry seeds) is rebuilt whenever the batch changes.
    """

    def __init__(self, slots, vocab: int):
        self.slots = slots
        self.vocab = vocab
        self._version = -1
        self.proc_groups: list = []  # (group, host rows) with logits processors
        self.shared: list = []  # (generator, rows) of "shared" groups; rows: slice or LongTensor
        self.seeded: list[int] = []  # rows with per-request seeds
        self.plain = True  # every row greedy without processors
        self.all_shared = False  # every row samples from one shared generator
        self._noise: dict[int, dict[int, torch.Tensor]] = {}  # handle id -> token index -> [V]

    def refresh(self) -> None:
        s = self.slots
        if s.version == self._version:
            return
        self._version = s.version
        by_group: dict[int, tuple] = {}
        for r in range(s.n):
            group, _ = s.rows[r]
            by_group.setdefault(id(group), (group, []))[1].append(r)
        self.proc_groups, self.shared, self.seeded = [], [], []
        for group, rows in by_group.values():
            if group.processors is not None:
                self.proc_groups.append((group, rows))
            if group.sampling == "shared":
                index = slice(None) if len(rows) == s.n else torch.tensor(rows, device=s.device)
                self.shared.append((group.generator, index))
            elif group.sampling == "seeded":
                self.seeded.extend(rows)
        self.plain = not self.proc_groups and not self.shared and not self.seeded
        self.all_shared = len(self.shared) == 1 and isinstance(self.shared[0][1], slice)

    # ------------------------------------------------------------------ processors
    def process(self, logits: torch.Tensor, drafts: torch.Tensor, draft_offset: bool = False) -> torch.Tensor:
        """Apply each group's processors at each of the ``T`` positions of ``logits`` ``[n, T, V]``.

        Position ``i`` of row ``r`` is processed with the prefix that dense decoding would have
        there: the committed tokens, then ``drafts[r, :i]`` (for a draft step, all of ``drafts``).
        Rows of a group whose prefixes have the same length share one call. Returns float32 scores
        ``[n, T, V]`` (the logits themselves where no row has processors).
        """
        if not self.proc_groups:
            return logits
        s = self.slots
        n, t, _ = logits.shape
        k = drafts.shape[1]
        base = s.prompt_end[:n] + s.n_gen[:n]  # [n] host
        ext = s.tokens[:n].clone()
        if k:
            cols = base.to(s.device).unsqueeze(1) + torch.arange(k, device=s.device)
            ext.scatter_(1, cols, drafts)
        out = logits.clone()
        live = s.active[:n]
        for group, rows in self.proc_groups:
            whole = len(rows) == n
            if _stateless(group.processors):
                index = slice(None) if whole else torch.tensor(rows, device=s.device)
                flat = logits[index].reshape(-1, logits.shape[-1]).clone()
                dummy = ext[:1, :1].expand(flat.shape[0], 1)
                out[index] = group.processors(dummy, flat).float().view(-1, t, logits.shape[-1])
                continue
            idx = torch.tensor(rows)
            for i in range(t):
                lens = base[idx] + (k if draft_offset else i)
                for length in sorted(set(lens[live[idx]].tolist())):
                    pick = (lens == length) & live[idx]
                    sub = slice(None) if whole else idx.to(s.device)
                    scores = group.processors(ext[sub, :length], logits[sub, i].clone())
                    out[idx[pick].to(s.device), i] = scores[pick.to(s.device)].float()
        return out

    # ------------------------------------------------------------------ choices
    def noise(self, rows: list[int], first: list[int], t: int) -> torch.Tensor:
        """Gumbel noise ``[len(rows), t, V]`` for token indices ``first[i] .. first[i] + t - 1`` of row ``rows[i]``."""
        s = self.slots
        out = []
        for r, j0 in zip(rows, first):
            group, i = s.rows[r]
            cache = self._noise.setdefault(group.handles[i].id, {})
            for j in [j for j in cache if j < j0]:
                del cache[j]
            out.append(torch.stack([cache.setdefault(j, gumbel_noise(group.seeds[i], j, self.vocab))
                                    for j in range(j0, j0 + t)]))
        return torch.stack(out).to(s.device)

    def forget(self, handle_id: int) -> None:
        self._noise.pop(handle_id, None)

    def pick(self, scores: torch.Tensor, first_index: torch.Tensor, draw: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens ``[n, T]`` from processed scores ``[n, T, V]`` whose position ``i`` is new token
        ``first_index[r] + i`` (host ``[n]``) of row ``r``.

        Returns ``(tokens, probs)``: ``probs`` ``[n, T, V]`` holds the distributions of the
        ``shared`` rows (None without any). With ``draw`` their tokens are sampled from them (a
        drafter's or prefill's choice); without, their tokens are left to the speculative-sampling
        rule (a verify pass) and only the other rows' tokens are meaningful.
        """
        if self.plain:
            return scores.argmax(dim=-1), None
        noisy = scores
        if self.seeded:
            rows = self.seeded
            noisy = scores.clone()
            noisy[rows] += self.noise(rows, first_index[rows].tolist(), scores.shape[1])
        if self.all_shared:
            p = torch.softmax(scores, dim=-1)
            if not draw:
                return scores.new_zeros(scores.shape[:2], dtype=torch.long), p
            return torch.multinomial(p.reshape(-1, p.shape[-1]), 1, generator=self.shared[0][0]).view(p.shape[:2]), p
        tokens = noisy.argmax(dim=-1)
        if not self.shared:
            return tokens, None
        probs = torch.zeros_like(scores)
        for gen, index in self.shared:
            p = torch.softmax(scores[index], dim=-1)
            probs[index] = p
            if draw:
                tokens[index] = torch.multinomial(p.reshape(-1, p.shape[-1]), 1, generator=gen).view(p.shape[:2])
        return tokens, probs

    def first(self, group, logits: torch.Tensor) -> torch.Tensor:
        """The first new token of each row of a group that just finished prefill: LongTensor ``[k]``
        from its last prompt position's logits ``[k, 1, V]`` (processed with the prompt as prefix)."""
        scores = logits[:, 0]
        if group.processors is not None:
            prefix = group.input_ids.to(scores.device)
            scores = group.processors(prefix, scores.clone()).float()
        if group.sampling == "shared":
            return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=group.generator).squeeze(1)
        if group.sampling == "seeded":
            noise = torch.stack([gumbel_noise(seed, 0, self.vocab) for seed in group.seeds]).to(scores.device)
            scores = scores + noise
        return scores.argmax(dim=-1)
