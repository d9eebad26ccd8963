"""`data_parallel_size=2`: two engine-core processes behind one client; concurrent requests spread over both and
decode the same greedy tokens as one in-process engine. The placement rule itself on fake replicas."""

from __future__ import annotations

import asyncio

import pytest

from ernie45 import LLM
from ernie45.engine import CoreLaunch, EngineConfig, EngineDeadError
from ernie45.parallel.data_parallel import AFFINITY_SLACK, PREFIX_TOKENS, DPEngineClient, start_engine_client

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


class _FakeReplica:
    def __init__(self, load: int = 0, running: bool = True):
        self.load, self.is_running = load, running
        self.model_info = self.inputs = None

    def num_unfinished(self) -> int:
        return self.load


def test_pick_least_loaded_with_prefix_affinity():
    a, b = _FakeReplica(), _FakeReplica()
    client = DPEngineClient([a, b])
    shared = list(range(PREFIX_TOKENS))
    assert client.pick(shared + [1]) == 0  # tie: the lowest index
    a.load = AFFINITY_SLACK  # replica 0 busier, but it served this prefix last
    assert client.pick(shared + [2]) == 0
    assert client.pick([7] * PREFIX_TOKENS) == 1  # a new prefix goes to the least loaded
    assert client.pick(shared[:10]) == 1  # too short to key an affinity
    a.load = AFFINITY_SLACK + 1  # too much busier: the affinity gives way, and moves
    assert client.pick(shared + [3]) == 1
    a.load = 0
    assert client.pick(shared + [4]) == 1
    b.is_running = False  # a dead replica gets nothing
    assert client.pick(shared + [5]) == 0
    a.is_running = False
    with pytest.raises(EngineDeadError):
        client.pick(shared)


def test_serve_with_two_replicas(tiny_dense_checkpoint, tmp_path):
    """`ernie45 serve --data-parallel-size 2`: the OpenAI server answers through both replicas, /metrics sums them."""
    import openai

    from ..server.conftest import ServerProcess

    server = ServerProcess(tiny_dense_checkpoint, tmp_path / "dp.log", "--data-parallel-size", "2")
    try:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none")

        async def several():
            return await asyncio.gather(*(client.completions.create(
                model="tiny-ernie", prompt=p["prompt_token_ids"], max_tokens=4, temperature=0) for p in PROMPTS[:4]))

        answers = asyncio.run(several())
        assert all(a.choices[0].text is not None and a.usage.completion_tokens == 4 for a in answers)
        prompt_tokens = sum(len(p["prompt_token_ids"]) for p in PROMPTS[:4])
        assert server.metrics()["ernie45:prompt_tokens_total"] == prompt_tokens
    finally:
        assert server.stop() == 0
