"""The collectives of one tensor-parallel rank, on torch.distributed process groups, with their time and bytes
counted (the benchmark reports communication per step from these counters).

Two groups: `step_group` carries the model's collectives (all-reduce after row-parallel layers, the LM head's
gather) with a short timeout, so that a rank that stopped answering fails the step instead of hanging it;
`control_group` carries rank 0's commands to the workers, who may wait on it for as long as the engine is idle.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

STEP_TIMEOUT = timedelta(seconds=30)
"""Longest a model collective may wait for the other ranks; past it the step fails (a rank is stuck or gone)."""
IDLE_TIMEOUT = timedelta(days=30)
"""How long a worker waits for rank 0's next command (an idle server sends none)."""


@dataclass
class CommStats:
    """Counters of the model's collectives since the last `reset` (rank-local)."""

    calls: int = 0
    all_reduce_bytes: int = 0
    """Bytes of the tensors all-reduced (each rank's input size; a ring moves about 2(N-1)/N of it per rank)."""
    gather_bytes: int = 0
    """Bytes each rank sends to rank 0 in the LM head's gathers."""
    seconds: float = 0.0
    command_seconds: float = 0.0
    """Time in rank 0's command broadcasts (each step's inputs), apart from the model's collectives."""

    def reset(self) -> None:
        self.calls, self.all_reduce_bytes, self.gather_bytes = 0, 0, 0
        self.seconds, self.command_seconds = 0.0, 0.0


@dataclass
class Communicator:
    """Rank `rank` of `world_size`; `step_group` / `control_group` as in the module docstring."""

    rank: int
    world_size: int
    step_group: object
    control_group: object
    stats: CommStats = field(default_factory=CommStats)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the ranks, in place (every rank gets the same sum)."""
        start = time.perf_counter()
        dist.all_reduce(t, group=self.step_group)
        self._count(start)
        self.stats.all_reduce_bytes += t.numel() * t.element_size()
        return t

    def gather_last_dim(self, t: torch.Tensor) -> torch.Tensor | None:
        """Rank 0: the ranks' `t` (equal shapes) concatenated along the last dim; other ranks: None."""
        start = time.perf_counter()
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world_size)] if self.rank == 0 else None
        dist.gather(t, parts, dst=0, group=self.step_group)
        self._count(start)
        self.stats.gather_bytes += t.numel() * t.element_size()
        return torch.cat(parts, dim=-1) if parts is not None else None

    def broadcast_command(self, command: tuple | None = None) -> tuple:
        """Rank 0 sends `command` to every worker; a worker waits for it and returns it."""
        box = [command]
        start = time.perf_counter()
        dist.broadcast_object_list(box, src=0, group=self.control_group)
        self.stats.command_seconds += time.perf_counter() - start
        return box[0]

    def gather_objects(self, obj) -> list | None:
        """Rank 0: every rank's `obj` in rank order; other ranks: None (control group: reports, not steps)."""
        out = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0, group=self.control_group)
        return out

    def barrier(self) -> None:
        dist.barrier(group=self.control_group)

    def _count(self, start: float) -> None:
        self.stats.seconds += time.perf_counter() - start
        self.stats.calls += 1


def connect(rank: int, world_size: int, store, backend: str = "gloo") -> Communicator:
    """Join the default process group through `store` (a TCPStore rank 0 serves) and make the two groups."""
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=STEP_TIMEOUT)
    control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)  # objects travel on the CPU whatever the device
    return Communicator(rank, world_size, dist.group.WORLD, control)


def disconnect() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
