"""Training throughput of ernie45's training step vs transformers' model in a plain PyTorch loop, same run.

Same config, weights, batch, dtype and optimizer (AdamW) for both; random token batches (no data loading):

- ours: `ernie45.training` forward (`TrainingModel`) + loss (`Objective`) + backward + the trainer's AdamW
  (`build_optimizer`: the fused kernel);
- transformers: `Ernie4_5(_Moe)ForCausalLM(input_ids, labels=input_ids).loss` + backward + `torch.optim.AdamW`
  with its defaults (the per-tensor loop on the CPU), as a plain PyTorch loop would.

Steps are timed in adjacent pairs (one of each side, order alternating); reports tokens/s from the median step,
the ratio as the median over pairs, and MFU against a matmul peak measured here (fp32 or bf16 GEMM, best of a few runs).
Training FLOPs per token = 6 * (active non-embedding params + LM head) + 12 * layers * seq * attention width
(PaLM's formula, no causal discount). Shapes: `0.3b` (ERNIE-4.5-0.3B), `moe` (a small ERNIE MoE with shared
experts), `tiny` (a smoke test). Prints a table and one JSON line.

    python benchmarks/bench_train.py [--shape 0.3b|moe|tiny ...] [--batch 4] [--seq 512] [--steps 5] [--warmup 2]
        [--dtype float32|bfloat16] [--threads N] [--prompt-frac 0.5]

`--prompt-frac F`: the first F of every row is prompt (no loss), as in SFT; both sides get the same labels
(transformers -100, ours the loss mask); ours then skips the LM head on those positions. MFU counts the full
head either way (the model FLOPs of the step as transformers runs it).

Quick check (seconds): python benchmarks/bench_train.py --shape tiny --batch 2 --seq 64 --steps 2 --warmup 1
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time

import torch

from ernie45.checkpoint import load_model
from ernie45.training.config import config_from_dict
from ernie45.training.forward import TrainingModel
from ernie45.training.objectives import Objective, counts
from ernie45.training.optim import build_optimizer

ROPE = {"rope_type": "default", "rope_theta": 500000.0}
SHAPES = {
    "0.3b": {"vocab_size": 103424, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 18,
                 "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 128, "tie_word_embeddings": True,
                 "rope_parameters": ROPE},
    "moe": {"vocab_size": 32000, "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 6, "num_attention_heads": 8,
                "num_key_value_heads": 2, "head_dim": 64, "tie_word_embeddings": True, "rope_parameters": ROPE,
                "moe_num_experts": 16, "moe_k": 2, "moe_intermediate_size": 256, "moe_num_shared_experts": 1,
                "moe_layer_start_index": 1, "moe_layer_end_index": -1, "moe_layer_interval": 1},
    "tiny": {"vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "head_dim": 16, "tie_word_embeddings": True, "rope_parameters": ROPE,
                 "moe_num_experts": 4, "moe_k": 2, "moe_intermediate_size": 32, "moe_num_shared_experts": 1,
                 "moe_layer_start_index": 1, "moe_layer_end_index": -1, "moe_layer_interval": 1},
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 1.0) -> float:
    """Best observed FLOP/s of an n x n x n GEMM in `dtype`."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(3):
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 3:
            a @ b
            reps += 1
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


def build_models(shape: str, dtype: torch.dtype):
    """transformers' model with random weights, and ours loaded from its saved checkpoint (identical weights)."""
    from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM, Ernie4_5Config, Ernie4_5ForCausalLM

    kwargs = SHAPES[shape]
    moe = "moe_num_experts" in kwargs
    torch.manual_seed(0)
    config = Ernie4_5_MoeConfig(**kwargs) if moe else Ernie4_5Config(**kwargs)
    hf = (Ernie4_5_MoeForCausalLM if moe else Ernie4_5ForCausalLM)(config).to(dtype)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = load_model(tmp, dtype="float32" if dtype == torch.float32 else "bfloat16")
    return hf.train(), ours.train(), moe


def flops_per_token(model, seq: int) -> float:
    cfg = model.config
    total = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    if cfg.tie_word_embeddings:
        total += cfg.vocab_size * cfg.hidden_size  # the LM head matmul still runs
    if cfg.has_moe_layers:
        per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
        moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
        total -= moe_layers * per_expert * (cfg.moe_num_experts - cfg.moe_k)
    attn_width = cfg.num_attention_heads * cfg.head_dim
    return 6 * total + 12 * cfg.num_hidden_layers * seq * attn_width


