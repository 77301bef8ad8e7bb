"""Batch state: which buffer slot holds which request row, and every per-row length a round moves.

The engine's KV buffers have one **slot** (batch index) per row it can hold. Slots ``[0, n)`` are
the **decoding batch**: every forward pass runs on views of those slots, so a round costs what
its live rows cost. A row that **joins** is prefilled into slot ``n`` (never into a slot the batch
reads) and becomes part of the batch once its prefill is done; nobody else's cache moves. A row
that **leaves** (finished or cancelled) stays in its slot as a hole, skipped by every commit,
until a compaction moves a row from the back of the batch into it (one row's K/V copied).

Per slot ``s`` (all ``[size]``; device tensors unless marked host):

* ``lo[s]``: its first column (left padding inside its prefill group); column ``c`` holds RoPE
  position ``c - lo[s]``;
* ``dense_len[s]``: committed columns of the dense buffer (the next write column);
* ``draft_len[s]``: committed generated tokens in the draft buffer;
* ``last[s]``: the last committed token, the first input of the next round;
* ``offsets[s]``: the adapter's per-row position offsets (M-RoPE deltas), ``[size, 1]``, or None;
* host: ``prompt_end`` (column of the first new token), ``n_gen``, ``limit`` (max new tokens),
  ``active`` (still generating), ``finished`` (reached a stop; see ``Group.pad_finished``);
* ``tokens[s]``: ``[size, capacity]`` the row's token ids by column (padding before ``lo``);
* ``candidates[s]``, ``keep[s]``: bool ``[size, capacity]`` prompt masks (droppable / kept);
* ``rows[s]``: ``(group, index in group)`` or None.

Committing or rolling back a round is moving ``dense_len``: rejected drafts stay in the buffer and
are overwritten by the next round.
"""

from __future__ import annotations

import torch

from .requests import Group

_DEVICE_STATE = ("lo", "dense_len", "draft_len", "last")
_HOST_STATE = ("prompt_end", "n_gen", "limit", "active", "finished")
_WIDE_STATE = ("tokens", "candidates", "keep")


