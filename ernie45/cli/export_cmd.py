"""`ernie45 export`: a full checkpoint from base + LoRA adapter.

    ernie45 export --merge-lora ADAPTER_DIR --output OUT [--base MODEL]
    ernie45 export run_export.yaml [key=value ...]     # ERNIEKit style: output_dir's adapter -> output_dir/export
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None, help="ERNIEKit-style export YAML (model_name_or_path, output_dir)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the YAML (e.g. lora=True)")
    p.add_argument("--merge-lora", default=None, metavar="ADAPTER_DIR", help="PEFT adapter directory to merge")
    p.add_argument("--output", default=None, help="directory of the merged HF checkpoint (with --merge-lora)")
    p.add_argument("--base", default=None, help="base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])


def run(args: argparse.Namespace) -> int:
    from ..training.export import export_from_config, merge_adapter

    if args.config is not None:
        if args.merge_lora:
            raise ValueError("export: give either a config file or --merge-lora, not both")
        out = export_from_config(args.config, args.overrides)
    else:
        if not args.merge_lora or not args.output:
            raise ValueError("export: needs a config file, or --merge-lora ADAPTER_DIR --output OUT")
        out = merge_adapter(args.merge_lora, args.output, args.base, args.dtype)
    print(f"merged checkpoint written to {out}")
    return 0
