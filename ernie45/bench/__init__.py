"""Benchmarks as vLLM users know them (`ernie45 bench serve|throughput|latency`), as a library the repo's
benchmark scripts build on: datasets (random, ShareGPT), the streaming client and its arrival process, the offline
throughput and latency runs, and the summaries under vLLM's metric names."""

import importlib

# name -> submodule; loaded on first use, so `ernie45` commands that never benchmark do not import httpx (the
# serving client's dependency, from the `serve` extra)
_EXPORTS = {
    "SampleRequest": "datasets", "ServerTokenizer": "datasets", "random_requests": "datasets",
    "sharegpt_requests": "datasets", "cpu_description": "machine", "cpu_info": "machine",
    "RequestResult": "metrics", "compute_metrics": "metrics", "format_summary": "metrics",
    "ServeTarget": "serve", "run_requests": "serve", "send_request": "serve", "served_model": "serve",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [  # resolved by __getattr__
    "RequestResult", "SampleRequest", "ServeTarget", "ServerTokenizer", "compute_metrics", "cpu_description",
    "cpu_info", "format_summary", "random_requests", "run_requests", "send_request", "served_model",
    "sharegpt_requests",
]
