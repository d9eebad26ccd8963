"""Prometheus metrics of one server, in vLLM's names with the `ernie45:` prefix, on a registry of its own.

Engine gauges and counters (requests running/waiting, KV usage and free blocks, prefix-cache queries/hits, token
counters, preemptions) are read from `LLMEngine.stats()` at scrape time by a custom collector, so nothing needs a
sampling loop; per-request latencies (TTFT, time per output token, end-to-end, queue) are observed by the handlers
when a request finishes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..engine.outputs import RequestOutput

_PREFIX = "ernie45:"
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)

# stats() key -> (metric name, help); gauges and counters the engine keeps itself.
_ENGINE_GAUGES = {
    "num_requests_running": ("num_requests_running", "Sequences in the running batch."),
    "num_requests_waiting": ("num_requests_waiting", "Sequences waiting to be scheduled."),
    "kv_cache_usage_perc": ("kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = full)."),
    "num_kv_blocks": ("num_kv_blocks", "KV cache blocks allocated."),
    "num_free_kv_blocks": ("num_free_kv_blocks", "KV cache blocks free (cached prefixes that no request holds included)."),
}
_ENGINE_COUNTERS = {
    "prefix_cache_queries": ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
    "prefix_cache_hits": ("prefix_cache_hits", "Prompt tokens found in the prefix cache."),
    "prompt_tokens_total": ("prompt_tokens", "Prompt tokens admitted."),
    "generation_tokens_total": ("generation_tokens", "Tokens generated."),
    "num_preemptions": ("num_preemptions", "Sequences preempted (KV blocks ran out)."),
    # vLLM's names; 0 while speculative decoding is off.
    "spec_decode_num_drafts": ("spec_decode_num_drafts", "Verification steps of a sequence that had drafts."),
    "spec_decode_num_draft_tokens": ("spec_decode_num_draft_tokens", "Draft tokens verified."),
    "spec_decode_num_accepted_tokens": ("spec_decode_num_accepted_tokens", "Draft tokens accepted."),
    "grammar_compiles": ("structured_output_grammar_compiles", "Structured-output grammars compiled."),
    "grammar_cache_hits": ("structured_output_grammar_cache_hits",
                           "Structured-output constraints served from the compiled-grammar cache."),
}


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], dict], model_name: str, num_queued: Callable[[], int]):
        self._stats = stats
        self._model_name = model_name
        self._num_queued = num_queued

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        labels = [self._model_name]
        for key, (name, doc) in _ENGINE_GAUGES.items():
            family = GaugeMetricFamily(_PREFIX + name, doc, labels=["model_name"])
            family.add_metric(labels, stats[key])
            yield family
        for key, (name, doc) in _ENGINE_COUNTERS.items():
            family = CounterMetricFamily(_PREFIX + name, doc, labels=["model_name"])
            family.add_metric(labels, stats.get(key, 0))  # grammar counters appear with the first constraint
            yield family
        queries, hits = stats["prefix_cache_queries"], stats["prefix_cache_hits"]
        rate = GaugeMetricFamily(_PREFIX + "prefix_cache_hit_rate", "prefix_cache_hits / prefix_cache_queries.",
                                 labels=["model_name"])
        rate.add_metric(labels, hits / queries if queries else 0.0)
        yield rate
        drafts, draft_tokens = stats.get("spec_decode_num_drafts", 0), stats.get("spec_decode_num_draft_tokens", 0)
        accepted = stats.get("spec_decode_num_accepted_tokens", 0)
        acceptance = GaugeMetricFamily(_PREFIX + "spec_decode_acceptance_rate",
                                       "spec_decode_num_accepted_tokens / spec_decode_num_draft_tokens.",
                                       labels=["model_name"])
        acceptance.add_metric(labels, accepted / draft_tokens if draft_tokens else 0.0)
        yield acceptance
        length = GaugeMetricFamily(_PREFIX + "spec_decode_mean_accepted_length",
                                   "Tokens per verification step: 1 + accepted / drafts (0 before any draft).",
                                   labels=["model_name"])
        length.add_metric(labels, 1 + accepted / drafts if drafts else 0.0)
        yield length
        queued = GaugeMetricFamily(_PREFIX + "num_requests_queued",
                                   "Sequences waiting in the engine or not yet admitted to it (what --max-queue bounds).",
                                   labels=["model_name"])
        queued.add_metric(labels, self._num_queued())
        yield queued


class ServerMetrics:
    """The collectors of one app; `render()` is the /metrics body."""

    def __init__(self, stats: Callable[[], dict], model_name: str, num_queued: Callable[[], int]):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats, model_name, num_queued))
        label = {"labelnames": ["model_name"], "registry": self.registry}
        self.ttft = Histogram(_PREFIX + "time_to_first_token_seconds", "Time to first token.",
                              buckets=_LATENCY_BUCKETS, **label).labels(model_name)
        self.tpot = Histogram(_PREFIX + "time_per_output_token_seconds", "Mean time per output token after the first.",
                              buckets=_TPOT_BUCKETS, **label).labels(model_name)
        self.e2e = Histogram(_PREFIX + "e2e_request_latency_seconds", "Arrival to last token.",
                             buckets=_LATENCY_BUCKETS, **label).labels(model_name)
        self._success = Counter(_PREFIX + "request_success", "Requests finished, by finish reason.",
                                labelnames=["model_name", "finished_reason"], registry=self.registry)
        self._model_name = model_name

    def observe_finished(self, output: RequestOutput) -> None:
        m = output.metrics
        if m.first_token_time is not None:
            self.ttft.observe(max(0.0, m.first_token_time - m.arrival_time))
        if m.finish_time is not None:
            self.e2e.observe(max(0.0, m.finish_time - m.arrival_time))
            longest = max((len(c.token_ids) for c in output.outputs), default=0)
            if m.first_token_time is not None and longest > 1:
                self.tpot.observe(max(0.0, m.finish_time - m.first_token_time) / (longest - 1))
        for completion in output.outputs:
            self._success.labels(self._model_name, completion.finish_reason or "abort").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
