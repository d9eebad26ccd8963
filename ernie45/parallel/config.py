"""Validation of EngineConfig's parallelism fields, and the rank layout they imply.

Kept here so that `engine_config.py` stays the one place of defaults while the rules (which combinations exist,
how ranks map onto nodes) live with the code that uses them.
"""

from __future__ import annotations

from dataclasses import dataclass

EXPERT_PLACEMENTS = ("linear", "round_robin")


def check_parallel_fields(config) -> None:
    """ValueError naming the field for an impossible combination of an EngineConfig's parallelism fields."""
    for name in ("tensor_parallel_size", "data_parallel_size", "nnodes"):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(config.node_rank, int) or not 0 <= config.node_rank < config.nnodes:
        raise ValueError(f"node_rank must be in [0, nnodes={config.nnodes}), got {config.node_rank!r}")
    if config.tensor_parallel_size % config.nnodes:
        raise ValueError(f"tensor_parallel_size ({config.tensor_parallel_size}) must be a multiple of nnodes "
                         f"({config.nnodes}): every node runs the same number of ranks")
    if config.nnodes > 1 and config.master_port is None:
        raise ValueError("master_port is needed with nnodes > 1: every node must meet node 0 at the same port")
    if config.master_port is not None and not (isinstance(config.master_port, int) and 0 < config.master_port < 65536):
        raise ValueError(f"master_port must be a TCP port in [1, 65535], got {config.master_port!r}")
    if config.expert_placement not in EXPERT_PLACEMENTS:
        raise ValueError(f"expert_placement must be one of {', '.join(EXPERT_PLACEMENTS)}, "
                         f"got {config.expert_placement!r}")
    if config.enable_expert_parallel and config.tensor_parallel_size < 2:
        raise ValueError("enable_expert_parallel places experts across the tensor-parallel ranks: it needs "
                         "tensor_parallel_size >= 2")
    if config.data_parallel_size > 1 and config.nnodes > 1:
        raise ValueError("data_parallel_size > 1 with nnodes > 1 is not supported: run one data-parallel server "
                         "per node group instead")
    from ..engine.spec_decode import SpeculativeConfig

    spec = SpeculativeConfig.of(config.speculative_config)
    if config.tensor_parallel_size > 1 and spec is not None and spec.method != "ngram":
        raise ValueError(f"speculative_config method {spec.method!r} is not supported with tensor_parallel_size > 1 "
                         f"yet (n-gram drafting is: its drafts are verified by the ordinary model calls)")


@dataclass(frozen=True)
class RankLayout:
    """Where one tensor-parallel rank runs: `rank` of `world_size`, on node `node_rank` of `nnodes`."""

    world_size: int
    nnodes: int
    node_rank: int

    @property
    def ranks_per_node(self) -> int:
        return self.world_size // self.nnodes

    def local_ranks(self) -> range:
        """The global ranks this node starts (node 0's first one is the engine itself)."""
        first = self.node_rank * self.ranks_per_node
        return range(first, first + self.ranks_per_node)
