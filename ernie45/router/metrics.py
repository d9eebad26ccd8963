"""The router's Prometheus metrics: requests in and out, retries, TTFT split into its phases, KV transfer bytes,
role switches, and each instance's state."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_P = "ernie45:router_"
_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0)


class _InstanceCollector(Collector):
    def __init__(self, registry_of_instances):
        self._instances = registry_of_instances

    def collect(self) -> Iterator[Metric]:
        healthy = GaugeMetricFamily(_P + "instance_healthy", "1 while the instance passes its health checks.",
                                    labels=["url", "role"])
        load = GaugeMetricFamily(_P + "instance_in_flight", "This router's requests on the instance now.",
                                 labels=["url", "role"])
        for inst in self._instances.instances:
            healthy.add_metric([inst.url, inst.role], float(inst.healthy))
            load.add_metric([inst.url, inst.role], inst.in_flight)
        yield healthy
        yield load


class RouterMetrics:
    def __init__(self, instances):
        self.registry = CollectorRegistry()
        self.registry.register(_InstanceCollector(instances))
        reg = {"registry": self.registry}
        self.requests_in = Counter(_P + "requests_received", "Requests received.", **reg)
        self.requests_out = Counter(_P + "requests_finished", "Requests answered, by outcome (ok, client_error, "
                                    "error: a 5xx or an error event in the stream).", ["outcome"], **reg)
        self.retries = Counter(_P + "retries", "Requests re-sent to another instance after one failed.", **reg)
        self.pd_fallbacks = Counter(_P + "pd_fallbacks", "PD requests whose decode instance computed the prompt "
                                    "itself (no prefill instance, a failed prefill or a failed KV transfer).", **reg)
        self.ttft = Histogram(_P + "time_to_first_token_seconds", "Streamed requests: arrival to first token.",
                              buckets=_BUCKETS, **reg)
        self.ttft_parts = {part: Histogram(_P + f"ttft_{part}_seconds", doc, buckets=_BUCKETS, **reg) for part, doc in (
            ("queue", "Arrival to the first instance call (choosing instances)."),
            ("prefill", "The prefill instance's call (its queue, the prompt, the first token)."),
            ("transfer", "The decode instance's KV import (fetch and write)."),
            ("first_decode", "Decode request sent to its first token (the tail of the prompt recomputed + 1 step)."),
        )}
        self.kv_bytes = Counter(_P + "kv_transfer_bytes", "KV bytes moved from prefill to decode instances.", **reg)
        self.kv_blocks = Counter(_P + "kv_transfer_blocks", "KV blocks moved.", **reg)
        self.kv_blocks_cached = Counter(_P + "kv_transfer_blocks_cached", "KV blocks a decode instance already "
                                        "held (prefix reuse: not moved).", **reg)
        self.role_switches = Counter(_P + "role_switches", "Instance role switches, by new role.", ["role"], **reg)

    def render(self) -> bytes:
        return generate_latest(self.registry)
