"""Tensor-parallel slices of the weight-only quantized modules (`ernie45.quant`): a packed `QuantizedLinear` split
by output rows (column-parallel: its codes, scales, zero points and bias rows) or by input features (row-parallel:
the codes' columns and the scales / zero points of the groups those columns form), and quantized experts split by
width or placed whole (expert parallel).

Groups are never cut: a row-parallel split must give each rank whole groups, else it is refused naming the tensor
and the group size. Per-channel formats (one group per row, int8's default) split anywhere: both ranks keep the
row's scale, and each rank's columns form one (smaller) group of that scale, so the rank's weights dequantize to
exactly the columns they replace. The codes of a rank's columns are read as the packing blocks that cover them
and, when the split falls inside a block, re-packed (`packing.pack_codes`): a rank reads at most one block per
row beyond its own.

Legend: N ranks, K input features, S group size, E experts.
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant.packing import K_MULTIPLE
from ..quant.quantized_linear import QuantizedExperts, QuantizedLinear
from ..quant.spec import PER_CHANNEL
from .plan import Shard


def _rebuilt(old: QuantizedLinear, in_features: int, out_features: int, name: str, num_experts: int | None = None):
    """An empty QuantizedLinear of `old`'s format and the slice's shape (meta, filled by the loader)."""
    bias = old.bias
    return QuantizedLinear(
        in_features, out_features, old.spec, bias is not None,
        num_experts if num_experts is not None else (old.qweight.shape[0] if old.qweight.dim() == 3 else None),
        bias.dtype if bias is not None else torch.float32, old.qweight.device, name,
    )  # fmt: skip


def check_row_split(name: str, module: QuantizedLinear, world_size: int) -> int:
    """The group size of each rank's slice when `module`'s inputs are split over the ranks; ValueError naming
    the tensor and its group size when a rank's columns would not be whole groups."""
    K = module.in_features
    if K % world_size:
        raise ValueError(f"{name}: tensor_parallel_size ({world_size}) must divide its {K} input features")
    per = K // world_size
    if per % K_MULTIPLE:
        raise ValueError(f"{name}: tensor_parallel_size ({world_size}) would leave {per} of its {K} quantized "
                         f"input features per rank, not a multiple of {K_MULTIPLE} (the kernel's unit)")
    if module.spec.group_size == PER_CHANNEL:
        return per
    S = module.group_size
    if per % S:
        raise ValueError(f"{name}: tensor_parallel_size ({world_size}) splits its {K} input features into {per} "
                         f"per rank, which would cut its quantization groups of {S}; quantize with a group size "
                         f"that divides {per} (or per channel, -1), or serve with a smaller tensor_parallel_size")
    return S


def column_quantized(module: QuantizedLinear, name: str, start: int, stop: int, plan: dict[str, Shard],
                     out_features: int | None = None) -> QuantizedLinear:
    """Output rows [start, stop) (of each checkpoint tensor: stacked experts' gate and up are one each per
    expert on disk, so `out_features` is then twice the slice)."""
    local = _rebuilt(module, module.in_features, out_features or stop - start, name)
    for tensor in ("qweight", "scales", "qzeros", "bias"):
        plan[f"{name}.{tensor}"] = Shard(0, start, stop)
    return local


def row_quantized(module: QuantizedLinear, name: str, start: int, stop: int, world_size: int,
                  plan: dict[str, Shard], dim: int = 1) -> QuantizedLinear:
    """Input columns [start, stop): codes by column, scales and zero points by group (whole rows per channel)."""
    S = check_row_split(name, module, world_size)
    local = _rebuilt(module, stop - start, module.out_features, name)
    plan[f"{name}.qweight"] = Shard(dim, start, stop, codes_bits=module.spec.bits)
    if module.spec.group_size != PER_CHANNEL:  # per channel: each rank reads the rows' scales whole
        groups = Shard(dim, start // S, stop // S)
        plan[f"{name}.scales"] = plan[f"{name}.qzeros"] = groups
    plan[f"{name}.bias"] = Shard(rank0_only=True)
    return local


def shard_quantized_experts(experts: QuantizedExperts, prefix: str, start: int, stop: int, world_size: int,
                            plan: dict[str, Shard]) -> QuantizedExperts:
    """Every expert's width [start, stop): gate and up rows, down columns."""
    gate_up = column_quantized(experts.gate_up_proj, f"{prefix}.gate_up_proj", start, stop, plan, 2 * (stop - start))
    down = row_quantized(experts.down_proj, f"{prefix}.down_proj", start, stop, world_size, plan)
    return QuantizedExperts(gate_up, down)


def place_quantized_experts(experts: QuantizedExperts, prefix: str, local: dict[int, int], plan: dict[str, Shard]):
    """Expert parallel: (gate_up, down) holding only the experts in `local` (global id -> local index), whole."""
    count = len(local)
    gate_up = _rebuilt(experts.gate_up_proj, experts.gate_up_proj.in_features, experts.gate_up_proj.out_features,
                       f"{prefix}.gate_up_proj", count)
    down = _rebuilt(experts.down_proj, experts.down_proj.in_features, experts.down_proj.out_features,
                    f"{prefix}.down_proj", count)
    for name in ("gate_up_proj", "down_proj"):
        for tensor in ("qweight", "scales", "qzeros"):
            plan[f"{prefix}.{name}.{tensor}"] = Shard(experts=local)
    return gate_up, down


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, (QuantizedLinear, QuantizedExperts))
