"""`ernie45 export --merge-lora ADAPTER_DIR --output OUT [--base MODEL]`: a full checkpoint from base + LoRA."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--merge-lora", required=True, metavar="ADAPTER_DIR", help="PEFT adapter directory to merge")
    p.add_argument("--output", required=True, help="directory of the merged HF checkpoint")
    p.add_argument("--base", default=None, help="base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])


def run(args: argparse.Namespace) -> int:
    from ..training.export import merge_adapter

    out = merge_adapter(args.merge_lora, args.output, args.base, args.dtype)
    print(f"merged checkpoint written to {out}")
    return 0
