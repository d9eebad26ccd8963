"""Rank 0 of a tensor-parallel engine: start the workers, load rank 0's shard, and mirror each model call the engine
makes (`forward_inputs`, `compute_logits`) to the workers before running it here.

The engine itself is unchanged: it holds rank 0's model, whose two entry points are wrapped on the instance (the
model class is untouched), and a KV cache of rank 0's heads. A worker that exits or stops answering fails the
step it is in (a collective raises or times out) and every later one: the group cannot be mended in place, so
the error says to restart the engine, and `ParallelWorkerError.engine_unusable` tells a serving loop to stop.
"""

from __future__ import annotations

import functools
import json
import logging
import subprocess
import sys
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path

import torch.distributed as dist

from .comm import Communicator, connect, disconnect
from .config import RankLayout
from .worker import StepMetadata, WorkerLaunch, all_reduce_probe, rank_report

logger = logging.getLogger("ernie45.parallel")

STARTUP_TIMEOUT_S = 300.0
"""Longest rank 0 waits for the workers to meet it (spawn, import, rendezvous)."""


class ParallelWorkerError(RuntimeError):
    """A tensor-parallel worker exited or stopped answering; the engine must be restarted."""

    engine_unusable = True


class TensorParallelDriver:
    def __init__(self, launch: WorkerLaunch, nnodes: int = 1, node_rank: int = 0):
        self.launch = launch
        self.layout = RankLayout(launch.world_size, nnodes, node_rank)
        self.workers: list[Worker] = []
        self.comm: Communicator | None = None
        self.broken: str | None = None
        self._in_call = False
        """True while rank 0 runs a call it announced (nested model calls are not announced again)."""

    # ------------------------------------------------------------------------------------------ start / stop
    def start(self):
        """Rank 0: serve the rendezvous, spawn this node's other ranks, load the shard; returns rank 0's model."""
        from .loader import load_shard

        launch = self.launch
        store = dist.TCPStore(launch.master_addr, launch.master_port or 0, launch.world_size, is_master=True,
                              timeout=_seconds(STARTUP_TIMEOUT_S), wait_for_workers=False)
        if not launch.master_port:
            self.launch = launch = _with_port(launch, store.port)
        self._spawn(r for r in self.layout.local_ranks() if r != 0)
        try:
            self.comm = connect(0, launch.world_size, store, _backend(launch.device))
            model = load_shard(launch.model, self.comm, launch.dtype, launch.device, launch.expert_parallel,
                               launch.expert_placement)
            self.comm.barrier()
        except BaseException:
            self.shutdown()
            raise
        self.attach(model)
        self.model_ref = weakref.ref(model)
        weakref.finalize(model, self.shutdown)
        model.parallel_driver = self
        return model

    def _spawn(self, ranks) -> None:
        # Child processes of our own interpreter rather than multiprocessing ones: the engine core that starts them
        # is itself a daemonic multiprocessing child, which multiprocessing forbids to have children.
        for rank in ranks:
            command = [sys.executable, "-m", "ernie45.parallel", str(rank), json.dumps(asdict(self.launch))]
            self.workers.append(Worker(rank, subprocess.Popen(command)))

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the workers (a "stop" command when the group is healthy, then terminate) and leave the group;
        idempotent (an explicit call, then the model's finalizer)."""
        if self.comm is None and not self.workers:
            return  # never started or already shut down: the process group now in use may be another engine's
        if self.comm is not None and self.broken is None and all(w.alive for w in self.workers):
            try:
                self.comm.broadcast_command(("stop",))
            except RuntimeError:
                pass  # a worker went away meanwhile: terminated below
        for worker in self.workers:
            worker.stop(timeout)
        self.workers = []
        self.comm = None
        self.broken = self.broken or "the tensor-parallel engine was shut down"
        disconnect()

    # ------------------------------------------------------------------------------------------ mirroring
    def attach(self, model) -> None:
        """Wrap the instance's entry points so that each call is announced to the workers first."""
        forward_inputs, compute_logits = model.forward_inputs, model.compute_logits

        @functools.wraps(forward_inputs)
        def mirrored_forward(inputs, attn_metadata=None, router_logits=None):
            if attn_metadata is None or router_logits is not None:
                raise ValueError("a tensor-parallel model runs engine steps only (paged attention metadata, "
                                 "no router logits)")
            return self._call(("forward_inputs", inputs, StepMetadata.of(attn_metadata)),
                              lambda: forward_inputs(inputs, attn_metadata))

        @functools.wraps(compute_logits)
        def mirrored_logits(hidden):
            return self._call(("compute_logits", hidden), lambda: compute_logits(hidden))

        embed_input_ids = model.embed_input_ids

        @functools.wraps(embed_input_ids)
        def mirrored_embed(input_ids):
            # VL steps embed the step's tokens before the forward (vision rows are placed over them): the
            # vocab-parallel embedding's all-reduce needs every rank. Inside a mirrored call the workers are already
            # running the same code, so it is called directly there.
            if self._in_call:
                return embed_input_ids(input_ids)
            return self._call(("embed_input_ids", input_ids), lambda: embed_input_ids(input_ids))

        model.forward_inputs = mirrored_forward
        model.compute_logits = mirrored_logits
        model.embed_input_ids = mirrored_embed

    def _call(self, command: tuple, run):
        self.check_alive()
        self._in_call = True
        try:
            self.comm.broadcast_command(command)
            return run()
        except RuntimeError as exc:  # gloo: a peer closed its connection, or a collective timed out
            dead = self._dead_workers()
            self.broken = f"{dead or 'a tensor-parallel worker stopped answering'} ({exc})"
            raise ParallelWorkerError(f"tensor-parallel step failed: {self.broken}; restart the engine") from exc
        finally:
            self._in_call = False

    def report(self, cache=None) -> list[dict]:
        """Every rank's `worker.rank_report` (rank 0's with the engine's `cache`), in rank order."""
        self.check_alive()
        self.comm.broadcast_command(("report",))
        return self.comm.gather_objects(rank_report(self.model_ref(), cache, self.comm))

    def probe_all_reduce(self, calls: int, numel: int, dtype) -> float:
        """Rank 0's seconds per isolated all-reduce of `numel` elements (`worker.all_reduce_probe`); the
        collective counters are reset afterwards."""
        self.check_alive()
        self.comm.broadcast_command(("probe", calls, numel, dtype))
        seconds = all_reduce_probe(self.comm, calls, numel, dtype)
        self.reset_stats()
        return seconds

    def reset_stats(self) -> None:
        """Zero the collective counters on every rank."""
        self.check_alive()
        self.comm.stats.reset()
        self.comm.broadcast_command(("reset_stats",))

    def check_alive(self) -> None:
        """ParallelWorkerError when the group is down (checked before each call: a dead worker fails fast)."""
        if self.broken is None:
            dead = self._dead_workers()
            if dead:
                self.broken = dead
        if self.broken is not None:
            raise ParallelWorkerError(f"tensor-parallel engine unusable: {self.broken}; restart the engine")

    def _dead_workers(self) -> str:
        return ", ".join(f"rank {w.rank} exited with code {w.process.returncode}" for w in self.workers if not w.alive)


@dataclass
class Worker:
    """One worker process this node started."""

    rank: int
    process: subprocess.Popen

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float) -> None:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def run_node(model: str | Path, dtype: str, device: str, config, threads: int | None = None) -> int:
    """A node other than 0 (`--node-rank` > 0): start its tensor-parallel ranks, which meet node 0 at
    master_addr:master_port, and wait until they stop (node 0's engine shuts down); returns their worst exit code."""
    from ..checkpoint.hub import resolve_model_path

    launch = WorkerLaunch(model=str(resolve_model_path(model)), dtype=str(dtype), device=str(device),
                          world_size=config.tensor_parallel_size, master_addr=config.master_addr,
                          master_port=config.master_port, expert_parallel=config.enable_expert_parallel,
                          expert_placement=config.expert_placement, threads=threads or 1)
    driver = TensorParallelDriver(launch, config.nnodes, config.node_rank)
    driver._spawn(driver.layout.local_ranks())
    return max((abs(w.process.wait()) for w in driver.workers), default=0)


