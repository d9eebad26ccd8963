"""`data_parallel_size=2`: two engine-core processes behind one client; concurrent requests spread over both and
decode the same greedy tokens as one in-process engine."""

from __future__ import annotations

import asyncio

from ernie45 import LLM
from ernie45.engine import CoreLaunch, EngineConfig
from ernie45.parallel.data_parallel import DPEngineClient, start_engine_client

from .test_tensor_parallel import ENGINE, GREEDY, PROMPTS


def test_dp2_balances_and_matches_one_engine(tiny_moe_checkpoint):
    expected = LLM(str(tiny_moe_checkpoint), **ENGINE).generate(PROMPTS, GREEDY, use_tqdm=False)
    client = start_engine_client(CoreLaunch(model=str(tiny_moe_checkpoint), threads=1,
                                            engine_config=EngineConfig(data_parallel_size=2, **ENGINE)))
    try:
        assert isinstance(client, DPEngineClient) and len(client.replicas) == 2

        async def all_prompts():
            async def one(prompt):
                return [o async for o in client.generate(prompt, GREEDY)][-1]

            return await asyncio.gather(*(one(p) for p in PROMPTS))

        got = asyncio.run(all_prompts())
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
        # Least-loaded placement (requests in flight per replica) gives each replica a share.
        served = [r.stats()["prompt_tokens_total"] for r in client.replicas]
        assert all(n > 0 for n in served)
        assert sum(served) == sum(len(p["prompt_token_ids"]) for p in PROMPTS)
        assert client.stats()["prompt_tokens_total"] == sum(served)
        assert client.is_running
    finally:
        client.shutdown()
    assert not client.is_running
