"""``GET /metrics``: Prometheus text format (prometheus-client), one registry per server.

Names start with ``sparse2dense_``: requests by finish reason, prompt and generated tokens, draft
tokens proposed and accepted, batch occupancy, queue length, whether the last round speculated,
the running acceptance rate, and latency and time-to-first-token histograms.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("sparse2dense_requests", "Finished requests by finish reason", ["finish_reason"],
                                registry=r)
        self.rejected = Counter("sparse2dense_rejected_requests", "Requests refused with a 4xx status", ["status"],
                                registry=r)
        self.prompt_tokens = Counter("sparse2dense_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generated = Counter("sparse2dense_generation_tokens", "Tokens generated", registry=r)
        self.drafted = Counter("sparse2dense_draft_tokens", "Draft tokens proposed", registry=r)
        self.accepted = Counter("sparse2dense_accepted_draft_tokens", "Draft tokens accepted", registry=r)
        self.occupancy = Gauge("sparse2dense_batch_occupancy", "Rows decoding in the batch", registry=r)
        self.max_batch = Gauge("sparse2dense_batch_capacity", "Rows the batch can hold", registry=r)
        self.queue = Gauge("sparse2dense_queue_length", "Requests waiting for a slot", registry=r)
        self.speculating = Gauge("sparse2dense_speculation_on", "1 if the last round drafted, else 0", registry=r)
        self.acceptance = Gauge("sparse2dense_acceptance_rate", "Accepted / drafted tokens since start", registry=r)
        self.latency = Histogram("sparse2dense_request_latency_seconds", "Submit to last token", buckets=_BUCKETS,
                                 registry=r)
        self.ttft = Histogram("sparse2dense_time_to_first_token_seconds", "Submit to first token", buckets=_BUCKETS,
                              registry=r)
        self._seen_rounds = 0

    def observe_engine(self, engine) -> None:
        """After a step (engine thread): batch, queue, speculation and acceptance."""
        s, st = engine.slots, engine.stats
        self.occupancy.set(int(s.active[: s.n].sum()))
        self.max_batch.set(engine.max_batch)
        self.queue.set(len(engine.waiting))
        if st.rounds > self._seen_rounds and st.round_log:
            self._seen_rounds = st.rounds
            self.speculating.set(1 if st.round_log[-1][1] > 0 else 0)
        self.acceptance.set(st.accepted / st.drafted if st.drafted else 0.0)

    def observe_request(self, handle) -> None:
        st = handle.stats
        self.requests.labels(handle.finish_reason or "unknown").inc()
        self.prompt_tokens.inc(st.prompt_tokens)
        self.generated.inc(len(handle.tokens))
        self.drafted.inc(st.drafted)
        self.accepted.inc(st.accepted)
        if st.time_total is not None:
            self.latency.observe(st.time_total)
        if st.time_first_token is not None:
            self.ttft.observe(st.time_first_token)

    def render(self) -> bytes:
        return generate_latest(self.registry)
