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
from .comm import Communicator
from .sharding import Shard, shard_model


def check_shardable(directory: Path, world_size: int, expert_parallel: bool = False) -> None:
    """ValueError for a checkpoint tensor parallelism cannot serve (before any worker is started)."""
    raw = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    spec = spec_for(raw.get("model_type"))
    if spec.family != "text":
        raise ValueError(f"{directory}: tensor_parallel_size > 1 supports the text models (ernie4_5, ernie4_5_moe); "
                         f"{raw.get('model_type')!r} is not supported yet")
    if "quantization_config" in raw:
        raise ValueError(f"{directory}: packed (quantization_config) checkpoints are not supported with "
                         f"tensor_parallel_size > 1 yet; serve the full-precision checkpoint")
    if paddle_layout.detect(directory / "config.json", raw, list_weight_files(directory)):
        raise ValueError(f"{directory}: Paddle-layout checkpoints are not supported with tensor_parallel_size > 1; "
                         f"convert once with `ernie45 convert {directory} OUT --to hf`")
    config = spec.config_class.from_dict(raw, source=str(directory / "config.json"))
    from .sharding import expert_ids_of_rank, kv_heads_of_rank

    kv_heads_of_rank(config.num_attention_heads, config.num_key_value_heads, world_size, 0)
    widths = {"intermediate_size": config.intermediate_size}
    if config.has_moe_layers:
        widths["moe_intermediate_size * moe_num_shared_experts"] = (config.moe_intermediate_size
                                                                    * config.moe_num_shared_experts)
        if expert_parallel:
            expert_ids_of_rank(config.moe_num_experts, world_size, 0, "linear")
        else:
            widths["moe_intermediate_size"] = config.moe_intermediate_size
    for what, width in widths.items():
        if width % world_size:
            raise ValueError(f"{directory}: tensor_parallel_size ({world_size}) must divide {what} ({width})")


def load_shard(model: str | Path, comm: Communicator, dtype: str | torch.dtype | None = "auto", device="cpu",
               expert_parallel: bool = False, placement: str = "linear"):
    """Rank `comm.rank`'s model (eval mode), with `kv_heads_per_rank` and `shard_plan` set."""
    directory = resolve_model_path(model)
    check_shardable(directory, comm.world_size, expert_parallel)
    spec = spec_for(json.loads((directory / "config.json").read_text(encoding="utf-8")).get("model_type"))
    config = spec.config_class.from_file(directory)
    weight_files = list_weight_files(directory)
    plan: dict[str, Shard] = {}
    net = build_empty_model(config, parse_dtype(dtype, config.extra), 0, device,
                            transform=lambda m: plan.update(shard_model(m, comm, expert_parallel, placement)))
    fill_shards(net, directory, weight_files, plan, spec.layout, comm.rank)
    net.eval()
    net.source_dir = directory
    net.generation_config = read_optional_json(directory / "generation_config.json")
    net.shard_plan = plan
    return net


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
    if target.transpose or target.source_row is not None:
        raise ValueError("transposed / row-sourced tensors (VL layout) cannot be sharded")
    shape = sl.get_shape()
    if shard is None:
        tensor = sl[:]
        yield place(param, target, tensor), tensor
        return
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
    index = [slice(None)] * len(shape)
    if target.expert is None and param.dim() == 3:  # stacked experts on disk, tensor parallel
        yield from _stacked_expert_slices(sl, target, param, shard)
        return
    index[shard.dim] = slice(shard.start, shard.stop)
    tensor = sl[tuple(index)]
    if target.expert is not None:
        yield place(param, target, tensor), tensor
    else:
        yield param.narrow(shard.dim, 0, shard.stop - shard.start), tensor


def _stacked_expert_slices(sl, target: Target, param: torch.Tensor, shard: Shard):
    """transformers' fused [E, 2I, H] gate_up / [E, H, I] down on disk: each expert's width slice."""
    _, rows, _ = sl.get_shape()
    if target.name.endswith("gate_up_proj"):
        inter = rows // 2
        local = shard.stop - shard.start
        for start, offset in ((shard.start, 0), (inter + shard.start, local)):
            tensor = sl[:, start : start + local, :]
            yield param[:, offset : offset + local, :], tensor
    else:
        tensor = sl[:, :, shard.start : shard.stop]
        yield param, tensor
