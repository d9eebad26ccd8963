"""Ranks 1..N-1 of a tensor-parallel engine: load this rank's shard, then run every model call rank 0 announces.

Rank 0's engine (scheduler, sampler, block manager) announces each model call with `broadcast_command`:

    ("forward_inputs", ModelInputs, StepMetadata)   one step's flattened tokens and paged-attention metadata
    ("compute_logits", hidden)                      the rows rank 0 projects to logits (the LM head gathers them)
    ("embed_input_ids", ids)                        a VL step's token embeddings (the vocab-parallel all-reduce)
    ("report",)                                     each rank's weight and KV bytes and collective counters
    ("reset_stats",)                                zero those counters
    ("probe", calls, numel, dtype)                  `calls` all-reduces of `numel` elements alone (benchmarks)
    ("stop",)

The worker replays the call on its own shard and its own KV cache (same block ids and slots as rank 0's: the block
manager on rank 0 decides for all ranks), taking part in the same collectives in the same order.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass

import torch

from .comm import Communicator, connect, disconnect

logger = logging.getLogger("ernie45.parallel.worker")


@dataclass(frozen=True)
class StepMetadata:
    """The picklable part of `PagedAttentionMetadata` (the cache stays on each rank) plus the cache's geometry,
    from which a worker allocates its own cache on the first step."""

    slot_mapping_N: torch.Tensor
    block_tables_SM: torch.Tensor
    context_lens: list[int]
    query_lens: list[int]
    num_blocks: int
    block_size: int

    @classmethod
    def of(cls, metadata) -> StepMetadata:
        cache = metadata.cache
        return cls(metadata.slot_mapping_N, metadata.block_tables_SM, metadata.context_lens, metadata.query_lens,
                   cache.num_blocks, cache.block_size)


@dataclass(frozen=True)
class WorkerLaunch:
    """What a worker process needs (picklable: it crosses the spawn boundary)."""

    model: str
    dtype: str
    device: str
    world_size: int
    master_addr: str
    master_port: int
    expert_parallel: bool = False
    expert_placement: str = "linear"
    threads: int = 1
    log_level: str = "WARNING"


def run_worker(rank: int, launch: WorkerLaunch) -> None:
    """The worker process's entry point (torch.multiprocessing, spawn)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group; rank 0 decides when workers stop
    logging.basicConfig(level=launch.log_level.upper(), format=f"%(asctime)s rank{rank} %(levelname)s: %(message)s")
    torch.set_num_threads(launch.threads)
    store = torch.distributed.TCPStore(launch.master_addr, launch.master_port, launch.world_size, is_master=False)
    comm = connect(rank, launch.world_size, store, _backend(launch.device))
    try:
        from .loader import load_shard

        model = load_shard(launch.model, comm, launch.dtype, launch.device, launch.expert_parallel,
                           launch.expert_placement)
        comm.barrier()  # rank 0 waits here until every rank has loaded
        WorkerLoop(model, comm).run()
    except Exception:  # the other ranks see this rank's connections close; log why for the user
        logger.exception("tensor-parallel worker %d failed", rank)
        raise
    finally:
        disconnect()


class WorkerLoop:
    def __init__(self, model, comm: Communicator):
        self.model = model
        self.comm = comm
        self.cache = None

    def _cache_for(self, meta: StepMetadata):
        from ..engine.paged_attention import KVCache

        cache = self.cache
        if cache is None or (cache.num_blocks, cache.block_size) != (meta.num_blocks, meta.block_size):
            config = self.model.config
            self.cache = cache = KVCache(config.num_hidden_layers, meta.num_blocks, meta.block_size,
                                         self.model.kv_heads_per_rank, config.head_dim, self.model.dtype,
                                         self.model.device)
        return cache

    @torch.inference_mode()
    def run(self) -> None:
        from ..engine.paged_attention import PagedAttentionMetadata

        device = self.model.device
        while True:
            command = self.comm.broadcast_command()
            kind = command[0]
            if kind == "stop":
                return
            if kind == "forward_inputs":
                _, inputs, meta = command
                metadata = PagedAttentionMetadata(self._cache_for(meta), meta.slot_mapping_N.to(device),
                                                  meta.block_tables_SM.to(device), meta.context_lens, meta.query_lens)
                self.model.forward_inputs(inputs, metadata)
            elif kind == "compute_logits":
                self.model.compute_logits(command[1].to(device))
            elif kind == "embed_input_ids":
                self.model.embed_input_ids(command[1].to(device))
            elif kind == "probe":
                all_reduce_probe(self.comm, *command[1:])
            elif kind == "reset_stats":
                self.comm.stats.reset()
            elif kind == "report":
                self.comm.gather_objects(rank_report(self.model, self.cache, self.comm))
            else:
                raise RuntimeError(f"unknown command {kind!r} from rank 0 (pid {os.getppid()})")


def all_reduce_probe(comm: Communicator, calls: int, numel: int, dtype: torch.dtype) -> float:
    """Seconds per all-reduce of `numel` elements with nothing else running (every rank calls it)."""
    t = torch.zeros(numel, dtype=dtype)
    comm.all_reduce(t)  # warm-up
    start = time.perf_counter()
    for _ in range(calls):
        comm.all_reduce(t)
    return (time.perf_counter() - start) / calls


def rank_report(model, cache, comm: Communicator) -> dict:
    """What one rank holds and has communicated: parameter bytes (a tied head counted once), KV cache bytes, and
    the model collectives' counters (`comm.CommStats`)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kv = 0 if cache is None else cache.k.numel() * cache.k.element_size() * 2
    stats = comm.stats
    return {"rank": comm.rank, "weight_bytes": weights, "kv_cache_bytes": kv, "collectives": stats.calls,
            "all_reduce_bytes": stats.all_reduce_bytes, "gather_bytes": stats.gather_bytes,
            "collective_seconds": stats.seconds, "command_seconds": stats.command_seconds}


def _backend(device: str) -> str:
    return "nccl" if str(device).startswith("cuda") else "gloo"


def main(argv: list[str] | None = None) -> None:
    """`python -m ernie45.parallel RANK LAUNCH_JSON` (started by `driver.TensorParallelDriver`)."""
    import json
    import sys

    rank, launch = (argv or sys.argv[1:])[:2]
    run_worker(int(rank), WorkerLaunch(**json.loads(launch)))
