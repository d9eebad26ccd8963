"""`ernie45 convert SRC DST --to paddle|hf`: a text checkpoint between the transformers (-PT) layout and the legacy
Paddle one (`checkpoint.paddle_layout`); the source layout is detected, tokenizer and generation config go along.
A Paddle `.pdparams` source is first rewritten as safetensors next to DST (`checkpoint.pdparams`), then read.

    ernie45 convert ERNIE-4.5-0.3B-Paddle out-pt --to hf
    ernie45 convert ERNIE-4.5-0.3B-PT out-paddle --to paddle
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="checkpoint directory or hub id (either layout)")
    p.add_argument("dst", help="output directory (replaced atomically)")
    p.add_argument("--to", required=True, choices=["paddle", "hf"], help="layout to write")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weight dtype written (auto: the source's)")


def run(args: argparse.Namespace) -> int:
    import shutil
    import tempfile
    from pathlib import Path

    from ..checkpoint import load_model, resolve_model_path, save_model
    from ..checkpoint.paddle_saver import save_paddle
    from ..checkpoint.pdparams import pdparams_files, pdparams_to_safetensors

    src = resolve_model_path(args.src)
    staging = None
    if not any(src.glob("*.safetensors")) and pdparams_files(src):
        Path(args.dst).parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{Path(args.dst).name}.pdparams-", dir=Path(args.dst).parent))
        src = pdparams_to_safetensors(src, staging / "safetensors")
    try:
        model = load_model(src, dtype=args.dtype)
        out = save_paddle(model, args.dst) if args.to == "paddle" else save_model(model, args.dst)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    print(f"{args.to} checkpoint written to {out}")
    return 0
