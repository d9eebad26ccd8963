"""Merge a PEFT LoRA adapter into its base model and write a full HF checkpoint: `ernie45 export --merge-lora DIR`,
or ERNIEKit-style `ernie45 export run_export.yaml [lora=True]` (the adapter in `output_dir` -> `output_dir/export`)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from ..checkpoint import load_model, save_model
from ..tokenizer import load_tokenizer
from .config import ConfigError, config_from_dict, parse_overrides
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


def export_from_config(path: str | Path, overrides: list[str] | None = None) -> Path:
    """ERNIEKit's export: the LoRA adapter of the run in `output_dir`, merged into `model_name_or_path`, written
    to `output_dir/export`. `lora` (True/False) may be given as in `erniekit export run_export.yaml lora=True`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: export config not found")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value")
    raw.update(parse_overrides(overrides or []))
    lora = raw.pop("lora", None)
    raw.setdefault("do_train", False)
    cfg = config_from_dict(raw, source=str(path))
    if lora is False or (lora is None and cfg.fine_tuning != "LoRA"):
        raise ConfigError(f"{path}: nothing to export: only LoRA runs need merging (set fine_tuning: LoRA or lora=True); "
                          f"the output_dir of a Full run already is an HF checkpoint")
    return merge_adapter(cfg.output_dir, Path(cfg.output_dir) / "export", cfg.model_name_or_path)
