"""A fresh (randomly initialised) checkpoint to pretrain from: `model_name_or_path` of a PT run from scratch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..checkpoint import build_empty_model, save_model
from ..models.config import Ernie45Config
from ..tokenizer import load_tokenizer


def init_checkpoint(config: dict[str, Any] | Ernie45Config, tokenizer_dir: str | Path, out_dir: str | Path,
                    seed: int = 0, num_mtp_layers: int = 0) -> Path:
    """Write config.json + random weights (normal(0, initializer_range), norms 1) + the tokenizer's files.

    `config` is a config.json dict (model_type ernie4_5 / ernie4_5_moe) or an `Ernie45Config`; vocab_size must
    cover the tokenizer. `num_mtp_layers` > 0 adds the MTP block (and sets num_nextn_predict_layers)."""
    tokenizer = load_tokenizer(tokenizer_dir)
    cfg = config if isinstance(config, Ernie45Config) else Ernie45Config.from_dict(config, source="init_checkpoint")
    if cfg.vocab_size < len(tokenizer):
        raise ValueError(f"init_checkpoint: vocab_size {cfg.vocab_size} is smaller than the tokenizer ({len(tokenizer)})")
    if num_mtp_layers:
        cfg.num_nextn_predict_layers = num_mtp_layers
    model = build_empty_model(cfg, torch.float32, num_mtp_layers=num_mtp_layers)
    model.init_weights(torch.Generator().manual_seed(seed))
    return save_model(model, out_dir, tokenizer=tokenizer)
