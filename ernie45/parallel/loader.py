"""Load one tensor-parallel rank's share of an HF-layout ERNIE 4.5 text checkpoint: the model is built on the meta
device, sharded (`sharding.shard_model`), materialised, and each parameter filled from safetensors' `get_slice`,
so a rank reads only the rows / columns / experts it holds, never a whole tensor it then cuts."""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import SafetensorError

from ..checkpoint import paddle_layout
from ..checkpoint.hf_layout import Target, place
from ..checkpoint.hub import resolve_model_path
from ..checkpoint.loader import _open, build_empty_model, list_weight_files, parse_dtype, read_optional_json
from ..models.registry import spec_for
from ..quant.modules import apply_quantization_config
from ..quant.packing import BLOCK_BYTES, codes_per_byte, pack_codes, unpack_codes
from .comm import Communicator
from .quant_sharding import is_quantized
from .sharding import Shard, shard_model


def check_shardable(directory: Path, world_size: int, expert_parallel: bool = False) -> None:
    """ValueError for a checkpoint tensor parallelism cannot serve (before any worker is started)."""
    raw = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    spec = spec_for(raw.get("model_type"))
    if "quantization_config" in raw and not spec.supports_quantized_checkpoints:
        raise ValueError(f"{directory}: packed (quantization_config) checkpoints of {spec.family} models are not "
                         f"supported; serve the full-precision checkpoint")
    if paddle_layout.detect(directory / "config.json", raw, list_weight_files(directory)):
        raise ValueError(f"{directory}: Paddle-layout checkpoints are not supported with tensor_parallel_size > 1; "
                         f"convert once with `ernie45 convert {directory} OUT --to hf`")
    config = spec.config_class.from_dict(raw, source=str(directory / "config.json"))
    text = spec.text_config(config)
    from .sharding import expert_ids_of_rank, kv_heads_of_rank

    kv_heads_of_rank(text.num_attention_heads, text.num_key_value_heads, world_size, 0)
    widths = {"intermediate_size": text.intermediate_size}
    if text.has_moe_layers:
        widths["moe_intermediate_size * moe_num_shared_experts"] = (text.moe_intermediate_size
                                                                    * text.moe_num_shared_experts)
        if expert_parallel:
            expert_ids_of_rank(text.moe_num_experts, world_size, 0, "linear")
        else:
            widths["moe_intermediate_size"] = text.moe_intermediate_size
            if spec.is_multimodal:
                widths["vision_moe_intermediate_size"] = config.vision_moe_intermediate_size
    for what, width in widths.items():
        if width % world_size:
            raise ValueError(f"{directory}: tensor_parallel_size ({world_size}) must divide {what} ({width})")
    if "quantization_config" in raw:  # every packed split checked (group boundaries) on a meta-device rank 0
        try:
            build_empty_model(config, torch.float32, 0, "meta",
                              transform=_rank_transform(config, Communicator(0, world_size, None, None),
                                                        expert_parallel, "linear", {}))
        except ValueError as exc:
            raise ValueError(f"{directory}: {exc}") from exc


def load_shard(model: str | Path, comm: Communicator, dtype: str | torch.dtype | None = "auto", device="cpu",
               expert_parallel: bool = False, placement: str = "linear"):
    """Rank `comm.rank`'s model (eval mode), with `kv_heads_per_rank` and `shard_plan` set."""
    directory = resolve_model_path(model)
    check_shardable(directory, comm.world_size, expert_parallel)
    spec = spec_for(json.loads((directory / "config.json").read_text(encoding="utf-8")).get("model_type"))
    config = spec.config_class.from_file(directory)
    weight_files = list_weight_files(directory)
    plan: dict[str, Shard] = {}
    packed_dtypes: dict[str, torch.dtype] = {}
    net = build_empty_model(config, parse_dtype(dtype, config.extra), 0, device,
                            transform=_rank_transform(config, comm, expert_parallel, placement, plan, packed_dtypes))
    _restore_packed_dtypes(net, packed_dtypes)
    fill_shards(net, directory, weight_files, plan, spec.layout, comm.rank)
    net.eval()
    net.source_dir = directory
    net.generation_config = read_optional_json(directory / "generation_config.json")
    net.shard_plan = plan
    return net


def _rank_transform(config, comm: Communicator, expert_parallel: bool, placement: str, plan: dict[str, Shard],
                    packed_dtypes: dict[str, torch.dtype] | None = None):
    """The meta-model transform of one rank: a packed checkpoint's quantized modules swapped in (as the
    single-process loader does), then the rank's slices (`plan` filled); `packed_dtypes` records the quantized
    modules' tensor dtypes, which `build_empty_model`'s cast to the model dtype must not keep."""

    def transform(model) -> None:
        if "quantization_config" in config.extra:
            apply_quantization_config(model, config.extra["quantization_config"])
        plan.update(shard_model(model, comm, expert_parallel, placement))
        if packed_dtypes is not None:
            for name, module in model.named_modules():
                if is_quantized(module):
                    packed_dtypes.update({f"{name}.{n}": p.dtype for n, p in module.named_parameters()})

    return transform


def _restore_packed_dtypes(net, packed_dtypes: dict[str, torch.dtype]) -> None:
    """Give the packed tensors (uint8 codes, fp16 scales) their own dtype back, uninitialised (filled next)."""
    for name, dtype in packed_dtypes.items():
        owner_name, _, attr = name.rpartition(".")
        owner = net.get_submodule(owner_name)
        param = getattr(owner, attr)
        if param.dtype != dtype:
            setattr(owner, attr, torch.nn.Parameter(torch.empty(param.shape, dtype=dtype, device=param.device),
                                                    requires_grad=False))


