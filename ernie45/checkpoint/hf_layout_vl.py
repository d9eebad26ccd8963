"""The one place that knows the tensor names of ERNIE 4.5 VL checkpoints.

Our parameters carry transformers' in-memory names (`model.language_model.*`, `model.vision_tower.*`,
`model.resampler_model.spatial_linear.fc1`, `mlp.text_moe.experts.gate_up_proj` [E, 2I, H], ...) except the
correction biases, which sit at `mlp.{text,vision}_moe.moe_statics.e_score_correction_bias`. On disk we meet:
- the released layout (also what transformers' `save_pretrained` writes): `model.layers.*`, `model.embed_tokens`,
  `model.norm`, experts `mlp.experts.{0..E-1}` (text) and `{E..2E-1}` (vision) as per-expert gate/up/down,
  gate weights TRANSPOSED [H, E] at `mlp.gate.weight` (text) and `mlp.gate.weight_1` (vision), one [2, E]
  `mlp.moe_statics.e_score_correction_bias` (row 0 text, row 1 vision), the vision tower at `model.vision_model.*`
  (or top-level `vision_model.*`) and the resampler MLPs as `spatial_linear.{0,2,3}` / `temporal_linear.{0,2,3}`;
- transformers' in-memory layout: our names, the biases at `mlp.{text,vision}_moe.gate.moe_statics.*`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

from .hf_layout import Target

LAYOUTS = ("released", "transformers")

_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_GATE = re.compile(r"^model\.layers\.(\d+)\.mlp\.gate\.weight(_1)?$")
_BIAS = re.compile(r"^model\.layers\.(\d+)\.mlp\.moe_statics\.e_score_correction_bias$")
_HF_BIAS = re.compile(r"^(model\.language_model\.layers\.\d+\.mlp\.(?:text|vision)_moe)\.gate\.moe_statics\.(.+)$")
_RESAMPLER = re.compile(r"^(model\.resampler_model\.(?:spatial|temporal)_linear)\.([023])\.(weight|bias)$")
_RESAMPLER_NUM = {"0": "fc1", "2": "fc2", "3": "ln"}
_RESAMPLER_NAME = {v: k for k, v in _RESAMPLER_NUM.items()}


def targets_of(name: str, num_experts: int) -> list[Target]:
    """Checkpoint tensor -> the parameter slot(s) it fills (a released bias fills two: text and vision rows)."""
    lm = "model.language_model.layers"
    if m := _EXPERT.match(name):
        layer, e, which = m.group(1), int(m.group(2)), m.group(3)
        moe = "text_moe" if e < num_experts else "vision_moe"
        e %= num_experts
        prefix = f"{lm}.{layer}.mlp.{moe}.experts"
        if which == "down":
            return [Target(f"{prefix}.down_proj", e)]
        return [Target(f"{prefix}.gate_up_proj", e, which)]
    if m := _GATE.match(name):
        moe = "vision_moe" if m.group(2) else "text_moe"
        return [Target(f"{lm}.{m.group(1)}.mlp.{moe}.gate.weight", transpose=True)]
    if m := _BIAS.match(name):
        prefix = f"{lm}.{m.group(1)}.mlp"
        return [
            Target(f"{prefix}.text_moe.moe_statics.e_score_correction_bias", source_row=0),
            Target(f"{prefix}.vision_moe.moe_statics.e_score_correction_bias", source_row=1),
        ]
    if m := _HF_BIAS.match(name):
        return [Target(f"{m.group(1)}.moe_statics.{m.group(2)}")]
    if m := _RESAMPLER.match(name):
        return [Target(f"{m.group(1)}.{_RESAMPLER_NUM[m.group(2)]}.{m.group(3)}")]
    for old, new in (
        ("model.vision_model.", "model.vision_tower."),
        ("vision_model.", "model.vision_tower."),
        ("model.embed_tokens.", "model.language_model.embed_tokens."),
        ("model.layers.", "model.language_model.layers."),
        ("model.norm.", "model.language_model.norm."),
    ):
        if name.startswith(old):
            return [Target(new + name[len(old) :])]
    return [Target(name)]


def to_transformers(name: str, param: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Our parameter -> transformers' in-memory name."""
    if name.endswith("_moe.moe_statics.e_score_correction_bias"):
        yield name.replace(".moe_statics.", ".gate.moe_statics."), param
    else:
        yield name, param


def released_state_dict(named_params: Iterator[tuple[str, torch.Tensor]], num_experts: int) -> dict[str, torch.Tensor]:
    """Our parameters -> the released tensors (views; the two bias rows of a layer are stacked into one tensor)."""
    out: dict[str, torch.Tensor] = {}
    biases: dict[str, dict[int, torch.Tensor]] = {}
    for name, param in named_params:
        for old, new in (("model.language_model.", "model."), ("model.vision_tower.", "model.vision_model.")):
            if name.startswith(old):
                name = new + name[len(old) :]
        if m := re.match(r"^(model\.layers\.\d+\.mlp)\.(text|vision)_moe\.(.+)$", name):
            prefix, vision, rest = m.group(1), m.group(2) == "vision", m.group(3)
            if rest == "gate.weight":
                out[f"{prefix}.gate.weight" + ("_1" if vision else "")] = param.t()
            elif rest == "moe_statics.e_score_correction_bias":
                biases.setdefault(f"{prefix}.moe_statics.e_score_correction_bias", {})[int(vision)] = param
            elif rest in ("experts.gate_up_proj", "experts.down_proj"):
                offset = num_experts if vision else 0
                for e in range(param.shape[0]):
                    if rest == "experts.down_proj":
                        out[f"{prefix}.experts.{e + offset}.down_proj.weight"] = param[e]
                    else:
                        inter = param.shape[1] // 2
                        out[f"{prefix}.experts.{e + offset}.gate_proj.weight"] = param[e, :inter]
                        out[f"{prefix}.experts.{e + offset}.up_proj.weight"] = param[e, inter:]
            else:
                raise ValueError(f"no released name for parameter {name}")
            continue
        if m := re.match(r"^(model\.resampler_model\.(?:spatial|temporal)_linear)\.(fc1|fc2|ln)\.(weight|bias)$", name):
            name = f"{m.group(1)}.{_RESAMPLER_NAME[m.group(2)]}.{m.group(3)}"
        out[name] = param
    for name, rows in biases.items():
        out[name] = torch.cat([rows[0], rows[1]], dim=0)
    return out


class VLLayout:
    """The VL family as `models.registry.CheckpointLayout`: released names, or transformers' in-memory ones."""

    save_layouts = LAYOUTS

    def targets_of(self, name: str, config) -> list[Target]:
        return targets_of(name, config.text.moe_num_experts)

    def skip(self, target: Target, params: dict, config) -> bool:
        return target.name == "lm_head.weight" and config.tie_word_embeddings

    def count_mtp_layers(self, names, config) -> int:
        return 0

    def to_disk(self, params, config, layout: str) -> dict[str, torch.Tensor]:
        if layout == "released":
            return released_state_dict(params, config.text.moe_num_experts)
        return dict(kv for name, param in params for kv in to_transformers(name, param))
