"""`--data-parallel-size D`: D engine cores (each its own process, model copy and KV cache; each may itself be
tensor-parallel) behind one server. `DPEngineClient` is the server's EngineClient: every request goes to the
replica with the fewest requests in flight from this server (ties: the lowest index) unless the replica that last
took the same prompt prefix is nearly as free (its prefix cache likely holds that prefix), and its outputs stream
back from that replica alone.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
from collections.abc import AsyncIterator

from ..engine.client import EngineDeadError
from ..engine.core_process import CoreLaunch
from ..engine.outputs import RequestOutput
from ..engine.sampling_params import SamplingParams

PREFIX_TOKENS = 64
"""Prompt tokens that key the prefix affinity (four 16-token KV blocks: a shared system prompt or document)."""
AFFINITY_SLACK = 2
"""Extra requests in flight a replica may have and still get a prompt whose prefix it served last."""
AFFINITY_ENTRIES = 4096
"""Prefixes remembered (least recently used forgotten first)."""
_AVERAGED_STATS = ("kv_cache_usage_perc",)
"""Gauges that are fractions: the replicas' mean; every other stat is a count or a size and adds up."""


class DPEngineClient:
    """The `EngineClient` surface the server uses, over `replicas` (MPEngineClients of one model)."""

    def __init__(self, replicas: list):
        if not replicas:
            raise ValueError("DPEngineClient needs at least one replica")
        self.replicas = replicas
        self.model_info = replicas[0].model_info
        self.inputs = replicas[0].inputs
        self._owner: dict[str, int] = {}  # request id -> index of the replica serving it
        self._ids = itertools.count()
        self._affinity: collections.OrderedDict[int, int] = collections.OrderedDict()  # prefix hash -> replica

    @classmethod
    def start(cls, launch: CoreLaunch, startup_timeout: float = 900.0) -> DPEngineClient:
        """Start data_parallel_size cores of `launch` (each with data_parallel_size 1 and its own seed)."""
        from ..engine.mp_client import MPEngineClient

        config = launch.engine_config
        launches = []
        for i in range(config.data_parallel_size):
            seed = None if config.seed is None else config.seed + i
            one = dataclasses.replace(config, data_parallel_size=1, seed=seed)
            launches.append(dataclasses.replace(launch, engine_config=one))
        # Started together: each core loads its model in its own process, so start-up takes one load, not D.
        with concurrent.futures.ThreadPoolExecutor(len(launches)) as pool:
            futures = [pool.submit(MPEngineClient, one, startup_timeout=startup_timeout) for one in launches]
            concurrent.futures.wait(futures)
        failed = [f.exception() for f in futures if f.exception() is not None]
        replicas = [f.result() for f in futures if f.exception() is None]
        if failed:
            for replica in replicas:
                replica.shutdown()
            raise failed[0]
        return cls(replicas)

    # ------------------------------------------------------------------------------------- balancing
    def pick(self, prompt_token_ids: list[int] | None = None) -> int:
        """The live replica with the fewest requests in flight (ties: the lowest index), unless the replica that
        last took a prompt with the same first PREFIX_TOKENS tokens has at most AFFINITY_SLACK more: its prefix
        cache likely holds them. EngineDeadError when no replica is live."""
        live = [i for i, r in enumerate(self.replicas) if r.is_running]
        if not live:
            raise EngineDeadError("every data-parallel engine replica has stopped")
        load = {i: self.replicas[i].num_unfinished() for i in live}
        least = min(live, key=load.__getitem__)
        key = None
        if prompt_token_ids is not None and len(prompt_token_ids) >= PREFIX_TOKENS:
            key = hash(tuple(prompt_token_ids[:PREFIX_TOKENS]))
        chosen = self._affinity.get(key) if key is not None else None
        if chosen not in load or load[chosen] > load[least] + AFFINITY_SLACK:
            chosen = least
        if key is not None:
            self._affinity[key] = chosen
            self._affinity.move_to_end(key)
            if len(self._affinity) > AFFINITY_ENTRIES:
                self._affinity.popitem(last=False)
        return chosen

    async def generate(self, prompt, params: SamplingParams, request_id: str | None = None,
                       extra_keys: tuple = ()) -> AsyncIterator[RequestOutput]:
        prompt = self.inputs.process(prompt)  # once here: the replica takes the EnginePrompt as it is
        index = self.pick(prompt.prompt_token_ids)
        replica = self.replicas[index]
        request_id = request_id or f"req-{next(self._ids)}"
        self._owner[request_id] = index
        try:
            async for output in replica.generate(prompt, params, request_id, extra_keys):
                yield output
        finally:
            self._owner.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        index = self._owner.get(request_id)
        if index is not None:
            self.replicas[index].abort(request_id)

    # ------------------------------------------------------------------------------------- the rest of the surface
    @property
    def is_running(self) -> bool:
        """Healthy only while every replica is (a dead replica is a fault to report, not to hide)."""
        return all(r.is_running for r in self.replicas)

    def validate_prompt(self, prompt):
        return self.inputs.validate_prompt(prompt)

    def prepare_multimodal(self, ids: list[int], data: dict):
        return self.inputs.prepare_multimodal(ids, data)

    def num_unfinished(self) -> int:
        return sum(r.num_unfinished() for r in self.replicas)

    def stats(self) -> dict[str, float | int]:
        per = [r.stats() for r in self.replicas]
        total: dict[str, float | int] = {}
        for key in per[0]:
            values = [s.get(key, 0) for s in per]
            if not all(isinstance(v, (int, float)) for v in values):
                total[key] = values[0]
            else:
                total[key] = sum(values) / len(values) if key in _AVERAGED_STATS else sum(values)
        total["data_parallel_size"] = len(self.replicas)
        return total

    def shutdown(self, timeout: float = 10.0) -> None:
        for replica in self.replicas:
            replica.shutdown(timeout)


def start_engine_client(launch: CoreLaunch, startup_timeout: float = 900.0):
    """The server's engine client: one MPEngineClient, or a DPEngineClient when data_parallel_size > 1."""
    from ..engine.mp_client import MPEngineClient

    if launch.engine_config.data_parallel_size > 1:
        return DPEngineClient.start(launch, startup_timeout)
    return MPEngineClient(launch, startup_timeout=startup_timeout)
