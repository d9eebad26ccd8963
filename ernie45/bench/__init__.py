"""Benchmarks as vLLM users know them (`ernie45 bench serve|throughput|latency`), as a library the repo's
benchmark scripts build on: datasets (random, ShareGPT), the streaming client and its arrival process, the offline
throughput and latency runs, and the summaries under vLLM's metric names."""

from .datasets import SampleRequest, ServerTokenizer, random_requests, sharegpt_requests
from .machine import cpu_description, cpu_info
from .metrics import RequestResult, compute_metrics, format_summary
from .serve import ServeTarget, run_requests, send_request, served_model

__all__ = [
    "RequestResult", "SampleRequest", "ServeTarget", "ServerTokenizer", "compute_metrics", "cpu_description",
    "cpu_info", "format_summary", "random_requests", "run_requests", "send_request", "served_model",
    "sharegpt_requests",
]
