"""Batched throughput and batch-1 decode: ernie45's engine (`LLM`) against vLLM's CPU backend, on the same random
checkpoints (dense ERNIE-4.5-0.3B shape, small MoE: 8 layers, 32 experts top-6 + 2 shared), each engine in its
own process, rounds alternating which goes first, medians and per-round ratios.

Protocol (both sides, vLLM's from ../shared/anchors/bench_vllm.py, run in its own venv): fp32, prefix caching off,
greedy, eos ignored, prompts random ids < 8000, fresh prompts every run.
- 32 concurrent: 32 requests x (128 prompt + 128 output) in one generate call; 1 warm-up + 2 timed; output tok/s.
- batch 1: a 32-token prompt, 128 tokens; 1 warm-up + 3 timed; decode tok/s between the first and last token.
ours also runs the model core's batch-1 decode (`stream_generate`, static KV cache, no scheduler).

Limits, measured in ours' process of each round (the VM's bandwidth drifts +-30% between minutes): the fp32 GEMM
rate (best of torch's matmul and, where enabled, OpenBLAS's on 1024 x 1024 x 4096) and the read bandwidth
(bench_model.measure_read_bandwidth). "% floor" = the run's matmul FLOPs (linears of every token, router, the
attention's QK^T and PV, the LM head on sampled rows) / (time x GEMM rate); "% roofline" = weight bytes a batch-1
decode step reads (the active experts only) x tok/s / bandwidth. "x/round" is the median of the ratios within a
round, which cancels most of the drift.

    python benchmarks/bench_vs_vllm.py --anchors /tmp/anchors --rounds 2 [--models dense,moe] [--lock FILE]

`--lock FILE` runs every worker under `flock FILE` (machines shared with other jobs); --worker is internal.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_vs_llama_cpp import cpu_description

REQUESTS, PROMPT, OUTPUT = 32, 128, 128
B1_PROMPT, B1_OUTPUT = 32, 128


# ---- arithmetic of a checkpoint (config.json only, so the driver needs no torch) ----


def shape_of(config: dict) -> dict:
    """Per-token parameter counts of a transformers-layout ERNIE 4.5 config (dense or MoE)."""
    H, L = config["hidden_size"], config["num_hidden_layers"]
    D = config.get("head_dim") or H // config["num_attention_heads"]
    NQ, NKV = config["num_attention_heads"] * D, config["num_key_value_heads"] * D
    attn = H * NQ + 2 * H * NKV + NQ * H
    dense_mlp = 3 * H * config["intermediate_size"]
    moe_layers = 0
    if config.get("moe_num_experts"):
        start, interval = config.get("moe_layer_start_index", 0), config.get("moe_layer_interval", 1)
        end = config.get("moe_layer_end_index", L - 1)
        end = L - 1 if end in (None, -1) else end
        moe_layers = sum(1 for i in range(L) if start <= i <= end and (i - start) % interval == 0)
    E, K, I = config.get("moe_num_experts", 0), config.get("moe_k", 0), config.get("moe_intermediate_size", 0)
    shared = 3 * H * I * config.get("moe_num_shared_experts", 0)
    moe_active = E * H + K * 3 * H * I + shared  # router + routed + shared
    body = L * attn + (L - moe_layers) * dense_mlp + moe_layers * moe_active
    return dict(H=H, L=L, NQ=NQ, body=body, head=config["vocab_size"] * H, E=E, moe_layers=moe_layers,
                all_experts=moe_layers * E * 3 * H * I)  # fmt: skip


def run_flops(s: dict) -> float:
    """Matmul FLOPs of the 32-concurrent run: every prompt and output token through the body, the LM head on the
    last prompt token and every decode row, attention 4 * context * NQ per token and layer."""
    tokens = REQUESTS * (PROMPT + OUTPUT - 1)
    linear = 2 * tokens * s["body"] + 2 * REQUESTS * OUTPUT * s["head"]
    context = REQUESTS * sum(range(1, PROMPT + OUTPUT))  # a token at position p attends p keys
    return linear + 4 * context * s["NQ"] * s["L"]


def b1_bytes(s: dict) -> int:
    """fp32 bytes of weights one batch-1 decode step reads: the body (active experts only) and the LM head."""
    return 4 * (s["body"] + s["head"])


# ---- ours' worker (this repo's venv) ----


def gemm_rate() -> dict:
    import torch

    from ernie45.kernels import blas

    a, b = torch.randn(1024, 1024), torch.randn(1024, 4096)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(5):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return 2 * 1024 * 1024 * 4096 / min(times) / 1e9

    rates = {"torch": best(lambda: a @ b)}
    if blas.enabled():
        rates["openblas"] = best(lambda: blas.mm(a, b))
    return rates


def ours_worker(checkpoint: str, threads: int, seed: int) -> dict:
    import numpy as np
    import torch

    from bench_model import measure_read_bandwidth

    from ernie45.engine import LLM, SamplingParams
    from ernie45.generation.generate import GenerationConfig, stream_generate
    from ernie45.kernels import blas, build

    torch.set_num_threads(threads)
    bandwidth, gemm = measure_read_bandwidth(), gemm_rate()
    t = time.perf_counter()
    llm = LLM(model=checkpoint, dtype="float32", max_num_seqs=REQUESTS, max_model_len=1024,
              enable_prefix_caching=False, seed=seed)
    startup = time.perf_counter() - t
    rng = np.random.RandomState(seed)

    def prompts(n: int, length: int) -> list[dict]:
        return [{"prompt_token_ids": rng.randint(100, 7900, size=length).tolist()} for _ in range(n)]

    def gen(ps, n_out):
        params = SamplingParams(temperature=0, max_tokens=n_out, ignore_eos=True)
        t = time.perf_counter()
        outs = llm.generate(ps, params, use_tqdm=False)
        if {len(o.outputs[0].token_ids) for o in outs} != {n_out}:
            raise RuntimeError("an output has the wrong length")
        return outs, time.perf_counter() - t

    gen(prompts(1, B1_PROMPT), B1_OUTPUT)  # warm-up
    b1 = []
    for _ in range(3):
        (out,), _ = gen(prompts(1, B1_PROMPT), B1_OUTPUT)
        b1.append((B1_OUTPUT - 1) / (out.metrics.finish_time - out.metrics.first_token_time))
    core = []
    for _ in range(3):
        ids = torch.tensor([prompts(1, B1_PROMPT)[0]["prompt_token_ids"]])
        with torch.inference_mode():
            stamps = [time.perf_counter() for _ in stream_generate(llm.model, ids,
                                                                   GenerationConfig(max_new_tokens=B1_OUTPUT))]
        core.append((B1_OUTPUT - 1) / (stamps[-1] - stamps[0]))
    gen(prompts(REQUESTS, PROMPT), OUTPUT)  # warm-up
    concurrent = [REQUESTS * OUTPUT / gen(prompts(REQUESTS, PROMPT), OUTPUT)[1] for _ in range(2)]
    return {"b1_tok_s": statistics.median(b1), "b1_runs": b1, "core_b1_tok_s": statistics.median(core),
            "core_b1_runs": core, "concurrent_tok_s": statistics.median(concurrent), "concurrent_runs": concurrent,
            "read_gb_s": bandwidth, "gemm_gflop_s": gemm, "startup_s": startup, "isa": build.active_target().name,
            "torch": torch.__version__, "blas": blas.describe()}  # fmt: skip


# ---- driver ----


def run_worker(cmd: list[str], lock: str | None, env: dict | None = None) -> str:
    if lock:
        cmd = ["flock", lock, *cmd]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return out.stdout


def run_ours(checkpoint: Path, args) -> dict:
    env = dict(os.environ)
    if args.openblas_coretype:
        env["OPENBLAS_CORETYPE"] = args.openblas_coretype
    out = run_worker([sys.executable, __file__, "--worker", "--target", str(checkpoint), "--threads",
                      str(args.threads), "--seed", str(args.seed)], args.lock, env)
    return json.loads(out.strip().splitlines()[-1])


def run_vllm(checkpoint: Path, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out_json = Path(tmp) / "vllm.json"
        cmd = [args.vllm_python, str(Path(args.anchors_script)), str(checkpoint), str(out_json), "--dtype", "float32",
               "--threads", str(args.threads), "--seed", str(args.seed)]
        run_worker(cmd, args.lock, env={**os.environ, "ANCHORS": args.anchors})
        r = json.loads(out_json.read_text())
    return {"b1_tok_s": r["batch1_decode"]["decode_tok_s_median"], "b1_runs": r["batch1_decode"]["decode_tok_s_runs"],
            "concurrent_tok_s": r["concurrent32"]["output_tok_s_median"],
            "concurrent_runs": r["concurrent32"]["output_tok_s_runs"], "vllm": r["vllm"], "torch": r["torch"],
            "isa_libs": r["isa_libs"], "startup_s": r["startup_s"]}  # fmt: skip


def span(rs: list[dict], key: str) -> str:
    values = [r[key] for r in rs]
    return f"{statistics.median(values):6.1f} ({min(values):.1f}-{max(values):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--anchors", default=os.environ.get("ANCHORS", "/tmp/anchors"))
    parser.add_argument("--anchors-script", default=str(Path(__file__).resolve().parents[2] / "shared" / "anchors"
                                                        / "bench_vllm.py"),
                        help="vLLM's timing script (default ../shared/anchors/bench_vllm.py beside the repo)")
    parser.add_argument("--vllm-python", help="default: ANCHORS/vllm-venv/bin/python")
    parser.add_argument("--models", default="dense,moe")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lock", help="run each worker under `flock LOCK`")
    parser.add_argument("--openblas-coretype", help="OPENBLAS_CORETYPE for ours' workers (default: inherited; "
                        "a value pinned below the CPU, e.g. Haswell on an AVX-512 CPU, halves OpenBLAS's GEMM)")
    parser.add_argument("--json-out")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(ours_worker(args.target, args.threads, args.seed)))
        return
    args.vllm_python = args.vllm_python or str(Path(args.anchors) / "vllm-venv" / "bin" / "python")
    models = args.models.split(",")
    for m in models:
        if not (Path(args.anchors) / m / "config.json").exists():
            parser.error(f"{args.anchors}/{m} is missing: run ../shared/anchors/setup.sh vllm ckpt first")
    if not Path(args.vllm_python).exists() or not Path(args.anchors_script).exists():
        parser.error(f"need {args.vllm_python} and {args.anchors_script} (../shared/anchors/setup.sh vllm)")

    results = {m: {"ours": [], "vllm": []} for m in models}
    for round_index in range(args.rounds):
        for m in models:
            sides = ["ours", "vllm"] if round_index % 2 == 0 else ["vllm", "ours"]
            for side in sides:
                checkpoint = Path(args.anchors) / m
                r = run_ours(checkpoint, args) if side == "ours" else run_vllm(checkpoint, args)
                results[m][side].append(r)
                print(f"  round {round_index + 1} {m:5} {side:4} 32 concurrent {r['concurrent_tok_s']:6.1f} tok/s, "
                      f"batch 1 {r['b1_tok_s']:5.1f} tok/s  (load {os.getloadavg()[0]:.1f})", flush=True)

    first = results[models[0]]
    print(f"\n{time.strftime('%Y-%m-%d')}, {cpu_description()}, {args.threads} threads, {args.rounds} rounds; ours: "
          f"kernels {first['ours'][0]['isa']}, torch {first['ours'][0]['torch']}, GEMM {first['ours'][0]['blas']}; vLLM {first['vllm'][0]['vllm']} "
          f"(torch {first['vllm'][0]['torch']}, {', '.join(first['vllm'][0]['isa_libs'])})")
    summary = []
    header = (f"{'model':5} {'test':13} {'ours tok/s':>19} {'vLLM tok/s':>19} {'ratio':>5} {'x/round':>7} "
              f"{'GEMM GF/s':>9} {'GB/s':>5} {'ours %':>6} {'vLLM %':>6}")
    print(header)
    for m in models:
        config = json.loads((Path(args.anchors) / m / "config.json").read_text())
        s = shape_of(config)
        ours, vllm = results[m]["ours"], results[m]["vllm"]
        gemm = statistics.median(max(r["gemm_gflop_s"].values()) for r in ours)
        bandwidth = statistics.median(r["read_gb_s"] for r in ours)
        floor_s = run_flops(s) / (gemm * 1e9)
        row = {"model": m, "gemm_gflop_s": gemm, "read_gb_s": bandwidth, "floor_s": floor_s,
               "b1_bytes": b1_bytes(s), "ours": ours, "vllm": vllm}  # fmt: skip
        for test, key in (("32 concurrent", "concurrent_tok_s"), ("batch-1", "b1_tok_s")):
            o, v = statistics.median(r[key] for r in ours), statistics.median(r[key] for r in vllm)
            per_round = statistics.median(a[key] / b[key] for a, b in zip(ours, vllm))
            if key == "concurrent_tok_s":  # % of the matmul floor: floor time / run time
                pct = [100 * floor_s / (REQUESTS * OUTPUT / x) for x in (o, v)]
            else:  # % of the weight-bandwidth roofline
                pct = [100 * b1_bytes(s) * x / 1e9 / bandwidth for x in (o, v)]
            row[key] = {"ours": o, "vllm": v, "ratio": o / v, "ratio_per_round": per_round, "ours_pct": pct[0],
                        "vllm_pct": pct[1]}  # fmt: skip
            print(f"{m:5} {test:13} {span(ours, key):>19} {span(vllm, key):>19} {o / v:5.2f} {per_round:7.2f} "
                  f"{gemm:9.0f} {bandwidth:5.1f} {pct[0]:5.0f}% {pct[1]:5.0f}%")
        core = statistics.median(r["core_b1_tok_s"] for r in ours)
        row["core_b1"] = {"tok_s": core, "pct_roofline": 100 * b1_bytes(s) * core / 1e9 / bandwidth}
        print(f"{m:5} {'core batch-1':13} {span(ours, 'core_b1_tok_s'):>19} {'':>19} {'':5} {'':7} {'':9} "
              f"{bandwidth:5.1f} {row['core_b1']['pct_roofline']:5.0f}%   (model core, static cache)")
        summary.append(row)
    floors = ", ".join(f"{r['model']} {r['floor_s']:.1f} s" for r in summary)
    weights = ", ".join(f"{r['model']} {r['b1_bytes'] / 1e6:.0f} MB/token" for r in summary)
    print(f"(% for 32 concurrent: of the fp32 matmul floor ({floors} at the GEMM rate); for batch-1: of the active "
          f"weights' read roofline ({weights} at the read bandwidth))")
    payload = {"bench": "vs_vllm", "date": time.strftime("%Y-%m-%d"), "cpu": cpu_description(),
               "threads": args.threads, "rounds": args.rounds, "models": summary}  # fmt: skip
    print(json.dumps(payload))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
