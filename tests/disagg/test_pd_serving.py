"""1 prefill + 1 decode behind the router against one mixed instance, all real processes on loopback, through the
official openai client: the same greedy outputs, prefix reuse on the decode side, exports that time out, role
switches under load, and instances killed with SIGKILL mid-request. The tests run in file order (the last ones
kill instances)."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import openai

from .cluster import EXPORT_TIMEOUT_S, MODEL_NAME, disagg_info, kv_segments_of, wait_pool_full

# Prompts from 1 to ~6 KV blocks (16 tokens each), so some imports carry nothing and some several blocks.
PROMPTS = [f"question {i}: " + "tell me about the weather in the mountains " * (i % 6) for i in range(16)]


def _messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


async def _chat(client: openai.AsyncOpenAI, prompt: str, stream: bool, max_tokens: int = 12,
                **extra) -> tuple[str, str | None]:
    kwargs = dict(model=MODEL_NAME, messages=_messages(prompt), max_tokens=max_tokens, temperature=0, **extra)
    if not stream:
        r = await client.chat.completions.create(**kwargs)
        return r.choices[0].message.content, r.choices[0].finish_reason
    text, finish = "", None
    async for chunk in await client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return text, finish


def _run_all(url: str, prompts: list[str], stream: bool, **kw) -> list[tuple[str, str | None]]:
    async def run():
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
            return await asyncio.gather(*(_chat(c, p, stream, **kw) for p in prompts))

    return asyncio.run(run())


def test_greedy_outputs_equal_a_mixed_instance(cluster):
    router, mixed = cluster["router"], cluster["mixed"]
    expected = _run_all(mixed.url, PROMPTS, stream=False)
    before = router.metrics()
    for stream in (False, True):
        assert _run_all(router.url, PROMPTS, stream=stream) == expected, f"stream={stream}"
    after = router.metrics()
    assert after["ernie45:router_requests_received_total"] - before["ernie45:router_requests_received_total"] == 32
    assert after['ernie45:router_requests_finished_total{outcome="ok"}'] - before.get(
        'ernie45:router_requests_finished_total{outcome="ok"}', 0) == 32
    assert after["ernie45:router_pd_fallbacks_total"] == before["ernie45:router_pd_fallbacks_total"] == 0
    assert after["ernie45:router_kv_transfer_blocks_total"] > 0 and after["ernie45:router_kv_transfer_bytes_total"] > 0
    # Every request went through the decode instance's import, and the mixed reference saw none of them.
    d = disagg_info(cluster["decode"])
    assert d["kv_imports"] == 32 and d["kv_imports_failed"] == 0
    # Both on this host: the blocks came through shared memory (the default --kv-transfer auto), and every
    # segment is unlinked once mapped.
    assert d["kv_import_bytes_shm"] == d["kv_import_bytes"] > 0
    assert kv_segments_of(cluster["prefill"]) == []
    assert after['ernie45:router_ttft_first_decode_seconds_count'] == 16  # streamed requests are timed
    assert after['ernie45:router_ttft_transfer_seconds_count'] == 16
    for server in (cluster["prefill"], cluster["decode"]):
        wait_pool_full(server, timeout=EXPORT_TIMEOUT_S + 10)


def test_completions_through_the_router_equal_a_mixed_instance(cluster):
    router, mixed, decode = cluster["router"], cluster["mixed"], cluster["decode"]
    prompts = ["once upon a time " * 6, [7, 8, 9] * 12]  # text, and token ids (completions ids each prompt `-0`)

    def complete(url: str, prompt, stream: bool) -> str:
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        kwargs = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 10, "temperature": 0}
        if not stream:
            return c.completions.create(**kwargs).choices[0].text
        return "".join(chunk.choices[0].text for chunk in c.completions.create(stream=True, **kwargs)
                       if chunk.choices)

    before = disagg_info(decode)
    for prompt in prompts:
        expected = complete(mixed.url, prompt, False)
        assert complete(router.url, prompt, False) == expected
        assert complete(router.url, prompt, True) == expected
    after = disagg_info(decode)
    assert after["kv_imports"] - before["kv_imports"] == 4 and after["kv_imports_failed"] == before["kv_imports_failed"]
    assert after["kv_import_blocks"] + after["kv_import_blocks_cached"] > before["kv_import_blocks"] + before[
        "kv_import_blocks_cached"]


def test_prefix_reuse_moves_fewer_blocks(cluster):
    decode = cluster["decode"]
    system = "You are a careful assistant who answers about rivers and lakes. " * 4  # several blocks
    moved = []
    for question in ("Which river is longest?", "Which lake is deepest?"):
        before = disagg_info(decode)
        text, _ = _run_all(cluster["router"].url, [system + question], stream=False)[0]
        after = disagg_info(decode)
        moved.append((after["kv_import_blocks"] - before["kv_import_blocks"],
                      after["kv_import_blocks_cached"] - before["kv_import_blocks_cached"]))
        assert text == _run_all(cluster["mixed"].url, [system + question], stream=False)[0][0]
    (first_moved, first_cached), (second_moved, second_cached) = moved
    assert first_moved >= 4 and first_cached == 0
    assert second_cached >= 4 and second_moved < first_moved  # the shared system prompt stayed on the decode side


def test_an_export_nobody_fetches_is_freed_after_the_timeout(cluster):
    prefill = cluster["prefill"]
    before = disagg_info(prefill)
    r = httpx.post(prefill.url + "/v1/chat/completions", timeout=30, json={
        "model": MODEL_NAME, "messages": _messages("orphan " * 60), "max_tokens": 1, "temperature": 0})
    assert r.status_code == 200
    pinned = disagg_info(prefill)
    assert pinned["kv_exports"] == before["kv_exports"] + 1 and pinned["kv_exports_pending"] >= 1
    m = prefill.metrics()
    assert m["ernie45:num_free_kv_blocks"] < m["ernie45:num_kv_blocks"]  # the export's blocks are pinned
    wait_pool_full(prefill, timeout=EXPORT_TIMEOUT_S + 10)
    assert disagg_info(prefill)["kv_exports_expired"] >= before["kv_exports_expired"] + 1


def test_role_switch_under_load_loses_no_request(cluster):
    router, prefill = cluster["router"], cluster["prefill"]
    prompts = [f"load {i}: " + "count the stars tonight " * (i % 5) for i in range(24)]
    expected = _run_all(cluster["mixed"].url, prompts, stream=False, max_tokens=24)
    before = router.metrics()

    async def load_and_switch():
        async with openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0,
                                      timeout=120) as c, httpx.AsyncClient(timeout=60) as http:
            tasks = [asyncio.create_task(_chat(c, p, i % 2 == 0, max_tokens=24)) for i, p in enumerate(prompts)]
            await asyncio.sleep(0.05)
            switches = []
            for role in ("decode", "prefill"):  # the only prefill instance becomes a decode one, then back
                r = await http.post(router.url + "/router/role", json={"url": prefill.url, "role": role})
                switches.append((r.status_code, r.json().get("role")))
            return await asyncio.gather(*tasks), switches

    results, switches = asyncio.run(load_and_switch())
    assert switches == [(200, "decode"), (200, "prefill")]
    assert results == expected  # every request answered once, with the reference's tokens
    after = router.metrics()
    assert after["ernie45:router_requests_received_total"] - before["ernie45:router_requests_received_total"] == 24
    assert after['ernie45:router_requests_finished_total{outcome="ok"}'] - before[
        'ernie45:router_requests_finished_total{outcome="ok"}'] == 24
    assert after['ernie45:router_role_switches_total{role="decode"}'] == 1
    assert after['ernie45:router_role_switches_total{role="prefill"}'] == 1
    assert disagg_info(prefill)["role"] == "prefill"
    for server in (cluster["prefill"], cluster["decode"], cluster["mixed"]):
        wait_pool_full(server, timeout=EXPORT_TIMEOUT_S + 10)


def test_prefill_killed_mid_request_falls_back(cluster):
    router, prefill = cluster["router"], cluster["prefill"]
    prompts = [f"survive {i}: " + "a long prompt about nothing at all " * 8 for i in range(8)]
    expected = _run_all(cluster["mixed"].url, prompts, stream=False)

    async def run():
        async with openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0,
                                      timeout=120) as c:
            tasks = [asyncio.create_task(_chat(c, p, i % 2 == 1)) for i, p in enumerate(prompts)]
            await asyncio.sleep(0.02)
            os.kill(prefill.process.pid, signal.SIGKILL)
            return await asyncio.gather(*tasks)

    before = router.metrics()
    assert asyncio.run(run()) == expected  # retried elsewhere or computed by the decode instance
    after = router.metrics()
    # The kill hit requests in their prefill phase: the decode instance computed those prompts itself.
    assert after["ernie45:router_pd_fallbacks_total"] > before["ernie45:router_pd_fallbacks_total"]
    prefill.process.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(i["url"] == prefill.url and i["healthy"] for i in httpx.get(
            router.url + "/router/instances").json()["instances"]):
        time.sleep(0.1)
    assert _run_all(router.url, prompts[:2], stream=True) == expected[:2]  # served without a prefill instance
    for server in (cluster["decode"], cluster["mixed"]):
        wait_pool_full(server)


def test_decode_killed_mid_stream_fails_cleanly_then_retries_elsewhere(cluster):
    router, decode = cluster["router"], cluster["decode"]
    killed = asyncio.Event()

    async def long_stream(c: openai.AsyncOpenAI, i: int):
        try:
            stream = await c.chat.completions.create(
                model=MODEL_NAME, messages=_messages(f"stream {i}"), max_tokens=400, temperature=0, stream=True,
                extra_body={"ignore_eos": True})
            n = 0
            async for chunk in stream:
                n += sum(1 for ch in chunk.choices if ch.delta.content)
                if n >= 2 and not killed.is_set():
                    killed.set()
                    os.kill(decode.process.pid, signal.SIGKILL)
            return "complete", n
        except openai.APIError as exc:
            return "error", str(exc)

    # Non-streamed requests in flight when the decode instance dies: nothing reached their clients yet, so the
    # router sends the same request to another instance.
    plain = [f"plain {i}" for i in range(4)]
    plain_expected = _run_all(cluster["mixed"].url, plain, stream=False, max_tokens=400, extra_body={"ignore_eos": True})

    async def run():
        async with openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0,
                                      timeout=120) as c:
            streams = [long_stream(c, i) for i in range(12)]
            plains = [_chat(c, p, False, max_tokens=400, extra_body={"ignore_eos": True}) for p in plain]
            return await asyncio.gather(*streams), await asyncio.gather(*plains)

    before = router.metrics()
    results, plain_results = asyncio.run(run())
    assert killed.is_set()
    assert plain_results == plain_expected
    outcomes = [r[0] for r in results]
    # Streams cut by the kill end with an OpenAI-shaped error event; none hangs, none is malformed.
    assert "error" in outcomes, results
    assert all(r[1] for r in results)
    decode.process.wait(10)
    # Later requests go to the instances left (the mixed one), as the same greedy tokens.
    expected = _run_all(cluster["mixed"].url, PROMPTS[:4], stream=False)
    assert _run_all(router.url, PROMPTS[:4], stream=False) == expected
    m = router.metrics()
    assert m['ernie45:router_requests_finished_total{outcome="error"}'] - before.get(
        'ernie45:router_requests_finished_total{outcome="error"}', 0) == outcomes.count("error")
    assert m["ernie45:router_retries_total"] > before["ernie45:router_retries_total"]
    wait_pool_full(cluster["mixed"])
