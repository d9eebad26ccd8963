"""Turn a freshly built (meta-device) ERNIE 4.5 text model into one tensor-parallel rank's model, applied from
outside the model code (torchtitan's way): which slice of each parameter the rank holds, as a plan the sharded
loader reads, and the module swaps and hooks that make the rank's forward compute its share.

Megatron's split: q/k/v, gate/up column-parallel (output rows split), o_proj / down_proj row-parallel (input columns
split, their blocks' outputs summed across ranks), embedding and LM head split by vocabulary. KV heads are split
when the ranks divide them and replicated (each rank the one its query heads use) when there are more ranks than
KV heads, as vLLM does. MoE: each routed expert split by width (tensor parallel) or whole experts placed across the
ranks (`expert_parallel`); the router stays replicated and the shared experts tensor-parallel. Packed
weight-only linears and experts (`ernie45.quant`) split the same way, whole quantization groups per rank
(`quant_sharding`).

Legend: N ranks, r this rank, Q query heads, K kv heads, D head dim, I MLP / expert width, E experts.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.attention import Attention
from ..models.layers import Linear, SwiGLU
from ..models.moe import Experts, ModalityMoeBlock, MoeBlock
from ..quant.quantized_linear import QuantizedExperts, QuantizedLinear
from .comm import Communicator
from .layers import (
    ExpertParallelExperts,
    ExpertParallelQuantizedExperts,
    ParallelLMHead,
    VocabParallelEmbedding,
    all_reduce_output,
)
from .plan import Shard
from .quant_sharding import column_quantized, place_quantized_experts, row_quantized, shard_quantized_experts

__all__ = ["Shard", "expert_ids_of_rank", "kv_heads_of_rank", "shard_model"]


def expert_ids_of_rank(num_experts: int, world_size: int, rank: int, placement: str) -> list[int]:
    """Global ids of the experts rank `rank` holds: "linear" a contiguous block, "round_robin" e % N == r."""
    if num_experts % world_size:
        raise ValueError(f"enable_expert_parallel: moe_num_experts ({num_experts}) must be a multiple of "
                         f"tensor_parallel_size ({world_size})")
    per = num_experts // world_size
    if placement == "linear":
        return list(range(rank * per, (rank + 1) * per))
    return list(range(rank, num_experts, world_size))


def kv_heads_of_rank(num_heads: int, num_kv_heads: int, world_size: int, rank: int) -> tuple[int, int]:
    """(first kv head, kv heads) rank `rank` holds; ValueError when the heads do not split over the ranks."""
    if num_heads % world_size:
        raise ValueError(f"tensor_parallel_size ({world_size}) must divide num_attention_heads ({num_heads})")
    if world_size <= num_kv_heads:
        if num_kv_heads % world_size:
            raise ValueError(f"tensor_parallel_size ({world_size}) must divide num_key_value_heads "
                             f"({num_kv_heads}), or be a multiple of it (KV heads are then replicated)")
        per = num_kv_heads // world_size
        return rank * per, per
    if world_size % num_kv_heads:
        raise ValueError(f"tensor_parallel_size ({world_size}) exceeds num_key_value_heads ({num_kv_heads}) and is "
                         f"not a multiple of it: KV heads cannot be replicated evenly")
    return rank // (world_size // num_kv_heads), 1


def _split(width: int, world_size: int, rank: int, what: str) -> tuple[int, int]:
    if width % world_size:
        raise ValueError(f"tensor_parallel_size ({world_size}) must divide {what} ({width})")
    per = width // world_size
    return rank * per, (rank + 1) * per


def _column(parent: nn.Module, attr: str, name: str, start: int, stop: int, plan: dict[str, Shard]) -> None:
    """`parent.attr` keeps output rows [start, stop) (column-parallel)."""
    linear = getattr(parent, attr)
    if type(linear) is QuantizedLinear:
        setattr(parent, attr, column_quantized(linear, name, start, stop, plan))
        return
    _check_plain(linear, name)
    _narrow(linear, out_features=stop - start)
    plan[f"{name}.weight"] = plan[f"{name}.bias"] = Shard(0, start, stop)


def _row(parent: nn.Module, attr: str, name: str, start: int, stop: int, world_size: int,
         plan: dict[str, Shard]) -> None:
    """`parent.attr` keeps input columns [start, stop) (row-parallel; its bias is added on rank 0 only)."""
    linear = getattr(parent, attr)
    if type(linear) is QuantizedLinear:
        setattr(parent, attr, row_quantized(linear, name, start, stop, world_size, plan))
        return
    _check_plain(linear, name)
    _narrow(linear, in_features=stop - start)
    plan[f"{name}.weight"] = Shard(1, start, stop)
    plan[f"{name}.bias"] = Shard(rank0_only=True)


def _check_plain(linear: nn.Module, name: str) -> None:
    if type(linear) is not Linear:
        raise ValueError(f"{name}: tensor parallelism shards plain and quantized linears; found "
                         f"{type(linear).__name__} (LoRA-wrapped models are not supported with tensor_parallel_size "
                         f"> 1 yet)")


def _narrow(linear: nn.Module, out_features: int | None = None, in_features: int | None = None) -> None:
    """Give a Linear weights of its slice's shape (meta, filled by the loader)."""
    out_f = out_features or linear.out_features
    in_f = in_features or linear.in_features
    linear.weight = nn.Parameter(torch.empty(out_f, in_f, dtype=linear.weight.dtype, device=linear.weight.device))
    if linear.bias is not None and out_features is not None:
        linear.bias = nn.Parameter(torch.empty(out_f, dtype=linear.bias.dtype, device=linear.bias.device))
    linear.out_features, linear.in_features = out_f, in_f


