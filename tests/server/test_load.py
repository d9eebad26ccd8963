"""Many concurrent streams, and clients that leave mid-stream: everything completes, aborted requests free their KV
blocks (read from /metrics), and the other clients see no difference."""

import asyncio
import json

import httpx
import openai
import pytest

from .conftest import MODEL_NAME


def test_64_concurrent_streaming_clients(server):
    prompts = [f"The model reads {i}" for i in range(64)]

    async def one(client: openai.AsyncOpenAI, prompt: str) -> tuple[str, str | None, int]:
        stream = await client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": prompt}], max_tokens=16, temperature=0.8,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        text, finish, usage = "", None, 0
        async for chunk in stream:
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
            if chunk.usage:
                usage = chunk.usage.completion_tokens
        return text, finish, usage

    async def run():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                                      timeout=120) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    results = asyncio.run(run())
    assert len(results) == 64
    assert all(finish == "length" and usage == 16 for _, finish, usage in results)
    m = server.wait_idle()
    assert m["ernie45:num_free_kv_blocks"] == m["ernie45:num_kv_blocks"] and m["ernie45:kv_cache_usage_perc"] == 0
    assert m["ernie45:num_requests_running"] == 0 and m["ernie45:num_requests_queued"] == 0


def _sse_events(response: httpx.Response):
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[len("data: "):])


def test_client_disconnect_aborts_and_frees_blocks(server, client):
    reference = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "hello there"}], max_tokens=24, temperature=0,
        extra_body={"ignore_eos": True}).choices[0].message.content
    before = server.metrics()
    leaving_body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "The engineer checks"}],
                    "max_tokens": 450, "stream": True, "ignore_eos": True}
    staying_body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 24,
                    "temperature": 0, "stream": True, "ignore_eos": True}
    client_a = httpx.Client(base_url=server.url, timeout=60)
    client_b = httpx.Client(base_url=server.url, timeout=60)
    with client_a, client_b, client_a.stream("POST", "/v1/chat/completions", json=leaving_body) as gone:
        events = _sse_events(gone)
        for _ in range(3):
            next(events)
        during = server.metrics()
        assert during["ernie45:num_free_kv_blocks"] < during["ernie45:num_kv_blocks"]
        with client_b.stream("POST", "/v1/chat/completions", json=staying_body) as other:
            other_events = _sse_events(other)
            next(other_events)
            # The first client closes its connection while both are generating.
            gone.close()
            text = "".join(e["choices"][0]["delta"].get("content") or "" for e in other_events if e["choices"])
    assert text == reference
    m = server.wait_idle()
    assert m["ernie45:num_free_kv_blocks"] == m["ernie45:num_kv_blocks"]
    # The aborted request never finished: only the other one (and the reference) counted as a success.
    assert m["ernie45:e2e_request_latency_seconds_count"] == before["ernie45:e2e_request_latency_seconds_count"] + 1
    assert m["ernie45:generation_tokens_total"] < before["ernie45:generation_tokens_total"] + 24 + 450


def test_non_streaming_client_that_gives_up_is_aborted(server):
    before = server.wait_idle()
    body = {"model": MODEL_NAME, "prompt": "The engineer checks", "max_tokens": 450, "ignore_eos": True}
    impatient = httpx.Client(base_url=server.url, timeout=httpx.Timeout(60, read=0.2))
    with impatient, pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
        impatient.post("/v1/completions", json=body)
    m = server.wait_idle()
    assert m["ernie45:num_free_kv_blocks"] == m["ernie45:num_kv_blocks"]
    assert m["ernie45:e2e_request_latency_seconds_count"] == before["ernie45:e2e_request_latency_seconds_count"]
    assert m["ernie45:generation_tokens_total"] < before["ernie45:generation_tokens_total"] + 450