def load_engine_model(model: str | Path, dtype: str = "auto", device: str = "cpu", config=None,
                      threads: int | None = None):
    """The model an engine serves: `checkpoint.load_model`'s when tensor_parallel_size is 1, else rank 0's shard
    with the workers started (`config`: the EngineConfig)."""
    from ..checkpoint import load_model

    if config is None or config.tensor_parallel_size == 1:
        return load_model(model, dtype=dtype, device=device)
    from ..checkpoint.hub import resolve_model_path
    from .loader import check_shardable

    if str(device) != "cpu":
        raise ValueError(f"tensor_parallel_size > 1 runs on the CPU (gloo) for now; device {device!r} is not "
                         f"supported with it yet")
    directory = resolve_model_path(model)
    check_shardable(directory, config.tensor_parallel_size, config.enable_expert_parallel)  # before any process
    launch = WorkerLaunch(model=str(directory), dtype=str(dtype), device=str(device),
                          world_size=config.tensor_parallel_size, master_addr=config.master_addr,
                          master_port=config.master_port or 0, expert_parallel=config.enable_expert_parallel,
                          expert_placement=config.expert_placement, threads=threads or 1)
    return TensorParallelDriver(launch, config.nnodes, config.node_rank).start()


def _with_port(launch: WorkerLaunch, port: int) -> WorkerLaunch:
    import dataclasses

    return dataclasses.replace(launch, master_port=port)


def _seconds(s: float):
    from datetime import timedelta

    return timedelta(seconds=s)


def _backend(device: str) -> str:
    return "nccl" if str(device).startswith("cuda") else "gloo"


def shutdown(model) -> None:
    """Stop a tensor-parallel model's workers (no-op for a single-process model)."""
    driver = getattr(model, "parallel_driver", None)
    if driver is not None:
        driver.shutdown()
