"""Automatic role switching with real processes: 1 prefill + 2 decode instances behind a router whose rule is set
to act fast; a flood of long prompts makes the prefill side's pressure exceed the decode side's, one decode
instance becomes a prefill instance, and every request sent meanwhile is answered exactly once, with the tokens
it gets from a single instance."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai

from ..disagg.cluster import MODEL_NAME, RouterProcess, disagg_info, start_instances, wait_pool_full
from ..tiny_checkpoint import make_tiny_checkpoint


async def _ask(client: openai.AsyncOpenAI, prompt: str) -> str:
    r = await client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": prompt}],
                                             max_tokens=6, temperature=0)
    return r.choices[0].message.content


def _wave(url: str, prompts: list[str]) -> list[str]:
    async def run():
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
            return await asyncio.gather(*(_ask(c, p) for p in prompts))

    return asyncio.run(run())


def test_prefill_pressure_turns_a_decode_instance_into_a_prefill_one(tmp_path):
    checkpoint = make_tiny_checkpoint(tmp_path / "tiny")
    prefill, d1, d2 = start_instances(checkpoint, tmp_path, ["prefill", "decode", "decode"])
    router = RouterProcess(tmp_path / "router.log", "--prefill", prefill.url, "--decode", d1.url, d2.url,
                           "--role-switch", "--role-switch-ratio", "1.5", "--role-switch-min-gap", "1",
                           "--role-switch-hold", "2", "--role-switch-cooldown", "600")
    try:
        all_prompts, all_results = [], []
        deadline = time.monotonic() + 40
        switched = None
        k = 0
        while time.monotonic() < deadline and switched is None:  # waves back to back: the pressure holds
            prompts = [f"wave {k} item {i}: " + "describe the long river valley " * 12 for i in range(32)]
            k += 1
            all_prompts += prompts
            all_results += _wave(router.url, prompts)
            roles = {i["url"]: i["role"] for i in httpx.get(router.url + "/router/instances").json()["instances"]}
            switched = next((u for u in (d1.url, d2.url) if roles[u] == "prefill"), None)
        assert switched is not None, router.log()[-3000:]
        sent = answered = len(all_results)
        # Each answered once, with the tokens the whole request gets on one instance.
        stay = d2 if switched == d1.url else d1
        assert all_results == _wave(stay.url, all_prompts)
        m = router.metrics()
        assert m['ernie45:router_role_switches_total{role="prefill"}'] == 1  # the cooldown allows no second one
        assert m["ernie45:router_requests_received_total"] == len(all_prompts) == sent
        assert m['ernie45:router_requests_finished_total{outcome="ok"}'] == answered
        new_prefill = d1 if switched == d1.url else d2
        assert disagg_info(new_prefill)["role"] == "prefill"
        for server in (prefill, d1, d2):
            wait_pool_full(server, timeout=15)
    finally:
        router.stop()
        for server in (prefill, d1, d2):
            server.stop()
    assert "Traceback" not in router.log()
