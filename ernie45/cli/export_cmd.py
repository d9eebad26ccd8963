"""`ernie45 export`: a model (optionally with a LoRA adapter merged) written as a full HF checkpoint, in the legacy
Paddle layout, or as a llama.cpp GGUF file.

    ernie45 export MODEL --format paddle --output OUT_DIR
    ernie45 export MODEL --format gguf [--outtype f32|f16|bf16|q8_0|q4_0] --output OUT.gguf
    ernie45 export --merge-lora ADAPTER_DIR --output OUT [--base MODEL] [--format hf|paddle|gguf]
    ernie45 export run_export.yaml [key=value ...]     # ERNIEKit style: output_dir's adapter -> output_dir/export
"""

from __future__ import annotations

import argparse
from pathlib import Path

FORMATS = ("hf", "paddle", "gguf")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None,
                   help="model directory / hub id, or an ERNIEKit-style export YAML (model_name_or_path, output_dir)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the YAML (e.g. lora=True)")
    p.add_argument("--merge-lora", default=None, metavar="ADAPTER_DIR",
                   help="LoRA adapter to merge: PEFT (adapter_config.json) or ERNIEKit (lora_config.json)")
    p.add_argument("--output", default=None, help="output directory (hf, paddle) or .gguf file")
    p.add_argument("--base", default=None, help="base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--format", default="hf", choices=FORMATS,
                   help="hf: transformers layout; paddle: legacy Paddle layout; gguf: llama.cpp file")
    p.add_argument("--outtype", default="f16", choices=("f32", "f16", "bf16", "q8_0", "q4_0"),
                   help="GGUF tensor type (default f16; router, norms and biases stay f32)")


def _is_yaml(path: str) -> bool:
    return Path(path).suffix in (".yaml", ".yml") and Path(path).is_file()


def run(args: argparse.Namespace) -> int:
    from ..training.export import export_from_config, merge_adapter

    if args.config is not None and _is_yaml(args.config):
        if args.merge_lora:
            raise ValueError("export: give either a config file or --merge-lora, not both")
        out = export_from_config(args.config, args.overrides)
        print(f"merged checkpoint written to {out}")
        return 0
    if not args.output:
        raise ValueError("export: --output is required")
    if args.merge_lora:
        if args.config is not None:
            raise ValueError("export: with --merge-lora give the base model as --base, not as a positional argument")
        from ..checkpoint.erniekit_lora import is_erniekit_adapter

        if args.format == "hf" and not is_erniekit_adapter(args.merge_lora):
            out = merge_adapter(args.merge_lora, args.output, args.base, args.dtype)
            print(f"merged checkpoint written to {out}")
            return 0
        model = _merged_model(args.merge_lora, args.base, args.dtype)
    else:
        if args.config is None:
            raise ValueError("export: needs a model (MODEL --format ...), a config file, or --merge-lora ADAPTER_DIR")
        from ..checkpoint import load_model

        model = load_model(args.config, dtype=args.dtype)
    out = write(model, args.output, args.format, args.outtype)
    print(f"{args.format} export written to {out}")
    return 0


def _merged_model(adapter_dir: str, base: str | None, dtype: str):
    """Base + adapter folded in: a PEFT adapter (adapter_config.json) or an ERNIEKit one (lora_config.json)."""
    import json

    from ..checkpoint import load_model
    from ..checkpoint.erniekit_lora import LORA_CONFIG, is_erniekit_adapter, load_erniekit_adapter
    from ..training.lora import ADAPTER_CONFIG, load_adapter, merge_lora

    erniekit = is_erniekit_adapter(adapter_dir)
    cfg_path = Path(adapter_dir) / (LORA_CONFIG if erniekit else ADAPTER_CONFIG)
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{adapter_dir}: no {ADAPTER_CONFIG} (PEFT) or {LORA_CONFIG} (ERNIEKit); pass the "
                                f"directory of a LoRA adapter")
    base = base or json.loads(cfg_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{cfg_path}: no base_model_name_or_path; pass the base model with --base")
    model = load_model(base, dtype=dtype)
    (load_erniekit_adapter if erniekit else load_adapter)(model, adapter_dir)
    merge_lora(model)
    return model


def write(model, output: str, fmt: str, outtype: str) -> Path:
    """`model` written to `output` in format `fmt` (hf, paddle, gguf)."""
    if fmt == "hf":
        from ..checkpoint import save_model

        return save_model(model, output)
    if fmt == "paddle":
        from ..checkpoint.paddle_saver import save_paddle

        return save_paddle(model, output)
    from ..checkpoint.gguf_export import export_gguf

    return export_gguf(model, output, outtype)
