"""One prefill, one decode and one mixed instance (the reference) behind a router, for the whole module."""

from __future__ import annotations

import openai
import pytest

from ..tiny_checkpoint import make_tiny_checkpoint
from .cluster import RouterProcess, start_instances


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("pd")
    checkpoint = make_tiny_checkpoint(root / "tiny")
    prefill, decode, mixed = start_instances(checkpoint, root, ["prefill", "decode", "mixed"])
    router = RouterProcess(root / "router.log", "--prefill", prefill.url, "--decode", decode.url,
                           "--mixed", mixed.url, "--policy", "least_load")
    yield {"prefill": prefill, "decode": decode, "mixed": mixed, "router": router}
    router.stop()
    for server in (prefill, decode, mixed):
        if server.process.poll() is None:
            server.stop()
            assert "Traceback" not in server.log(), server.log()[-4000:]
    assert "Traceback" not in router.log(), router.log()[-4000:]


def client_of(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
