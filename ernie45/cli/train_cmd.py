"""`ernie45 train CONFIG.yaml [key=value ...]`: PT / SFT / DPO (Full or LoRA) or VL-SFT from an ERNIEKit-style YAML
config. Launch with torchrun for several processes; the command is the same (VL-SFT replicates the model with DDP,
the text stages shard it with FSDP2 when `fsdp` is set)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config with ERNIEKit keys (stage, model_name_or_path, train_dataset_path, ...)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of config keys")


def run(args: argparse.Namespace) -> int:
    from ..training import load_config, train
    from ..training.host_memory import retain_freed_memory

    cfg = load_config(args.config, args.overrides)
    retain_freed_memory()  # this process only trains: keep its activation memory mapped between steps
    result = train(cfg)
    print(f"trained {result['steps']} steps; outputs in {cfg.output_dir}")
    return 0
