"""``StDProposer``: vLLM's ``custom_class`` proposer that drafts with the target model itself.

One round, for the requests in vLLM's batch:

1. **select** (once per request, inside the target's last prefill pass): the attention wrapper
   scores the prompt's entries with the queries of its last tokens and copies the chosen K/V into
   the request's row of the draft pool (:mod:`.select`, :mod:`.pool`).
2. **commit** (each round): the tokens vLLM verified since the last round are copied from its
   paged cache into the draft pool, so drafts read the verifier's K/V.
3. **draft**: ``num_speculative_tokens`` forward passes of the target model over all drafting
   requests at once, under attention metadata of the draft pool. The wrapper sends those passes to
   vLLM's CPU attention kernel over the pool instead of the paged cache, and nothing is written to
   the paged cache.
4. **verify and accept** stay vLLM's: its scheduler runs the drafts in the next target pass and
   its rejection sampler keeps the prefix the target would have produced.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from . import check_version, paged
from .gate import SpeculationGate
from .pool import DraftPool, DraftRow
from .select import select_into
from .settings import DraftSettings

log = logging.getLogger("sparse2dense.vllm")


@dataclass(slots=True)
class DraftMetadata:
    """Attention metadata of one draft step over the pool (R requests, one token each).

    Attributes:
        block_table: int32 ``[R, max_blocks]`` pool blocks; seq_lens: int32 ``[R]`` entries read,
        the new token's included; query_start_loc: int32 ``[R + 1]``; slot_mapping: int64 ``[R]``
        pool slot of each new token; scheduler_metadata: vLLM's CPU kernel schedule.
    """

    block_table: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    slot_mapping: torch.Tensor
    scheduler_metadata: torch.Tensor


class StDProposer:
    """Sparse-to-Dense drafter for ``speculative_config={"method": "custom_class", ...}``.

    vLLM builds it with the ``VllmConfig`` and hands it the target model in :meth:`load_model`;
    :class:`sparse2dense.vllm.StDWorker` hands it the model runner (the batch's request ids and
    prompt lengths), which ``custom_class`` does not pass.
    """

    def __init__(self, vllm_config) -> None:
        check_version()
        self.vllm_config = vllm_config
        self.gamma = int(vllm_config.speculative_config.num_speculative_tokens)
        self.settings = DraftSettings.from_env()
        self.runner = None
        self.layers: list = []
        self.layer_names: list[str] = []
        self.pool: DraftPool | None = None
        self._tables: torch.Tensor | None = None  # the last target pass's block table [R, blocks]
        self._scoring: list[tuple[str, int, int, torch.Tensor, torch.Tensor, DraftRow]] = []
        self.totals = {"rounds": 0, "drafted": 0, "accepted": 0, "requests": 0}
        self.gate = SpeculationGate(self.gamma)
        self._last_round: tuple[float, int, bool] | None = None  # (end time, rows, drafted)
        self._mixed = False  # the last target pass also ran prefill tokens

    # -- set-up ------------------------------------------------------------------------------
    def attach(self, runner) -> None:
        """Called by :class:`StDWorker` once the model runner exists."""
        self.runner = runner

    def load_model(self, model) -> None:
        """vLLM passes the target model here; wrap its attention layers' backends."""
        from vllm import _custom_ops
        from vllm.model_executor.layers.attention.attention import Attention
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

        for name, module in model.named_modules():
            if isinstance(module, Attention):
                if not isinstance(module.impl, CPUAttentionBackendImpl):
                    raise RuntimeError(
                        f"sparse2dense's vLLM drafter runs on vLLM's CPU attention backend; layer {name} "
                        f"uses {type(module.impl).__name__}. GPU backends are not supported yet (docs/vllm.md)")
                index = len(self.layers)
                self.layers.append(module)
                self.layer_names.append(module.layer_name)
                module.impl.forward = self._wrap(index, module.impl.forward)
        if not self.layers:
            raise RuntimeError("sparse2dense's vLLM drafter found no attention layers in the model")
        self._ops = _custom_ops

    def _ensure_pool(self) -> DraftPool:
        if self.pool is None:
            kv = self.layers[0].kv_cache
            if not isinstance(kv, torch.Tensor) or kv.dim() != 4:
                raise RuntimeError("the KV cache is not allocated yet, or has an unexpected shape")
            _, hk, bs, d2 = kv.shape
            impl = self.layers[0].impl
            paged.check_layout(hk, d2 // 2, bs, kv.dtype, self.layers[0].isa, impl.kv_cache_dtype)
            s = self.settings
            max_seqs = self.vllm_config.scheduler_config.max_num_seqs
            per_row = -(-(s.budget + s.max_generated + self.gamma + 1) // bs)
            # At most a quarter of vLLM's own cache by default: the pool must never rival it.
            blocks = -(-s.pool_tokens // bs) if s.pool_tokens else min(max_seqs * per_row, kv.shape[0] // 4)
            self.pool = DraftPool(len(self.layers), blocks, hk, bs, d2 // 2, kv.dtype)
            log.info("StD draft pool: %d blocks of %d entries (%.0f MiB)", blocks, bs,
                     sum(t.numel() * t.element_size() for t in self.pool.kv) / 2**20)
        return self.pool

    # -- the attention wrapper -----------------------------------------------------------------
    def _wrap(self, index: int, original):
        def forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
            if isinstance(attn_metadata, DraftMetadata):
                return self._draft_attention(index, layer, query, key, value, attn_metadata, output)
            result = original(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
            if attn_metadata is not None and self.runner is not None:
                if index == 0:
                    self._observe(attn_metadata)
                for req_id, prompt_len, i, rows, positions, row in self._scoring:
                    select_into(self.pool.caches[index], self.pool.slots(row, torch.arange(row.n_selected)),
                                kv_cache, self._tables[i].long(), query[rows], positions, prompt_len,
                                layer.impl.scale, self.settings, layer.isa)
            return result

        return forward

    def _observe(self, meta) -> None:
        """At the first layer of a target pass: note the block table, find prefills that end now."""
        self._tables = meta.block_table
        self._scoring = []
        batch = self.runner.input_batch
        qsl = meta.query_start_loc.tolist()
        seq_lens = meta.seq_lens.tolist()
        self._mixed = any(b - a > self.gamma + 1 for a, b in zip(qsl, qsl[1:]))
        for i, req_id in enumerate(batch.req_ids[: len(seq_lens)]):
            prompt_len = int(batch.num_prompt_tokens[i])
            start = seq_lens[i] - (qsl[i + 1] - qsl[i])
            ends_prefill = start < prompt_len <= seq_lens[i]
            if not ends_prefill or prompt_len < self.settings.min_prompt:
                continue
            pool = self._ensure_pool()
            if req_id in pool.rows and pool.rows[req_id].prompt_len == prompt_len:
                continue  # recomputed after preemption: the draft cache still holds its selection
            row = pool.open(req_id, min(self.settings.budget, prompt_len), prompt_len)
            if row is None:
                continue
            lo = max(start, prompt_len - self.settings.score_queries)
            rows = torch.arange(qsl[i] + lo - start, qsl[i] + prompt_len - start)
            self._scoring.append((req_id, prompt_len, i, rows, torch.arange(lo, prompt_len), row))
            self.totals["requests"] += 1

    def _draft_attention(self, index, layer, query, key, value, meta: DraftMetadata, output):
        impl = layer.impl
        key_cache, value_cache = self.pool.caches[index]
        r = meta.seq_lens.shape[0]
        ops = self._ops
        ops.cpu_attn_reshape_and_cache(key[:r], value[:r], key_cache, value_cache, meta.slot_mapping, layer.isa,
                                       k_scale=1.0, v_scale=1.0, kv_cache_dtype=impl.kv_cache_dtype)
        ops.cpu_attention_with_kv_cache(
            query=query[:r], key_cache=key_cache, value_cache=value_cache, output=output[:r],
            query_start_loc=meta.query_start_loc, seq_lens=meta.seq_lens, scale=impl.scale, causal=True,
            alibi_slopes=impl.alibi_slopes, sliding_window=impl.sliding_window, block_table=meta.block_table,
            softcap=impl.logits_soft_cap, scheduler_metadata=meta.scheduler_metadata, s_aux=impl.sinks,
            k_scale=1.0, v_scale=1.0, kv_cache_dtype=impl.kv_cache_dtype)
        return output

    # -- one round ------------------------------------------------------------------------------
    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec, token_ids_cpu,
                slot_mappings=None) -> list[list[int]]:
        """Draft tokens for every request of the batch (``[]`` where a request does not draft).

        Args:
            sampled_token_ids: per batch row, the tokens vLLM accepted this step (empty while a
                request is still prefilling).
            num_tokens_no_spec: int array ``[max_reqs]``: tokens of each row, the new ones included.
            token_ids_cpu: int array ``[max_reqs, max_model_len]``.
        """
        drafts: list[list[int]] = [[] for _ in sampled_token_ids]
        if self.runner is None:
            raise RuntimeError("StDProposer needs the StD worker: add --worker-cls sparse2dense.vllm.StDWorker")
        if self.pool is None:
            return drafts
        now = time.perf_counter()
        if self._last_round is not None and not self._mixed:
            end, n, drafted = self._last_round
            self.gate.record_pass(n, drafted, now - end)
        self._last_round = None
        batch = self.runner.input_batch
        live = set(batch.req_ids)
        for req_id in [r for r in self.pool.rows if r not in live]:
            self.pool.close(req_id)
        active: list[tuple[int, DraftRow, int]] = []
        for i, sampled in enumerate(sampled_token_ids):
            row = self.pool.rows.get(batch.req_ids[i])
            if not sampled or row is None:
                continue
            self._count(row, len(sampled))
            last = int(num_tokens_no_spec[i]) - 1  # position of the newest token (no KV yet)
            if last - row.prompt_len > self.settings.max_generated or not self.pool.reserve(
                    row, row.column(last) + self.gamma):
                self.pool.close(batch.req_ids[i])
                continue
            self._commit(row, i, last)
            active.append((i, row, last))
        if not active:
            return drafts
        if self.gate.should_draft(len(active)):
            start = time.perf_counter()
            for (i, row, _), tokens in zip(active, self._draft(active, token_ids_cpu)):
                drafts[i] = tokens
                row.last_drafts = len(tokens)
            self.gate.record_draft(len(active), (time.perf_counter() - start) / self.gamma)
        self._last_round = (time.perf_counter(), len(active), bool(drafts[active[0][0]]))
        return drafts

    def _count(self, row: DraftRow, n_sampled: int) -> None:
        if row.last_drafts:
            self.gate.record_acceptance(n_sampled - 1, row.last_drafts)
            row.stats["accepted"] += n_sampled - 1
            row.stats["drafted"] += row.last_drafts
            self.totals["accepted"] += n_sampled - 1
            self.totals["drafted"] += row.last_drafts
            self.totals["rounds"] += 1
            row.last_drafts = 0

    def _commit(self, row: DraftRow, i: int, last: int) -> None:
        """Copy the verifier's K/V of positions ``[row.committed, last)`` into the draft pool."""
        if last <= row.committed:
            row.committed = last
            return
        positions = torch.arange(row.committed, last)
        slots = self.pool.slots(row, positions - row.prompt_len + row.n_selected)
        table = self._tables[i].long()
        for index, layer in enumerate(self.layers):
            k, v = paged.gather(layer.kv_cache, table, positions)
            paged.write(self.pool.caches[index], k, v, slots, layer.isa, layer.impl.kv_cache_dtype)
        row.committed = last

    def _draft(self, active: list[tuple[int, DraftRow, int]], token_ids_cpu) -> list[list[int]]:
        """``gamma`` greedy draft steps for the ``active`` rows at once: per row, its draft tokens."""
        from vllm.forward_context import set_forward_context

        rows = [row for _, row, _ in active]
        ids = torch.tensor([int(token_ids_cpu[i, last]) for i, _, last in active], dtype=torch.int32)
        positions = torch.tensor([last for _, _, last in active], dtype=torch.long)
        table = self.pool.block_table(rows)
        qsl = torch.arange(len(rows) + 1, dtype=torch.int32)
        out: list[torch.Tensor] = []
        model = self.runner.model
        for step in range(self.gamma):
            columns = torch.tensor([r.column(int(p)) for r, p in zip(rows, positions)], dtype=torch.long)
            slots = torch.cat([self.pool.slots(r, c[None]) for r, c in zip(rows, columns)])
            meta = self._metadata(table, (columns + 1).to(torch.int32), qsl, slots)
            with set_forward_context({n: meta for n in self.layer_names}, self.vllm_config,
                                     num_tokens=len(rows), slot_mapping={}):
                hidden = model(input_ids=ids, positions=positions, intermediate_tensors=None, inputs_embeds=None)
            ids = model.compute_logits(hidden).argmax(dim=-1).to(torch.int32)
            out.append(ids)
            positions = positions + 1
        return torch.stack(out, dim=1).tolist()

    def _metadata(self, table, seq_lens, qsl, slots) -> DraftMetadata:
        from vllm import _custom_ops as ops
        from vllm import envs

        layer = self.layers[0]
        impl = layer.impl
        sched = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=seq_lens.shape[0], num_heads=impl.num_heads, num_kv_heads=impl.num_kv_heads,
            head_dim=impl.head_size, seq_lens=seq_lens, dtype=layer.kv_cache.dtype, query_start_loc=qsl,
            causal=True, sliding_window_size=impl.sliding_window, isa=layer.isa,
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, kv_cache_dtype=impl.kv_cache_dtype)
        return DraftMetadata(table, seq_lens, qsl, slots, sched)
