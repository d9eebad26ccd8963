"""A rank's shard plan entry: which part of a checkpoint tensor a rank reads into a parameter
(`sharding.shard_model` writes the plan, `loader.fill_shards` reads it)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Shard:
    """The part of a checkpoint tensor a rank reads into a parameter: indices [start, stop) along `dim`,
    everything on rank 0 and zeros elsewhere (`rank0_only`: biases of row-parallel linears, added once), or for
    stacked experts the global -> local expert ids it holds (`experts`; expert parallel).

    `codes_bits`: the tensor is packed codes of that width (`quant.packing`) and [start, stop) count weights
    along its last dim, not bytes."""

    dim: int | None = None
    start: int = 0
    stop: int = 0
    rank0_only: bool = False
    experts: dict[int, int] | None = field(default=None, hash=False)
    codes_bits: int | None = None