class Slots:
    """Per-slot decoding state; see the module docstring."""

    def __init__(self, size: int, capacity: int, device: torch.device):
        self.size, self.capacity, self.device = size, capacity, device
        self.n = 0  # slots [0, n) are the decoding batch
        self.version = 0  # bumped whenever the batch's rows change
        for name in _DEVICE_STATE:
            setattr(self, name, torch.zeros(size, dtype=torch.long, device=device))
        for name in _HOST_STATE:
            dtype = torch.bool if name in ("active", "finished") else torch.long
            setattr(self, name, torch.zeros(size, dtype=dtype))
        self.tokens = torch.zeros(size, capacity, dtype=torch.long, device=device)
        self.candidates = torch.zeros(size, capacity, dtype=torch.bool, device=device)
        self.keep = torch.zeros(size, capacity, dtype=torch.bool, device=device)
        self.offsets: torch.Tensor | None = None
        self.rows: list[tuple[Group, int] | None] = [None] * size
        self.no_pad = True  # every batch row starts at column 0

    # ------------------------------------------------------------------ membership
    def place(self, group: Group, start: int, candidates: torch.Tensor, keep: torch.Tensor,
              offsets: torch.Tensor | None) -> None:
        """Put ``group``'s rows into slots ``[start, start + k)``, their prompts prefilled there.

        ``candidates``/``keep``: bool ``[k, P]``; ``offsets``: ``[k, 1]`` or None. Every per-slot
        value is written afresh, so nothing of a slot's previous row survives.
        """
        k, p = group.input_ids.shape
        rows = slice(start, start + k)
        mask = group.attention_mask.to(self.device).bool()
        self.lo[rows] = (~mask).sum(dim=1)
        self.dense_len[rows] = p
        self.draft_len[rows] = 0
        self.last[rows] = 0
        self.prompt_end[rows] = p
        self.n_gen[rows] = 0
        self.limit[rows] = group.max_new_tokens
        self.active[rows] = True
        self.finished[rows] = False
        self.tokens[rows] = group.pad_id
        self.tokens[rows, :p] = group.input_ids.to(self.device)
        for name, value in (("candidates", candidates), ("keep", keep)):
            t = getattr(self, name)
            t[rows] = False
            t[rows, :p] = value.to(self.device)
        if offsets is not None:
            if self.offsets is None:
                self.offsets = torch.zeros(self.size, offsets.shape[1], dtype=offsets.dtype, device=self.device)
            self.offsets[rows] = offsets.to(self.device)
        for i in range(k):
            self.rows[start + i] = (group, i)

    def join(self, k: int) -> None:
        """The ``k`` slots after the batch (prefilled by :meth:`place`) join it."""
        self.n += k
        self._changed()

    def holes(self) -> int:
        """Rows of the decoding batch that no longer generate."""
        return int((~self.active[: self.n]).sum())

    def moves(self) -> tuple[list[tuple[int, int]], int]:
        """The compaction that keeps the generating rows: ``([(hole, mover), ...], rows kept)``.

        Live rows keep their slots where they can; a live row from the back takes the slot of a
        stopped row in front.
        """
        keep = self.active[: self.n]
        m = int(keep.sum())
        holes = [i for i in torch.nonzero(~keep).flatten().tolist() if i < m]
        movers = [j for j in torch.nonzero(keep).flatten().tolist() if j >= m]
        return list(zip(holes, movers)), m

    def move(self, dst: int, src: int, swap: bool) -> None:
        """Move slot ``src``'s state to slot ``dst`` (``swap``: exchange them)."""
        names = _DEVICE_STATE + _HOST_STATE + _WIDE_STATE + (("offsets",) if self.offsets is not None else ())
        for name in names:
            t = getattr(self, name)
            if swap:
                t[[dst, src]] = t[[src, dst]]
            else:
                t[dst] = t[src]
        if swap:
            self.rows[dst], self.rows[src] = self.rows[src], self.rows[dst]
        else:
            self.rows[dst], self.rows[src] = self.rows[src], None

    def shrink(self, m: int) -> None:
        self.n = m
        self._changed()

    def _changed(self) -> None:
        self.version += 1
        self.no_pad = bool((self.lo[: self.n] == 0).all())

    # ------------------------------------------------------------------ commit
    def commit(self, block: torch.Tensor, count: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Append ``block[i, :count[i]]`` to the row in slot ``start + i`` if it is generating,
        honouring its EOS ids, length limit and stopping criteria.

        Args:
            block: LongTensor ``[m, T]``; count: host LongTensor ``[m]``.

        Returns:
            host LongTensor ``[m]``: tokens actually appended per row.
        """
        block_host = block.cpu()
        appended = torch.zeros(block.shape[0], dtype=torch.long)
        for i in range(block.shape[0]):
            r = start + i
            if not self.active[r]:
                continue
            kept = self._append_row(r, block[i], block_host[i], int(count[i]))
            appended[i] = kept
        return appended

    def _append_row(self, r: int, block: torch.Tensor, block_host: torch.Tensor, count: int) -> int:
        group, index = self.rows[r]
        handle = group.handles[index]
        n_gen = int(self.n_gen[r])
        begin = int(self.prompt_end[r]) + n_gen
        n = min(count, int(self.limit[r]) - n_gen)
        tokens = block_host[:n].tolist()
        self.tokens[r, begin : begin + n] = block[:n]
        kept = 0
        for tok in tokens:
            kept += 1
            if self.finished[r]:
                continue  # finished without padding: keeps generating real tokens
            hit_eos = tok in group.eos_ids
            hit_stop = (not hit_eos and group.stopping is not None
                        and bool(group.stopping(self.tokens[r : r + 1, : begin + kept], None).any()))
            if hit_eos or hit_stop:
                self.finished[r] = True
                group.finish_len[index] = n_gen + kept
                handle.finish_reason = "stop"
                if hit_eos or group.pad_finished:
                    self.active[r] = False
                    break
        if kept < n:
            self.tokens[r, begin + kept : begin + n] = group.pad_id
        self.n_gen[r] = n_gen + kept
        handle.tokens.extend(tokens[:kept])
        if n_gen + kept >= int(self.limit[r]):
            self.active[r] = False
            if not self.finished[r]:
                self.finished[r] = True
                group.finish_len[index] = n_gen + kept
                handle.finish_reason = "length"
        if group.streamer is not None and kept > 0:
            group.streamer.put(block_host[:kept])
        if group.callback is not None and kept > 0:
            group.callback(handle, tokens[:kept])
        return kept

    def limit_unpadded(self, group: Group) -> None:
        """``generate()`` without padding: once every row of ``group`` has stopped, rows that stopped
        early go on to the length of the last one to stop, as transformers does."""
        if group.pad_finished or group.limited or not all(f is not None for f in group.finish_len):
            return
        group.limited = True
        final = max(group.finish_len)
        for r in range(self.size):
            if self.rows[r] is not None and self.rows[r][0] is group:
                self.limit[r] = final
                if int(self.n_gen[r]) >= final:
                    self.active[r] = False

    def advance(self, n_acc: torch.Tensor, bonus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Move the committed lengths after :meth:`commit`: rows still generating committed
        ``n_acc + 1`` tokens ``[n]``; rows that just stopped keep theirs (nothing reads them again).

        Returns ``(old dense lengths [n], step [n])`` for the drafter's copy of the committed K/V.
        """
        n = self.n
        live = self.active[:n].to(self.device)
        step = torch.where(live, n_acc + 1, torch.zeros_like(n_acc))
        old = self.dense_len[:n].clone()
        self.dense_len[:n] += step
        self.last[:n] = torch.where(live, bonus, self.last[:n])
        return old, step
