"""`ernie45 convert SRC DST --to paddle|hf`: a text checkpoint between the transformers (-PT) layout and the legacy
Paddle one (`checkpoint.paddle_layout`); the source layout is detected, tokenizer and generation config go along.

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
    from ..checkpoint import load_model, save_model
    from ..checkpoint.paddle_saver import save_paddle

    model = load_model(args.src, dtype=args.dtype)
    out = save_paddle(model, args.dst) if args.to == "paddle" else save_model(model, args.dst)
    print(f"{args.to} checkpoint written to {out}")
    return 0
