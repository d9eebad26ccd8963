"""Training throughput of ernie45's training step vs transformers' model in a plain PyTorch loop.

Same config, weights, batch, dtype and optimizer (AdamW) for both; random token batches (no data loading):

- ours: `ernie45.training` forward (`TrainingModel`) + loss (`Objective`) + backward + the trainer's AdamW
  (`build_optimizer`: the fused kernel), in a process set up as `ernie45 train` sets up its own
  (`training.host_memory.retain_freed_memory`: freed activation memory stays mapped between steps);
- transformers: `Ernie4_5(_Moe)ForCausalLM(input_ids, labels=input_ids).loss` + backward + `torch.optim.AdamW`
  with its defaults (the per-tensor loop on the CPU), in a plain Python process, as a plain PyTorch loop would.
  `--hf-retain-memory` gives it ours' malloc policy too: the control that separates that policy from the code.
  Ours' fp32 GEMMs run on OpenBLAS where `ERNIE45_BLAS=auto` picks it (AMD CPUs; kernels/blas.py);
  `--ours-blas torch` keeps them on torch's matmul: the control that separates the GEMM library from the rest.

Each side runs in its own process (the malloc policy is per process), `--rounds` times, the order alternating;
every process runs `--warmup` untimed steps, then `--steps` timed ones. Reports tokens/s from the median step of
each side, the ratio of those medians (and per round), and MFU against a matmul peak measured here (fp32 or bf16
GEMM, best of a few runs before and after). Training FLOPs per token = 6 * (active non-embedding params + LM head)
+ 12 * layers * seq * attention width (PaLM's formula, no causal discount). Shapes: `0.3b` (ERNIE-4.5-0.3B),
`moe` (a small ERNIE MoE with shared experts), `tiny` (a smoke test). Prints a table and one JSON line.

    python benchmarks/bench_train.py [--shape 0.3b|moe|tiny ...] [--batch 4] [--seq 512] [--steps 3] [--warmup 2]
        [--rounds 2] [--dtype float32|bfloat16] [--threads N] [--prompt-frac 0.5] [--hf-retain-memory]
        [--ours-blas auto|openblas|torch]

`--prompt-frac F`: the first F of every row is prompt (no loss), as in SFT; both sides get the same labels
(transformers -100, ours the loss mask); ours then skips the LM head on those positions. MFU counts the full
head either way (the model FLOPs of the step as transformers runs it).

Quick check (seconds): python benchmarks/bench_train.py --shape tiny --batch 2 --seq 64 --steps 2 --warmup 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from ernie45.checkpoint import load_model
from ernie45.kernels import blas
from ernie45.training.config import config_from_dict
from ernie45.training.forward import TrainingModel
from ernie45.training.host_memory import retain_freed_memory
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
    """Best observed FLOP/s of an n x n x n GEMM in `dtype`: torch's matmul, or OpenBLAS's (kernels.blas) where ours
    uses it and it is faster (MFU is then against the fastest GEMM this machine has shown)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    products = [lambda: a @ b]
    if blas.mm(a, b) is not None:
        products.append(lambda: blas.mm(a, b))
    best = 0.0
    for product in products:
        product()
        for _ in range(3):
            reps, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds / 3:
                product()
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


def make_step(side: str, shape: str, args: argparse.Namespace, dtype: torch.dtype):
    """(one training step of `side`, its first loss under no_grad, the shape's FLOPs per token, MoE?)."""
    hf, ours, moe = build_models(shape, dtype)
    fpt = flops_per_token(ours, args.seq)
    ids = torch.randint(3, hf.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    prompt = max(1, int(args.prompt_frac * args.seq))  # SFT-like rows: no loss on the first `prompt` tokens
    if side == "hf":
        ours = None  # only transformers' copy stays in this process
        labels = ids.clone()
        labels[:, :prompt] = -100  # transformers shifts labels itself: label t is the target of position t - 1
        opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-5)  # a plain loop's default (per-tensor on the CPU)

        def step_hf():
            hf(input_ids=ids, labels=labels).loss.backward()
            opt_hf.step()
            opt_hf.zero_grad(set_to_none=True)

        with torch.no_grad():
            loss = float(hf(input_ids=ids, labels=labels).loss)
        return step_hf, loss, fpt, moe
    hf = None  # only ours' copy stays in this process
    batch = {"input_ids": ids, "positions": torch.arange(args.seq).expand_as(ids).contiguous(),
             "segment_ids": torch.zeros_like(ids), "loss_mask": torch.ones_like(ids, dtype=torch.bool)}
    batch["loss_mask"][:, :prompt] = False
    cfg = config_from_dict({"model_name_or_path": "bench", "train_dataset_path": "bench", "stage": "PT",
                            "train_dataset_type": "text", "multi_token_pred_lambda": 0.0, "learning_rate": 1e-5})
    objective = Objective(cfg, TrainingModel(ours), ours, n_micro=1)
    denom = counts(batch, cfg, 0)
    opt_ours = build_optimizer(ours, cfg)  # the trainer's: ERNIE's parameter groups, the fused AdamW kernel

    def step_ours():
        loss, _ = objective(batch, denom)
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    with torch.no_grad():
        loss = float(objective(batch, denom)[0])
    return step_ours, loss, fpt, moe