def timed(step) -> float:
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def paired_times(step_a, step_b, pairs: int, warmup: int) -> tuple[list[float], list[float]]:
    """Step times of a and b measured in adjacent pairs, the order alternating (ab, ba, ab, ...): this machine's
    speed drifts by +-20% over minutes, and a pair sees the same drift on both sides."""
    for _ in range(warmup):
        step_a()
        step_b()
    times_a, times_b = [], []
    for i in range(pairs):
        if i % 2 == 0:
            times_a.append(timed(step_a))
            times_b.append(timed(step_b))
        else:
            times_b.append(timed(step_b))
            times_a.append(timed(step_a))
    return times_a, times_b


def bench_shape(shape: str, args: argparse.Namespace, dtype: torch.dtype, peak: float) -> dict:
    """One shape: both training steps timed in adjacent pairs; tokens/s, MFU and the ratio."""
    hf, ours, moe = build_models(shape, dtype)
    ids = torch.randint(3, hf.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "positions": torch.arange(args.seq).expand_as(ids).contiguous(),
             "segment_ids": torch.zeros_like(ids), "loss_mask": torch.ones_like(ids, dtype=torch.bool)}
    prompt = max(1, int(args.prompt_frac * args.seq))  # SFT-like rows: no loss on the first `prompt` tokens
    batch["loss_mask"][:, :prompt] = False
    labels = ids.clone()
    labels[:, :prompt] = -100  # transformers shifts labels itself: label t is the target of position t - 1
    cfg = config_from_dict({"model_name_or_path": "bench", "train_dataset_path": "bench", "stage": "PT",
                            "train_dataset_type": "text", "multi_token_pred_lambda": 0.0, "learning_rate": 1e-5})
    module = TrainingModel(ours)
    objective = Objective(cfg, module, ours, n_micro=1)
    denom = counts(batch, cfg, 0)
    opt_ours = build_optimizer(ours, cfg)  # the trainer's: ERNIE's parameter groups, the fused AdamW kernel
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-5)  # a plain loop's default (per-tensor on the CPU)

    def step_ours():
        loss, _ = objective(batch, denom)
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_hf():
        hf(input_ids=ids, labels=labels).loss.backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)

    with torch.no_grad():  # same weights, same batch: the two losses agree before anything is timed
        loss_ours = float(objective(batch, denom)[0])
        loss_hf = float(hf(input_ids=ids, labels=labels).loss)
    t_hf, t_ours = paired_times(step_hf, step_ours, args.steps, args.warmup)
    tokens = args.batch * args.seq
    fpt = flops_per_token(ours, args.seq)
    med_hf, med_ours = statistics.median(t_hf), statistics.median(t_ours)
    row = {"shape": shape, "moe": moe, "batch": args.batch, "seq": args.seq, "dtype": args.dtype,
           "prompt_frac": args.prompt_frac,
           "ours_tokens_per_s": tokens / med_ours, "hf_tokens_per_s": tokens / med_hf,
           "speedup": statistics.median(h / o for h, o in zip(t_hf, t_ours)),
           "speedup_min": min(h / o for h, o in zip(t_hf, t_ours)), "speedup_max": max(h / o for h, o in zip(t_hf, t_ours)),
           "ours_mfu": tokens / med_ours * fpt / peak, "hf_mfu": tokens / med_hf * fpt / peak,
           "flops_per_token": fpt, "loss_ours": loss_ours, "loss_hf": loss_hf,
           "ours_step_s": t_ours, "hf_step_s": t_hf}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", nargs="+", default=["0.3b", "moe"], choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5, help="timed pairs of steps (one of each side per pair)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--prompt-frac", type=float, default=0.0,
                    help="fraction of each row that is prompt (no loss), as in SFT data; 0 = pretraining")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    peak = matmul_peak(dtype)
    results = [bench_shape(shape, args, dtype, peak) for shape in args.shape]
    print(f"matmul peak ({args.dtype}, {torch.get_num_threads()} threads): {peak / 1e9:.1f} GFLOP/s")
    print(f"{'shape':6} {'ours tok/s':>11} {'hf tok/s':>10} {'ratio':>6} {'range':>11} {'ours MFU':>9} {'hf MFU':>8} "
          f"{'loss ours/hf':>16}")
    for r in results:
        print(f"{r['shape']:6} {r['ours_tokens_per_s']:11.1f} {r['hf_tokens_per_s']:10.1f} {r['speedup']:6.2f} "
              f"{r['speedup_min']:5.2f}-{r['speedup_max']:<5.2f} {r['ours_mfu']:9.1%} {r['hf_mfu']:8.1%} "
              f"{r['loss_ours']:8.4f}/{r['loss_hf']:.4f}")
    print("tok/s from the median step time; ratio: median over pairs of adjacent steps (range: min-max over pairs)")
    print("target: ours >= 1.2x transformers' tokens/s")
    print(json.dumps({"bench": "train", "peak_flops": peak, "threads": torch.get_num_threads(),
                      "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                      "results": results}))


if __name__ == "__main__":
    main()
