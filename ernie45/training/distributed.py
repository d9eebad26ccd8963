"""Process group setup and the transforms that parallelise a built model from outside (torchtitan's order:
activation checkpointing, then FSDP2). The trainer is the same code on 1 or N processes: with one process these
are no-ops and the collectives return their input."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..models.moe import MoeBlock


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False
    """Whether init_distributed created the process group (and shutdown should destroy it)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistInfo:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1): NCCL on GPUs, else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if world <= 1:
        return DistInfo(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()  # a caller that set up the group itself keeps it across runs
    if owns:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, device, owns)


def shutdown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def reduce_dict(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Sum each value over ranks (same keys on every rank)."""
    if not info.enabled or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.tolist()))


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def apply_activation_checkpointing(layers: nn.ModuleList) -> None:
    """Recompute each of these decoder layers in backward (non-reentrant checkpoint; parameter names unchanged)."""
    for layer in layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


def correction_biases(model: nn.Module) -> list[nn.Parameter]:
    return [m.moe_statics.e_score_correction_bias for m in model.modules() if isinstance(m, MoeBlock)]


def apply_fsdp(training_model: nn.Module, info: DistInfo) -> nn.Module:
    """FSDP2 `fully_shard` per attention / MLP / expert group of every layer, then the root.

    Routers, norms and embeddings stay in the root group, so router weights are whole during the training forward
    (the orthogonal loss reads them); the correction biases are not sharded (updated in place on every rank)."""
    from torch.distributed.fsdp import fully_shard

    model = training_model.model
    blocks = list(model.model.layers)
    if model.model.num_mtp_layers:
        blocks += list(model.model.mtp_block)
    for layer in blocks:
        fully_shard(layer.self_attn)
        if isinstance(layer.mlp, MoeBlock):
            fully_shard(layer.mlp.experts)
            if layer.mlp.shared_experts is not None:
                fully_shard(layer.mlp.shared_experts)
        else:
            fully_shard(layer.mlp)
    fully_shard(training_model, ignored_params=set(correction_biases(model)))
    return training_model


def apply_ddp(training_model: nn.Module, info: DistInfo, find_unused_parameters: bool = False) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(training_model, device_ids=[info.local_rank] if info.device.type == "cuda" else None,
                                   find_unused_parameters=find_unused_parameters)
