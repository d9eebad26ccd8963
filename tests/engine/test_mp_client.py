"""The engine core in its own process (`MPEngineClient` + `core_process`), on a tiny checkpoint: same greedy tokens as
the in-process engine, aborts free the core's KV blocks, bad input fails on the client side, and a core that dies
ends the requests in flight with EngineDeadError within seconds instead of hanging them."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from ernie45.engine import LLM, CoreLaunch, EngineConfig, EngineDeadError, MPEngineClient, SamplingParams

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13], [3] * 20, [42, 17]]


@pytest.fixture(scope="module")
def core(tiny_moe_checkpoint):
    client = MPEngineClient(CoreLaunch(model=str(tiny_moe_checkpoint), threads=1,
                                       engine_config=EngineConfig(max_num_seqs=8, seed=0)))
    yield client
    client.shutdown()


async def _collect(client, prompt, params, request_id=None):
    return [o async for o in client.generate({"prompt_token_ids": prompt}, params, request_id=request_id)]


def _wait_idle(client, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = client.stats()
        if stats["num_requests_running"] == 0 and stats["num_free_kv_blocks"] == stats["num_kv_blocks"]:
            return stats
        time.sleep(0.02)
    return client.stats()


def test_greedy_tokens_match_the_in_process_engine(core, tiny_moe_checkpoint):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in
                LLM(str(tiny_moe_checkpoint), max_num_seqs=8, seed=0).generate(
                    [{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)]

    async def scenario():
        return await asyncio.gather(*(_collect(core, p, params) for p in PROMPTS))

    streams = asyncio.run(scenario())
    for chunks, tokens in zip(streams, expected):
        assert chunks[-1].finished and chunks[-1].outputs[0].token_ids == tokens
        assert "".join(c.new_text[0] for c in chunks) == chunks[-1].outputs[0].text
        # Arrival is stamped on the client side, so TTFT includes the trip to the core.
        assert chunks[-1].metrics.arrival_time <= chunks[-1].metrics.first_token_time
    assert core.model_info.max_model_len > 0 and core.model_info.vocab_size > max(max(p) for p in PROMPTS)
    stats = _wait_idle(core)
    assert stats["generation_tokens_total"] >= 12 * len(PROMPTS)


def test_abort_frees_the_cores_blocks_and_bad_input_fails_on_the_client(core):
    async def scenario():
        stream = core.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=10_000, ignore_eos=True))
        async for _ in stream:
            break
        await stream.aclose()  # the client leaves: the core aborts the request
        with pytest.raises(ValueError, match="the prompt is empty"):
            await _collect(core, [], SamplingParams())
        with pytest.raises(ValueError, match="outside the vocabulary"):
            await _collect(core, [core.model_info.vocab_size], SamplingParams())
        # A duplicate id in flight is refused, the first request unharmed.
        first = core.generate({"prompt_token_ids": [1, 2]}, SamplingParams(max_tokens=10_000, ignore_eos=True),
                              request_id="dup")
        before = len((await anext(first)).outputs[0].token_ids)
        with pytest.raises(ValueError, match="already in use"):
            await _collect(core, [1, 2], SamplingParams(max_tokens=2), "dup")
        assert len((await anext(first)).outputs[0].token_ids) > before
        await first.aclose()

    asyncio.run(scenario())
    stats = _wait_idle(core)
    assert stats["num_requests_running"] == 0 and stats["num_free_kv_blocks"] == stats["num_kv_blocks"]


def test_a_core_that_dies_fails_its_requests_quickly(tiny_moe_checkpoint):
    client = MPEngineClient(CoreLaunch(model=str(tiny_moe_checkpoint), threads=1))
    try:
        async def scenario():
            stream = client.generate({"prompt_token_ids": [5, 6, 7]},
                                     SamplingParams(max_tokens=100_000, ignore_eos=True))
            async for _ in stream:
                break
            os.kill(client.process.pid, signal.SIGKILL)
            started = time.monotonic()
            with pytest.raises(EngineDeadError, match="died"):
                async for _ in stream:
                    pass
            return time.monotonic() - started

        elapsed = asyncio.run(scenario())
        assert elapsed < 5.0
        assert not client.is_running

        async def after():
            with pytest.raises(EngineDeadError):
                await _collect(client, [1], SamplingParams())

        asyncio.run(after())
    finally:
        client.shutdown()


def test_a_checkpoint_that_cannot_load_is_reported_as_its_own_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing")):
        MPEngineClient(CoreLaunch(model=str(tmp_path / "missing")))


def test_llm_takes_engine_config_fields_and_refuses_unknown_ones(tiny_moe_checkpoint):
    with pytest.raises(TypeError, match="max_num_seq.*engine arguments are"):
        LLM(str(tiny_moe_checkpoint), max_num_seq=4)
    llm = LLM(str(tiny_moe_checkpoint), max_num_seqs=3, block_size=8, enable_prefix_caching=False)
    assert llm.engine.config == EngineConfig(max_num_seqs=3, block_size=8, enable_prefix_caching=False)
