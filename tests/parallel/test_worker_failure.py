"""A tensor-parallel worker that dies fails the engine's requests within seconds, never a hang: before a step (the
liveness check) and during one (the collective with the dead peer raises)."""

from __future__ import annotations

import time

import pytest

from ernie45 import LLM, SamplingParams
from ernie45.parallel import ParallelWorkerError, shutdown

from .test_tensor_parallel import ENGINE, GREEDY, PROMPTS


def _kill_worker(llm: LLM) -> None:
    worker = llm.model.parallel_driver.workers[0]
    worker.process.kill()
    worker.process.wait(10)


def test_dead_worker_fails_next_request(tiny_dense_checkpoint, one_thread):
    llm = LLM(str(tiny_dense_checkpoint), tensor_parallel_size=2, **ENGINE)
    try:
        assert llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
        _kill_worker(llm)
        start = time.monotonic()
        with pytest.raises(ParallelWorkerError, match="rank 1 exited"):
            llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False)
        assert time.monotonic() - start < 10
        with pytest.raises(ParallelWorkerError, match="restart the engine"):  # and stays failed, fast
            llm.engine.step()
    finally:
        shutdown(llm.model)


def test_worker_dying_inside_a_step_fails_cleanly(tiny_dense_checkpoint, one_thread):
    llm = LLM(str(tiny_dense_checkpoint), tensor_parallel_size=2, **ENGINE)
    steps = []

    def kill_on_third_step(module, args):  # rank 0, after the step was announced: layer 1's all-reduce meets a dead peer
        steps.append(1)
        if len(steps) == 3:
            _kill_worker(llm)

    try:
        llm.model.model.layers[1].register_forward_pre_hook(kill_on_third_step)
        start = time.monotonic()
        with pytest.raises(ParallelWorkerError, match="rank 1 exited"):
            llm.generate(PROMPTS, SamplingParams(max_tokens=20, temperature=0), use_tqdm=False)
        assert time.monotonic() - start < 20
        assert len(steps) == 3
    finally:
        shutdown(llm.model)


def test_served_engine_fails_requests_and_reports_unhealthy(tiny_dense_checkpoint):
    """`ernie45 serve`'s path: the engine core process is rank 0; when its worker dies the request ends with an
    error and the core exits, so the client's `is_running` (the server's /health) turns False."""
    import asyncio
    import os
    import signal

    from ernie45.engine import CoreLaunch, EngineConfig, MPEngineClient

    config = EngineConfig(tensor_parallel_size=2, **ENGINE)
    client = MPEngineClient(CoreLaunch(model=str(tiny_dense_checkpoint), threads=1, engine_config=config))
    try:
        core_pid = client.process.pid
        with open(f"/proc/{core_pid}/task/{core_pid}/children") as f:
            workers = [int(pid) for pid in f.read().split()]
        assert len(workers) == 1

        async def one():
            return [o async for o in client.generate(PROMPTS[0], GREEDY)]

        assert asyncio.run(one())[-1].finished
        os.kill(workers[0], signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(RuntimeError):
            asyncio.run(one())
        while client.is_running and time.monotonic() - start < 10:
            time.sleep(0.05)
        assert not client.is_running
        assert time.monotonic() - start < 10
    finally:
        client.shutdown()
