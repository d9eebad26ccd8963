"""Merge a PEFT LoRA adapter into its base model and write a full HF checkpoint (`ernie45 export --merge-lora`)."""

from __future__ import annotations

import json
from pathlib import Path

from ..checkpoint import load_model, save_model
from ..tokenizer import load_tokenizer
from .lora import ADAPTER_CONFIG, load_adapter, merge_lora


def merge_adapter(adapter_dir: str | Path, output_dir: str | Path, base_model: str | Path | None = None,
                  dtype: str = "auto") -> Path:
    """Load the base (default: the adapter's base_model_name_or_path), apply the adapter, fold it into the weights
    and save to `output_dir` with the base's tokenizer (the adapter directory's when it has one)."""
    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{adapter_dir}: no {ADAPTER_CONFIG}; pass the directory of a LoRA adapter")
    base = base_model or json.loads(cfg_path.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{cfg_path}: no base_model_name_or_path; pass the base model explicitly")
    model = load_model(base, dtype=dtype)
    load_adapter(model, adapter_dir)
    merge_lora(model)
    tok_source = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else model.source_dir
    return save_model(model, output_dir, tokenizer=load_tokenizer(tok_source))
