"""Decode speed and weight memory of weight-only quantization on the ERNIE-4.5-0.3B shape (random weights).

One process, same run: fp32 (the repo's GEMV kernel path), bf16, int8 (symmetric per channel), int4 (group 128)
and 2-bit (group 64), each quantized with RTN (the runtime format, and so the speed, is the same for every
method). Decode = one token per sequence through the model with a static KV cache after a short prefill, at
batch 1 and batch 16. By default lm_head is quantized too (it is 106M of the 0.36B parameters: kept in fp32 it
alone would cap int4 at ~2.6x); --keep-lm-head leaves it as checkpoints do by default.

Reports tokens/s, speed-up over fp32, weight bytes read per decode step and the achieved GB/s, resident bytes of
all parameters, and the quantized linears' bytes against bits * params / 8 + fp16 scales ("vs ideal"; the excess
is the uint8 zero points of asymmetric formats: 0.8% at int4 g128, 5.6% at 2-bit g64).
"x fp32" divides the variant's median tokens/s over all rounds by fp32's; "x/round" is the median over rounds of
the same ratio taken within each round (both sides measured seconds apart, so drifting memory bandwidth, which
moves fp32 by +-15% between runs on a shared VM, cancels out).
Targets (issue 6): int8 >= 2.5x and int4 >= 4x fp32 at batch 1; weight memory within 10% of the ideal.
Run on an idle machine: timings taken while other work runs are meaningless.

    python benchmarks/bench_quant.py                       # the full 0.3B shape
    python benchmarks/bench_quant.py --layers 2 --vocab 4096 --steps 4   # a quick check that it runs
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import statistics
import time

import torch

from ernie45.checkpoint import build_empty_model
from ernie45.generation.static_cache import StaticKVCache
from ernie45.models import Ernie45Config
from ernie45.quant import QuantizedLinear, build_config, quantize_model


def config_for(args) -> Ernie45Config:
    return Ernie45Config.from_dict(
        {
            "model_type": "ernie4_5",
            "hidden_size": 1024,
            "num_hidden_layers": args.layers,
            "intermediate_size": 3072,
            "num_attention_heads": 16,
            "num_key_value_heads": 2,
            "head_dim": 128,
            "vocab_size": args.vocab,
            "tie_word_embeddings": True,
            "initializer_range": 0.02,
        }
    )


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def bytes_read_per_step(model) -> int:
    """Weights every decode step streams: all linear weights (+ scales/zeros); embeddings only gather rows."""
    tensors = []
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            tensors += [t for t in (module.qweight, module.scales, module.qzeros, module.bias) if t is not None]
        elif isinstance(module, torch.nn.Linear):
            tensors += [t for t in (module.weight, module.bias) if t is not None]
    return unique_bytes(tensors)


def quantized_linear_bytes(model) -> tuple[int, int]:
    """(actual bytes of the quantized linears, ideal: bits * params / 8 + one fp16 scale per group). Asymmetric
    formats also store a uint8 zero point per group: that is the difference."""
    actual = ideal = 0
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            actual += unique_bytes([t for t in (module.qweight, module.scales, module.qzeros) if t is not None])
            params = (
                module.out_features * module.in_features * (module.qweight.shape[0] if module.qweight.dim() == 3 else 1)
            )
            groups = params // module.group_size
            ideal += params * module.spec.bits // 8 + groups * 2
    return actual, ideal


@torch.inference_mode()
def decode_step_seconds(model, batch: int, steps: int, prompt_len: int = 8) -> list[float]:
    cache = StaticKVCache(model.config, batch, prompt_len + steps + 2, model.dtype)
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt_len))
    hidden = model.forward_hidden(ids, torch.arange(prompt_len), cache)
    cache.advance()
    next_ids = model.compute_logits(hidden[:, -1]).argmax(-1)
    # One warm-up step (first-call allocations, kernel build), then the timed steps.
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        hidden = model.forward_hidden(next_ids[:, None], torch.tensor([cache.length]), cache)
        cache.advance()
        next_ids = model.compute_logits(hidden[:, -1]).argmax(-1)
        if step:
            times.append(time.perf_counter() - start)
    return times


def build_variants(base, names: list[str], keep_lm_head: bool) -> dict:
    """name -> model, all resident at once (about 4.5 GB at the 0.3B shape) so that rounds can interleave them."""
    models = {}
    for name in names:
        if name == "fp32":
            models[name] = base
            continue
        model = copy.deepcopy(base)
        if name == "bf16":
            model = model.to(torch.bfloat16)
        model.tie_weights()
        if name in BITS:
            config = build_config(model, bits=BITS[name], method="rtn", quantize_lm_head=not keep_lm_head)
            model = quantize_model(model, config)
        models[name] = model
        gc.collect()
    return models


BITS = {"int8": 8, "int4": 4, "2-bit": 2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--vocab", type=int, default=103424)
    parser.add_argument("--steps", type=int, default=8, help="timed decode steps per case and round")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds over all variants, interleaved so that drifting load hits each alike (median reported)",
    )
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--variants", default="fp32,bf16,int8,int4,2-bit")
    parser.add_argument("--keep-lm-head", action="store_true", help="leave lm_head in the model dtype")
    args = parser.parse_args()
    unknown = [name for name in args.variants.split(",") if name not in ("fp32", "bf16", *BITS)]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}: choose from fp32, bf16, {', '.join(BITS)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = build_empty_model(config_for(args), torch.float32)
    base.init_weights(torch.Generator().manual_seed(0))
    batches = [int(b) for b in args.batches.split(",")]

    models = build_variants(base, args.variants.split(","), args.keep_lm_head)
    step_times = {(name, b): [] for name in models for b in batches}
    # Per round, each variant's median step time: a variant's ratio to fp32 within one round compares steps taken
    # seconds apart, which the VM's drifting memory bandwidth (fp32 moved +-15% between runs) cannot skew.
    round_medians = {(name, b): [] for name in models for b in batches}
    for round_index in range(args.rounds):
        for name, model in models.items():
            for batch in batches:
                times = decode_step_seconds(model, batch, args.steps)
                step_times[name, batch] += times
                round_medians[name, batch].append(statistics.median(times))
        print(f"  round {round_index + 1}/{args.rounds} done", flush=True)
    rows = []
    for name, model in models.items():
        row = {
            "variant": name,
            "resident_bytes": unique_bytes(model.parameters()),
            "read_bytes": bytes_read_per_step(model),
        }
        actual, ideal = quantized_linear_bytes(model)
        if ideal:
            row.update(quant_bytes=actual, ideal_bytes=ideal, vs_ideal=actual / ideal)
        for batch in batches:
            tps = batch / statistics.median(step_times[name, batch])
            row[f"tok_s_b{batch}"] = tps
            row[f"gb_s_b{batch}"] = row["read_bytes"] * tps / batch / 1e9
        rows.append(row)

    fp32 = next((r for r in rows if r["variant"] == "fp32"), None)
    if fp32:
        for r in rows:
            for b in batches:
                per_round = [f / v for f, v in zip(round_medians["fp32", b], round_medians[r["variant"], b])]
                r[f"x_fp32_per_round_b{b}"] = statistics.median(per_round)
    header = f"{'variant':8} {'resident MB':>11} {'read/step MB':>12} {'vs ideal':>8}"
    for b in batches:
        header += f" {'tok/s b' + str(b):>11} {'x fp32':>7} {'x/round':>7} {'GB/s':>6}"
    print(
        f"\n{cpu_name()}, {args.threads} threads, torch {torch.__version__}, {args.layers} layers, vocab {args.vocab}"
        f", lm_head {'kept' if args.keep_lm_head else 'quantized'}"
    )
    print(header)
    for r in rows:
        line = f"{r['variant']:8} {r['resident_bytes'] / 1e6:11.1f} {r['read_bytes'] / 1e6:12.1f} "
        line += f"{r['vs_ideal']:8.3f}" if "vs_ideal" in r else f"{'':8}"
        for b in batches:
            ratio = r[f"tok_s_b{b}"] / fp32[f"tok_s_b{b}"] if fp32 else float("nan")
            r[f"x_fp32_b{b}"] = ratio
            per_round = r.get(f"x_fp32_per_round_b{b}", float("nan"))
            line += f" {r[f'tok_s_b{b}']:11.1f} {ratio:7.2f} {per_round:7.2f} {r[f'gb_s_b{b}']:6.1f}"
        print(line)
    print(
        json.dumps(
            {
                "bench": "quant",
                "cpu": cpu_name(),
                "threads": args.threads,
                "layers": args.layers,
                "vocab": args.vocab,
                "lm_head_quantized": not args.keep_lm_head,
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
