"""`ernie45 quantize`: a checkpoint directory -> a packed weight-only quantized checkpoint directory."""

from __future__ import annotations

import argparse
import time

import torch

from ..default_model import resolve_model_argument
from ..quant.config import METHODS, RECIPES
from ..quant.quantize import DEFAULT_CALIB_SEQ_LEN, DEFAULT_NUM_CALIB_SAMPLES, quantize


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model", nargs="?", default=None, help="checkpoint directory or hub id (default: the embedded default model)"
    )
    p.add_argument("--bits", type=int, required=True, help="8, 4 or 2 (the default for modules no recipe names)")
    p.add_argument(
        "--method",
        default="rtn",
        choices=METHODS,
        help="rtn: round to nearest; gptq: Hessian-corrected (needs --calib); hqq: optimised grids "
        "(data-free, uses --calib if given); gptq-hqq: GPTQ over HQQ grids; gptq-refit: GPTQ, then "
        "each row's group scales/zeros re-solved by least squares on the layer outputs (the 2-bit method)",
    )
    p.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="weights per scale along the input dim, -1 per channel (default: 8-bit -1, 4-bit 128, 2-bit 64)",
    )
    p.add_argument(
        "--symmetric",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="symmetric codes without zero points (default: on for 8-bit, off for 4/2-bit)",
    )
    p.add_argument(
        "--calib", default=None, help="calibration text: .jsonl (text / messages / prompt+response) or plain text"
    )
    p.add_argument(
        "--num-calib-samples",
        type=int,
        default=DEFAULT_NUM_CALIB_SAMPLES,
        help="calibration sequences of --calib-seq-len tokens",
    )
    p.add_argument("--calib-seq-len", type=int, default=DEFAULT_CALIB_SEQ_LEN)
    p.add_argument(
        "--recipe",
        default=None,
        choices=RECIPES,
        help="mixed-2bit: experts 2-bit, first MoE layers' experts 4-bit, attention/dense/shared 8-bit",
    )
    p.add_argument("--no-act-order", dest="act_order", action="store_false", help="GPTQ: visit columns in order")
    p.add_argument("--quantize-lm-head", action="store_true", help="also quantize the output head (kept by default)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", required=True, help="output checkpoint directory")


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = quantize(
        resolve_model_argument(args.model), args.out, bits=args.bits, method=args.method, group_size=args.group_size,
        calib=args.calib, num_calib_samples=args.num_calib_samples, calib_seq_len=args.calib_seq_len,
        recipe=args.recipe, symmetric=args.symmetric, act_order=args.act_order, quantize_lm_head=args.quantize_lm_head,
    )  # fmt: skip
    modules = model.config.extra["quantization_config"]["modules"]
    by_bits: dict[int, int] = {}
    for spec in modules.values():
        by_bits[spec["bits"]] = by_bits.get(spec["bits"], 0) + 1
    summary = ", ".join(f"{n} at {b}-bit" for b, n in sorted(by_bits.items(), reverse=True))
    seconds = time.perf_counter() - start
    print(f"quantized {len(modules)} modules ({summary}) with {args.method} in {seconds:.1f} s -> {args.out}")
    return 0