def _shard_swiglu(mlp: SwiGLU, prefix: str, comm: Communicator, plan: dict[str, Shard], what: str) -> None:
    start, stop = _split(mlp.down_proj.in_features, comm.world_size, comm.rank, what)
    for name in ("gate_proj", "up_proj"):
        _column(mlp, name, f"{prefix}.{name}", start, stop, plan)
    _row(mlp, "down_proj", f"{prefix}.down_proj", start, stop, comm.world_size, plan)


def _shard_attention(attn: Attention, prefix: str, comm: Communicator, plan: dict[str, Shard]) -> int:
    N, r, D = comm.world_size, comm.rank, attn.head_dim
    kv_first, kv_count = kv_heads_of_rank(attn.num_heads, attn.num_kv_heads, N, r)
    q_per = attn.num_heads // N
    q_rows = Shard(0, r * q_per * D, (r + 1) * q_per * D)
    kv_rows = Shard(0, kv_first * D, (kv_first + kv_count) * D)
    _column(attn, "q_proj", f"{prefix}.q_proj", q_rows.start, q_rows.stop, plan)
    for name in ("k_proj", "v_proj"):
        _column(attn, name, f"{prefix}.{name}", kv_rows.start, kv_rows.stop, plan)
    _row(attn, "o_proj", f"{prefix}.o_proj", q_rows.start, q_rows.stop, N, plan)
    attn.num_heads, attn.num_kv_heads = q_per, kv_count
    return kv_count


def _shard_moe(moe: MoeBlock, prefix: str, comm: Communicator, plan: dict[str, Shard], expert_parallel: bool,
               placement: str) -> None:
    experts = moe.experts
    E, I = experts.num_experts, experts.intermediate_size
    quantized = type(experts) is QuantizedExperts
    if type(experts) is not Experts and not quantized:
        raise ValueError(f"{prefix}.experts: {type(experts).__name__} cannot be sharded (LoRA experts are not "
                         f"supported with tensor_parallel_size > 1 yet)")
    if expert_parallel:
        ids = expert_ids_of_rank(E, comm.world_size, comm.rank, placement)
        local = {g: i for i, g in enumerate(ids)}
        if quantized:
            moe.experts = ExpertParallelQuantizedExperts(
                E, ids, *place_quantized_experts(experts, f"{prefix}.experts", local, plan))
        else:
            moe.experts = ExpertParallelExperts(E, ids, experts.gate_up_proj.shape[-1], I)
            plan[f"{prefix}.experts.gate_up_proj"] = Shard(experts=local)
            plan[f"{prefix}.experts.down_proj"] = Shard(experts=local)
    elif quantized:
        start, stop = _split(I, comm.world_size, comm.rank, "moe_intermediate_size")
        moe.experts = shard_quantized_experts(experts, f"{prefix}.experts", start, stop, comm.world_size, plan)
    else:
        start, stop = _split(I, comm.world_size, comm.rank, "moe_intermediate_size")
        H = experts.gate_up_proj.shape[-1]
        dtype, device = experts.gate_up_proj.dtype, experts.gate_up_proj.device
        experts.gate_up_proj = nn.Parameter(torch.empty(E, 2 * (stop - start), H, dtype=dtype, device=device))
        experts.down_proj = nn.Parameter(torch.empty(E, H, stop - start, dtype=dtype, device=device))
        experts.intermediate_size = stop - start
        # Per-expert tensors: gate / up [I, H] split by rows, down [H, I] by columns.
        plan[f"{prefix}.experts.gate_up_proj"] = Shard(0, start, stop)
        plan[f"{prefix}.experts.down_proj"] = Shard(1, start, stop)
    if moe.shared_experts is not None:
        _shard_swiglu(moe.shared_experts, f"{prefix}.shared_experts", comm, plan, "the shared experts' width")


