"""ernie45.kernels.gemv vs F.linear for decode-sized matmuls (1..16 rows), same weights, same run.

Decode reads every weight once per token, so the figure of merit is GB/s of weight bytes. Each (shape, dtype)
cycles through enough distinct weight copies that the working set (default >= 512 MB) cannot sit in cache,
as in a real model. x has the weight's dtype, as in a model's forward. Prints a table, then one JSON line.

    python benchmarks/bench_gemv.py [--threads 2] [--rounds 7] [--rows 1,8] [--dtypes float32,bfloat16]

Legend: M rows of x, N output features, K input features.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from ernie45.kernels import gemv

SHAPES_NK = ((3072, 1024), (1024, 3072), (103424, 1024))  # 0.3B's MLP up/gate, MLP down, tied LM head


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def seconds_per_call(fn, weights: list[torch.Tensor], rounds: int) -> list[float]:
    """Per-round mean seconds of `fn(w)` over every weight copy, after one warm-up pass."""
    for w in weights:
        fn(w)
    per_round = []
    for _ in range(rounds):
        start = time.perf_counter()
        for w in weights:
            fn(w)
        per_round.append((time.perf_counter() - start) / len(weights))
    return per_round


def bench_case(N: int, K: int, dtype: torch.dtype, rows: list[int], rounds: int, min_bytes: int) -> list[dict]:
    weight_bytes = N * K * torch.finfo(dtype).bits // 8
    copies = max(2, math.ceil(min_bytes / weight_bytes))
    weights = [torch.randn(N, K).to(dtype) for _ in range(copies)]
    results = []
    for M in rows:
        x_MK = torch.randn(M, K).to(dtype)
        # Sanity check against fp32 F.linear, relative to the output's magnitude (bf16 outputs round at ~2^-9).
        ref = F.linear(x_MK.float(), weights[0].float())
        error = ((gemv.gemv(x_MK, weights[0]).float() - ref).abs().max() / ref.abs().max()).item()
        ours, torch_s = [], []
        # Interleave the two so both see the same machine state (other load, frequency, page cache).
        for _ in range(rounds):
            ours += seconds_per_call(functools.partial(gemv.gemv, x_MK), weights, 1)
            torch_s += seconds_per_call(functools.partial(F.linear, x_MK), weights, 1)
        ours_s, torch_med = statistics.median(ours), statistics.median(torch_s)
        results.append({
            "N": N, "K": K, "dtype": str(dtype).removeprefix("torch."), "M": M, "copies": copies,
            "working_set_mb": round(copies * weight_bytes / 1e6),
            "ours_ms": ours_s * 1e3, "torch_ms": torch_med * 1e3,
            "ours_gbps": weight_bytes / ours_s / 1e9, "torch_gbps": weight_bytes / torch_med / 1e9,
            "speedup": torch_med / ours_s, "max_rel_err": error,
        })  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7, help="timed passes over all weight copies per case")
    parser.add_argument("--rows", default="1,8", help="comma-separated M values (1..16)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--min-working-set-mb", type=int, default=512)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if not gemv.available():
        raise SystemExit("gemv kernel unavailable (see the warning above); nothing to benchmark")
    rows = [int(m) for m in args.rows.split(",")]
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]

    results = []
    header = f"{'N x K':>14} {'dtype':>8} {'M':>3} {'ours ms':>8} {'F.linear ms':>11} {'ours GB/s':>9} " \
             f"{'F.lin GB/s':>10} {'speedup':>7}"  # fmt: skip
    print(header)
    with torch.inference_mode():
        for N, K in SHAPES_NK:
            for dtype in dtypes:
                for r in bench_case(N, K, dtype, rows, args.rounds, args.min_working_set_mb * 10**6):
                    results.append(r)
                    print(
                        f"{N:>7}x{K:<6} {r['dtype']:>8} {r['M']:>3} {r['ours_ms']:>8.3f} {r['torch_ms']:>11.3f} "
                        f"{r['ours_gbps']:>9.1f} {r['torch_gbps']:>10.1f} {r['speedup']:>6.2f}x",
                        flush=True,
                    )

    print(json.dumps({
        "benchmark": "gemv", "cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__,
        "rounds": args.rounds, "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", "0"), "results": results,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