def worker(args: argparse.Namespace) -> None:
    """One side in this process, set up as its users run it: ours as `ernie45 train` does (`retain_freed_memory`),
    transformers as a plain script (glibc's default malloc policy, unless --hf-retain-memory). Prints one JSON line."""
    if args.worker == "ours" or args.hf_retain_memory:
        retain_freed_memory()
    os.environ["ERNIE45_BLAS"] = args.ours_blas  # read by ours' linear layers only
    step, loss, fpt, moe = make_step(args.worker, args.shape[0], args, DTYPES[args.dtype])
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"side": args.worker, "loss": loss, "flops_per_token": fpt, "moe": moe, "step_s": times,
                      "gemm": blas.describe() if args.worker == "ours" else "torch"}))


def run_worker(side: str, shape: str, argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--shape", shape, *argv]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def bench_shape(shape: str, args: argparse.Namespace, argv: list[str], peak: float) -> dict:
    """One shape: `--rounds` rounds, each one process per side (the order alternating: hf ours, ours hf, ...; this
    machine's speed drifts by +-20% over minutes); tokens/s from the median step of each side; the ratio per round
    from the two medians of that round."""
    runs: dict[str, list[dict]] = {"hf": [], "ours": []}
    for r in range(args.rounds):
        for side in (("hf", "ours") if r % 2 == 0 else ("ours", "hf")):
            runs[side].append(run_worker(side, shape, argv))
    steps = {side: [t for run in rs for t in run["step_s"]] for side, rs in runs.items()}
    per_round = [statistics.median(h["step_s"]) / statistics.median(o["step_s"]) for h, o in zip(runs["hf"], runs["ours"])]
    tokens = args.batch * args.seq
    fpt = runs["ours"][0]["flops_per_token"]
    med_hf, med_ours = statistics.median(steps["hf"]), statistics.median(steps["ours"])
    return {"shape": shape, "moe": runs["ours"][0]["moe"], "batch": args.batch, "seq": args.seq, "dtype": args.dtype,
            "prompt_frac": args.prompt_frac, "hf_retain_memory": args.hf_retain_memory,
            "ours_tokens_per_s": tokens / med_ours, "hf_tokens_per_s": tokens / med_hf, "speedup": med_hf / med_ours,
            "speedup_per_round": per_round, "ours_mfu": tokens / med_ours * fpt / peak,
            "hf_mfu": tokens / med_hf * fpt / peak, "flops_per_token": fpt,
            "loss_ours": runs["ours"][0]["loss"], "loss_hf": runs["hf"][0]["loss"], "ours_gemm": runs["ours"][0]["gemm"],
            "ours_step_s": steps["ours"], "hf_step_s": steps["hf"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", nargs="+", default=["0.3b", "moe"], choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per side per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per process first (steady state: the third)")
    ap.add_argument("--rounds", type=int, default=2, help="processes per side (order alternating)")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--prompt-frac", type=float, default=0.0,
                    help="fraction of each row that is prompt (no loss), as in SFT data; 0 = pretraining")
    ap.add_argument("--hf-retain-memory", action="store_true",
                    help="control: give transformers' process the malloc policy ours runs with")
    ap.add_argument("--ours-blas", default="auto", choices=blas.CHOICES,
                    help="ours' GEMM library (ERNIE45_BLAS); torch = the control without OpenBLAS")
    ap.add_argument("--worker", choices=["ours", "hf"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        worker(args)
        return
    argv = [f"--batch={args.batch}", f"--seq={args.seq}", f"--steps={args.steps}", f"--warmup={args.warmup}",
            f"--dtype={args.dtype}", f"--prompt-frac={args.prompt_frac}"]
    argv += [f"--threads={args.threads}"] if args.threads else []
    argv += ["--hf-retain-memory"] if args.hf_retain_memory else []
    argv += [f"--ours-blas={args.ours_blas}"]
    dtype = DTYPES[args.dtype]
    os.environ["ERNIE45_BLAS"] = args.ours_blas  # the peak counts OpenBLAS only where ours uses it
    # This VM's speed drifts: the peak is the best of a measurement before and one after the runs.
    peak_before = matmul_peak(dtype)
    results = [bench_shape(shape, args, argv, 1.0) for shape in args.shape]
    peak = max(peak_before, matmul_peak(dtype))
    for r in results:
        r["ours_mfu"], r["hf_mfu"] = r["ours_mfu"] / peak, r["hf_mfu"] / peak
    print(f"matmul peak ({args.dtype}, {torch.get_num_threads()} threads): {peak / 1e9:.1f} GFLOP/s")
    print(f"{'shape':6} {'ours tok/s':>11} {'hf tok/s':>10} {'ratio':>6} {'per round':>14} {'ours MFU':>9} "
          f"{'hf MFU':>8} {'loss ours/hf':>16}")
    for r in results:
        rounds = " ".join(f"{x:.2f}" for x in r["speedup_per_round"])
        print(f"{r['shape']:6} {r['ours_tokens_per_s']:11.1f} {r['hf_tokens_per_s']:10.1f} {r['speedup']:6.2f} "
              f"{rounds:>14} {r['ours_mfu']:9.1%} {r['hf_mfu']:8.1%} {r['loss_ours']:8.4f}/{r['loss_hf']:.4f}")
    print("ours' GEMMs: " + ", ".join(sorted({r["ours_gemm"] for r in results})))
    print("tok/s and ratio from the median step of each side over all rounds; per round: the ratio of that round's "
          "medians" + ("; transformers ran with ours' malloc policy (control)" if args.hf_retain_memory else ""))
    print("target: ours >= 1.2x transformers' tokens/s")
    print(json.dumps({"bench": "train", "peak_flops": peak, "threads": torch.get_num_threads(),
                      "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                      "results": results}))


if __name__ == "__main__":
    main()
