"""The one place that knows HF tensor names of ERNIE 4.5 text checkpoints.

Our parameters carry transformers' in-memory names, except two: routed experts are stacked
(`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]) and the correction bias lives at the
released name `mlp.moe_statics.e_score_correction_bias`. On disk we meet three spellings:
- released `-PT` layout: `mlp.experts.{e}.{gate,up,down}_proj.weight`, `mlp.moe_statics.e_score_correction_bias`;
- transformers' fused in-memory layout: `mlp.experts.gate_up_proj`, `mlp.experts.down_proj`,
  `mlp.gate.moe_statics.e_score_correction_bias`;
- our own names (identical to the fused layout but for the bias).
A checkpoint tensor maps to (our parameter name, where in it): the whole tensor, or one expert's slice.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch

_PER_EXPERT = re.compile(
    r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.(weight|qweight|scales|qzeros)$"
)
# Quantized checkpoints (ernie45.quant) store each weight as packed codes + fp16 scales (+ zero points) under
# `<weight's module>.{qweight,scales,qzeros}`; per expert as `experts.{e}.gate_proj.qweight` and so on.
_PACKED_SUFFIXES = (".qweight", ".scales", ".qzeros")
_HF_FUSED_BIAS = re.compile(r"^(model\.layers\.\d+\.mlp)\.gate\.moe_statics\.e_score_correction_bias$")


@dataclass(frozen=True)
class Target:
    """Where a checkpoint tensor goes: parameter `name`, at expert `expert` and row half `half` (None = whole).

    `source_row` takes one row of the checkpoint tensor (kept 2-D) and `transpose` flips it first: the VL layout's
    stacked correction biases and transposed gate weights."""

    name: str
    expert: int | None = None
    half: str | None = None  # "gate" | "up" for gate_up_proj rows; None for down_proj / whole tensors
    source_row: int | None = None
    transpose: bool = False

    def source(self, tensor: torch.Tensor) -> torch.Tensor:
        """The part of the checkpoint tensor this target receives."""
        if self.transpose:
            tensor = tensor.t()
        if self.source_row is not None:
            tensor = tensor[self.source_row : self.source_row + 1]
        return tensor


def target_of(hf_name: str) -> Target:
    """Map a checkpoint tensor name to our parameter (names we do not know map to themselves and are reported)."""
    m = _PER_EXPERT.match(hf_name)
    if m:
        prefix, expert, which, kind = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        suffix = "" if kind == "weight" else f".{kind}"
        if which == "down":
            return Target(f"{prefix}.down_proj{suffix}", expert)
        return Target(f"{prefix}.gate_up_proj{suffix}", expert, which)
    m = _HF_FUSED_BIAS.match(hf_name)
    if m:
        return Target(f"{m.group(1)}.moe_statics.e_score_correction_bias")
    return Target(hf_name)


def place(param: torch.Tensor, target: Target, tensor: torch.Tensor) -> torch.Tensor:
    """The view of `param` that `tensor` fills (raises ValueError with both shapes on mismatch)."""
    if target.expert is None:
        view = param
    else:
        if target.expert >= param.shape[0]:
            raise ValueError(f"expert index {target.expert} out of range: the model has {param.shape[0]} experts")
        view = param[target.expert]
        if target.half is not None:
            inter = view.shape[0] // 2
            view = view[:inter] if target.half == "gate" else view[inter:]
    if tuple(view.shape) != tuple(tensor.shape):
        raise ValueError(f"shape {tuple(tensor.shape)} in the checkpoint, the model expects {tuple(view.shape)}")
    return view


def to_released(name: str, param: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Our parameter -> the released per-expert tensors (views; callers make them contiguous when writing)."""
    kind = next((s for s in _PACKED_SUFFIXES if name.endswith(s)), "")
    base, tail = name[: len(name) - len(kind)], kind[1:] or "weight"
    if base.endswith(".mlp.experts.gate_up_proj"):
        prefix = base[: -len(".gate_up_proj")]
        inter = param.shape[1] // 2
        for e in range(param.shape[0]):
            yield f"{prefix}.{e}.gate_proj.{tail}", param[e, :inter]
            yield f"{prefix}.{e}.up_proj.{tail}", param[e, inter:]
    elif base.endswith(".mlp.experts.down_proj"):
        prefix = base[: -len(".down_proj")]
        for e in range(param.shape[0]):
            yield f"{prefix}.{e}.down_proj.{tail}", param[e]
    else:
        yield name, param


class TextLayout:
    """The text family (dense, MoE, MTP) as `models.registry.CheckpointLayout`: released per-expert names on disk."""

    save_layouts = ("released",)

    def targets_of(self, name: str, config) -> list[Target]:
        return [target_of(name)]

    def skip(self, target: Target, params: dict, config) -> bool:
        if target.name == "lm_head.weight" and config.tie_word_embeddings:
            return True  # some tied checkpoints carry a copy of the embedding; the tie wins
        return target.name.startswith("model.mtp_") and target.name not in params  # beyond num_nextn_predict_layers

    def count_mtp_layers(self, names, config) -> int:
        """MTP depth present in the checkpoint (built only when its tensors are there), capped by the config's."""
        depths = {int(n.split(".")[2]) for n in names if n.startswith("model.mtp_block.")}
        present = max(depths) + 1 if depths else 0
        return min(present, config.num_nextn_predict_layers or present)

    def to_disk(self, params, config, layout: str) -> dict[str, torch.Tensor]:
        if layout != "released":
            raise ValueError("text models are saved in the released layout only (transformers reads it as is)")
        return dict(kv for name, param in params for kv in to_released(name, param))
