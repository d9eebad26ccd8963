"""Load an ERNIE 4.5 VL checkpoint (released or transformers' in-memory layout): build on the meta device, then copy
each safetensors tensor straight into its parameter slot."""

from __future__ import annotations

from pathlib import Path

import torch

from ..models.ernie45_vl import Ernie45VLForConditionalGeneration
from ..models.layers import MRotaryEmbedding
from ..models.vision import VisionTransformer
from ..models.vl_config import Ernie45VLConfig
from .hf_layout_vl import targets_of
from .loader import _read_generation_config, fill_weights, list_weight_files, parse_dtype

# Router weights and correction biases stay fp32 whatever the model dtype (as released and in transformers).
FP32_PARAM_SUFFIXES = ("_moe.gate.weight", ".e_score_correction_bias")


def build_empty_vl_model(
    config: Ernie45VLConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Ernie45VLForConditionalGeneration:
    """The VL model with uninitialised weights in `dtype` (router params fp32) on `device`, built via meta."""
    with torch.device("meta"):
        model = Ernie45VLForConditionalGeneration(config)
    for name, p in model.named_parameters():
        p.data = p.data.to(torch.float32 if name.endswith(FP32_PARAM_SUFFIXES) else dtype)
    model.to_empty(device=device)
    model.tie_weights()
    # Non-persistent buffers are not in checkpoints: recompute them on the real device.
    text = config.text
    model.model.language_model.rotary_emb = MRotaryEmbedding(text.head_dim, text.rope_theta, config.mrope_section).to(
        device
    )
    model.model.vision_tower.inv_freq = VisionTransformer.compute_inv_freq(config.vision).to(device)
    return model


def load_vl_model(directory: Path, dtype: str | torch.dtype | None = "auto", device: str | torch.device = "cpu"):
    config = Ernie45VLConfig.from_file(directory)
    net = build_empty_vl_model(config, parse_dtype(dtype, config.extra), device)
    experts = config.text.moe_num_experts

    def skip(target, params) -> bool:
        return target.name == "lm_head.weight" and config.tie_word_embeddings

    fill_weights(net, directory, list_weight_files(directory), lambda name: targets_of(name, experts), skip)
    net.eval()
    net.source_dir = directory
    net.generation_config = _read_generation_config(directory)
    return net