def fill_shards(net, directory: Path, weight_files: dict[str, Path], plan: dict[str, Shard], layout,
                rank: int) -> None:
    """Copy each parameter's share from the checkpoint; ValueError naming what is missing or unexpected."""
    config = net.config
    params = dict(net.named_parameters())
    filled: dict[str, int] = defaultdict(int)  # elements written per parameter
    unexpected: list[str] = []
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name, file in weight_files.items():
        by_file[file].append(name)
    with torch.no_grad():
        for p in params.values():
            p.zero_()  # vocab padding rows and the other ranks' row-parallel biases stay 0
        for file, names in by_file.items():
            with _open(file) as f:
                for name in names:
                    for target in layout.targets_of(name, config):
                        if layout.skip(target, params, config):
                            continue
                        if target.name not in params:
                            unexpected.append(name)
                            continue
                        try:
                            for view, tensor in _pieces(f.get_slice(name), target, params[target.name],
                                                        plan.get(target.name), rank):
                                view.copy_(tensor)
                                filled[target.name] += tensor.numel()
                        except (SafetensorError, OSError) as exc:
                            raise ValueError(f"{file}: tensor {name} cannot be read (truncated or corrupt?): {exc}") from exc
                        except ValueError as exc:
                            raise ValueError(f"{file}: tensor {name}: {exc}") from exc
    missing = [n for n, p in params.items() if filled[n] < _expected(p, plan.get(n), rank)]
    if missing or unexpected:
        parts = [f"missing or partial tensors: {', '.join(missing[:20])}"] if missing else []
        parts += [f"unexpected tensors: {', '.join(unexpected[:20])}"] if unexpected else []
        raise ValueError(f"{directory}: checkpoint does not match its config.json: " + "; ".join(parts))


def _expected(param: torch.Tensor, shard: Shard | None, rank: int) -> int:
    """Elements the checkpoint must supply: all but the vocab padding rows and the zero biases of ranks > 0."""
    if shard is None or shard.experts is not None:
        return param.numel()
    if shard.rank0_only:
        return param.numel() if rank == 0 else 0
    if shard.dim == 0 and param.shape[0] > shard.stop - shard.start:  # padded vocab slice
        return (shard.stop - shard.start) * param[0].numel()
    return param.numel()


def _pieces(sl, target: Target, param: torch.Tensor, shard: Shard | None, rank: int):
    """(view of param, tensor read from the slice handle) pairs for one checkpoint tensor."""
    shape = sl.get_shape()
    if shard is None:  # replicated: read whole (the VL layout's transposed gates and stacked biases included)
        tensor = target.source(sl[:])
        yield place(param, target, tensor), tensor
        return
    if target.transpose or target.source_row is not None:
        raise ValueError("transposed / row-sourced tensors (the VL layout's router tensors) are replicated, "
                         "never split")
    if shard.rank0_only:
        if rank == 0:
            tensor = sl[:]
            yield place(param, target, tensor), tensor
        return
    if shard.experts is not None:  # expert parallel: whole experts, only the local ones
        if target.expert is not None:
            local = shard.experts.get(target.expert)
            if local is not None:
                tensor = sl[:]
                yield place(param, dataclasses.replace(target, expert=local), tensor), tensor
            return
        for global_id, local in shard.experts.items():  # a stacked [E, ...] tensor on disk
            tensor = sl[global_id : global_id + 1][0]
            yield param[local], tensor
        return
    if target.expert is None and param.dim() == 3:  # stacked experts on disk, tensor parallel
        yield from _stacked_expert_slices(sl, target, param, shard)
        return
    tensor = _read(sl, shape, shard)
    if target.expert is not None:
        yield place(param, target, tensor), tensor
    else:
        yield param.narrow(shard.dim, 0, tensor.shape[shard.dim]), tensor  # a padded vocab slice: its real rows


def _stacked_expert_slices(sl, target: Target, param: torch.Tensor, shard: Shard):
    """transformers' fused [E, 2I, H] gate_up / [E, H, I] down on disk: each expert's width slice."""
    _, rows, _ = sl.get_shape()
    if target.name.endswith("gate_up_proj"):
        inter = rows // 2
        local = shard.stop - shard.start
        for start, offset in ((shard.start, 0), (inter + shard.start, local)):
            tensor = sl[:, start : start + local, :]
            yield param[:, offset : offset + local, :], tensor
    else:  # the per-expert split's dim, one further in
        yield param, _read(sl, sl.get_shape(), dataclasses.replace(shard, dim=shard.dim + 1))


def _read(sl, shape, shard: Shard) -> torch.Tensor:
    """Indices [start, stop) of `shard.dim` of a checkpoint tensor; of packed codes, the blocks that cover those
    weights along the last dim, re-packed when the split falls inside a block (`quant.packing` layout)."""
    index = [slice(None)] * len(shape)
    if shard.codes_bits is None:
        index[shard.dim] = slice(shard.start, shard.stop)
        return sl[tuple(index)]
    if shard.dim != len(shape) - 1:
        raise ValueError(f"packed codes split along dim {shard.dim}; only their last dim packs weights")
    per_block = BLOCK_BYTES * codes_per_byte(shard.codes_bits)
    first, end = shard.start // per_block, -(-shard.stop // per_block)
    index[-1] = slice(first * BLOCK_BYTES, end * BLOCK_BYTES)
    raw = sl[tuple(index)]
    if shard.start % per_block == 0 and (shard.stop - shard.start) % per_block == 0:
        return raw  # whole blocks: the rank's codes exactly as stored
    codes = unpack_codes(raw, shard.codes_bits, (end - first) * per_block)
    offset = shard.start - first * per_block
    return pack_codes(codes[..., offset : offset + shard.stop - shard.start], shard.codes_bits)
