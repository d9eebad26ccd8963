"""Giving a model MTP layers it was not released with, and training only them.

`num_nextn_predict_layers: N` in a training config grows a checkpoint with fewer MTP depths to N (the new depths
initialised as `init_weights` would: normal(0, initializer_range), norms at 1, biases at 0). `mtp_only: true` then
trains those layers alone: every base weight, the embedding, final norm and LM head the MTP head shares included,
stays fixed, so the model's own outputs do not change by a bit and the trained head is a pure draft model for
speculative decoding (engine/spec_decode/mtp_proposer.py).
"""

from __future__ import annotations

import torch
from torch import nn

_MTP_MARK = ".mtp_"


def is_mtp_parameter(name: str) -> bool:
    return _MTP_MARK in name


def mtp_depths(model: nn.Module) -> int:
    """How many MTP depths `model` carries; 0 for families without MTP layers (the VL model has none)."""
    return getattr(model.model, "num_mtp_layers", 0)


def add_mtp_layers(model: nn.Module, num_mtp_layers: int, seed: int = 0) -> list[str]:
    """Grow `model` (an Ernie45ForCausalLM) to `num_mtp_layers` MTP depths; returns the new parameters' names."""
    inner = model.model
    before = {name for name, _ in model.named_parameters()}
    inner.add_mtp_layers(num_mtp_layers)
    model.config.num_nextn_predict_layers = max(model.config.num_nextn_predict_layers or 0, num_mtp_layers)
    generator = torch.Generator().manual_seed(seed)
    std = model.config.initializer_range
    added = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in before:
                continue
            added.append(name)
            if name.endswith("norm.weight") or ".mtp_emb_norm." in name or ".mtp_hidden_norm." in name:
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std, generator=generator))
    return added


def freeze_all_but_mtp(model: nn.Module) -> int:
    """requires_grad only on the MTP layers; returns how many parameters train (0 means the model has none)."""
    num_trained = 0
    for name, p in model.named_parameters():
        p.requires_grad_(is_mtp_parameter(name))
        num_trained += p.numel() if p.requires_grad else 0
    return num_trained
