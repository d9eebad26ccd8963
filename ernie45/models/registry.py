"""One model protocol for every ERNIE 4.5 family: config.json's `model_type` -> a `ModelSpec` naming the config
class, the model class, the checkpoint layout (the only code that knows the family's HF tensor names), which
parameters stay fp32 whatever the model dtype, and what the family can do (media inputs, MTP, packed weights).

Loader, saver, trainer, generation and engine ask `spec_for(model_type | config | model)` instead of testing the
class of a model. The layouts live in `ernie45.checkpoint` (which imports this module), so they are imported when
the first spec is asked for, not when this module loads.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .config import SUPPORTED_MODEL_TYPES, Ernie45Config
from .ernie45 import Ernie45ForCausalLM
from .ernie45_vl import Ernie45VLForConditionalGeneration
from .vl_config import VL_MODEL_TYPES, Ernie45VLConfig

# Model types we recognise but do not read, with what to do instead.
_UNREAD_MODEL_TYPES = {
    "ernie4_5_moe_vl": (
        "the original remote-code VL format; ernie45 reads transformers' format (model_type 'ernie4_5_vl_moe' with "
        "text_config / vision_config): load the checkpoint with transformers >= 5 and save_pretrained it, or use a "
        "checkpoint revision that ships it"
    ),
}


class CheckpointLayout(Protocol):
    """A family's HF tensor names, both ways (`checkpoint/hf_layout.py`, `checkpoint/hf_layout_vl.py`)."""

    save_layouts: tuple[str, ...]
    """Layouts `to_disk` writes; the first is the default (the released one)."""

    def targets_of(self, name: str, config: Any) -> list:
        """Checkpoint tensor name -> the parameter slots (`checkpoint.hf_layout.Target`) it fills."""
        ...

    def skip(self, target, params: dict[str, torch.Tensor], config: Any) -> bool:
        """Whether a checkpoint tensor is ignored on load (a tied head's copy, MTP depths not built)."""
        ...

    def count_mtp_layers(self, names, config: Any) -> int:
        """MTP depth to build from the checkpoint's tensor names (0 for families without MTP)."""
        ...

    def to_disk(self, params: list[tuple[str, torch.Tensor]], config: Any, layout: str) -> dict[str, torch.Tensor]:
        """Our (name, tensor) pairs -> the tensors written in `layout`."""
        ...


@dataclass(frozen=True)
class ModelSpec:
    """What the code outside `models/` needs to know about one model family."""

    family: str
    """Short name: "text" (dense and MoE, with optional MTP) or "vl"."""
    model_types: tuple[str, ...]
    """config.json `model_type` values of this family."""
    config_class: type
    """Has `from_file(dir)`, `from_dict(raw)`, `to_dict()`."""
    model_class: type
    """Built as `model_class(config, num_mtp_layers)` (on the meta device by the loader)."""
    layout: CheckpointLayout
    fp32_param_suffixes: tuple[str, ...]
    """Parameters whose names end so stay fp32 under bf16/fp16 (router weights and correction biases, as released
    and in transformers: routing must not flip with the model dtype)."""
    is_multimodal: bool
    """Takes image / video inputs (`embed(ids, pixel_values, ...)`, 3-D positions, routing by modality)."""
    supports_mtp: bool
    """Can carry multi-token-prediction layers (`model.model.num_mtp_layers`, `mtp_forward`)."""
    supports_quantized_checkpoints: bool
    """Reads packed weight-only checkpoints (config.json `quantization_config`, ernie45.quant)."""

    def keeps_fp32(self, param_name: str) -> bool:
        return param_name.endswith(self.fp32_param_suffixes)

    def text_config(self, config: Any) -> Ernie45Config:
        """The language model's config (the VL config nests it under `text`)."""
        return config.text if self.is_multimodal else config


@functools.cache
def _specs() -> tuple[ModelSpec, ...]:
    from ..checkpoint.hf_layout import TextLayout
    from ..checkpoint.hf_layout_vl import VLLayout

    return (
        ModelSpec(
            family="text",
            model_types=SUPPORTED_MODEL_TYPES,
            config_class=Ernie45Config,
            model_class=Ernie45ForCausalLM,
            layout=TextLayout(),
            fp32_param_suffixes=(".mlp.gate.weight", ".e_score_correction_bias"),
            is_multimodal=False,
            supports_mtp=True,
            supports_quantized_checkpoints=True,
        ),
        ModelSpec(
            family="vl",
            model_types=VL_MODEL_TYPES,
            config_class=Ernie45VLConfig,
            model_class=Ernie45VLForConditionalGeneration,
            layout=VLLayout(),
            fp32_param_suffixes=("_moe.gate.weight", ".e_score_correction_bias"),
            is_multimodal=True,
            supports_mtp=False,
            supports_quantized_checkpoints=False,
        ),
    )


MODEL_TYPES = SUPPORTED_MODEL_TYPES + VL_MODEL_TYPES
"""Every model_type a spec covers."""


def spec_for(key: str | Any | None) -> ModelSpec:
    """The spec of a model_type, a config object or a model; ValueError naming the known model types otherwise."""
    if isinstance(key, torch.nn.Module):
        key = getattr(key, "config", None)
        if key is None:
            raise ValueError("spec_for: the module has no `config`; pass an ERNIE 4.5 model, config or model_type")
    model_type = key if isinstance(key, str) or key is None else getattr(key, "model_type", None)
    for spec in _specs():
        if model_type in spec.model_types:
            return spec
    known = ", ".join(MODEL_TYPES)
    if model_type is None:
        raise ValueError(f"no 'model_type'; supported: {known}")
    if model_type in _UNREAD_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is {_UNREAD_MODEL_TYPES[model_type]}")
    raise ValueError(f"model_type {model_type!r} is not supported; supported: {known}")