def _shard_layer(layer: nn.Module, prefix: str, comm: Communicator, plan: dict[str, Shard], expert_parallel: bool,
                 placement: str) -> int:
    """One decoder layer (attention + dense MLP / MoE / VL modality MoE), one all-reduce after each block;
    returns the KV heads the rank holds."""
    if type(layer.self_attn) is not Attention:
        raise ValueError(f"{prefix}.self_attn: {type(layer.self_attn).__name__} cannot be tensor-parallel")
    kv_heads = _shard_attention(layer.self_attn, f"{prefix}.self_attn", comm, plan)
    mlp = layer.mlp
    if type(mlp) is SwiGLU:
        _shard_swiglu(mlp, f"{prefix}.mlp", comm, plan, "intermediate_size")
    elif type(mlp) is MoeBlock:
        _shard_moe(mlp, f"{prefix}.mlp", comm, plan, expert_parallel, placement)
    elif type(mlp) is ModalityMoeBlock:
        # VL: both modality expert groups split (or placed) alike; a token's partial sums (its group's experts plus
        # the shared experts) complete in the block's one all-reduce, whichever group it routed to.
        for group in ("text_moe", "vision_moe"):
            _shard_moe(getattr(mlp, group), f"{prefix}.mlp.{group}", comm, plan, expert_parallel, placement)
        if mlp.shared_experts is not None:
            _shard_swiglu(mlp.shared_experts, f"{prefix}.mlp.shared_experts", comm, plan, "the shared experts' width")
    else:
        raise ValueError(f"{prefix}.mlp: {type(mlp).__name__} cannot be tensor-parallel")
    layer.self_attn.register_forward_hook(all_reduce_output(comm))
    mlp.register_forward_hook(all_reduce_output(comm))
    return kv_heads


def shard_model(model: nn.Module, comm: Communicator, expert_parallel: bool = False,
                placement: str = "linear") -> dict[str, Shard]:
    """Swap `model`'s modules (on the meta device) for rank `comm.rank`'s share; returns the loader's plan
    (parameter name -> `Shard`; parameters not named are replicated). Sets `model.kv_heads_per_rank`.

    VL models: the language model is sharded like the text one; the vision tower and resampler stay whole on
    every rank (rank 0 alone runs them, on each request's first prefill chunk, and the step's embeddings reach the
    workers with the step's inputs)."""
    lm = getattr(model.model, "language_model", model.model)
    lm_prefix = "model.language_model" if lm is not model.model else "model"
    config = lm.config
    if getattr(lm, "num_mtp_layers", 0):
        raise ValueError("tensor parallelism does not shard MTP layers yet; build the model without them")
    if type(model.lm_head) is not Linear:
        raise ValueError(f"lm_head: a {type(model.lm_head).__name__} head cannot be split by vocabulary yet "
                         f"(quantize without quantize_lm_head to serve with tensor_parallel_size > 1)")
    plan: dict[str, Shard] = {}
    device = lm.embed_tokens.weight.device
    with torch.device(device):
        lm.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, comm)
        head = ParallelLMHead(config.vocab_size, config.hidden_size, model.lm_head.bias is not None, comm)
    vocab = Shard(0, lm.embed_tokens.first, lm.embed_tokens.end)
    plan[f"{lm_prefix}.embed_tokens.weight"] = plan["lm_head.weight"] = plan["lm_head.bias"] = vocab
    model.lm_head = head
    model.tie_weights()
    kv_heads = None
    for i, layer in enumerate(lm.layers):
        kv_heads = _shard_layer(layer, f"{lm_prefix}.layers.{i}", comm, plan, expert_parallel, placement)
    model.kv_heads_per_rank = kv_heads
    return plan
