"""What `ernie45 serve` adds on top of the offline engine at concurrency 1: TPOT ratio and TTFT overhead.

Same checkpoint, same prompts (random token ids), same threads, greedy, eos ignored, one request at a time. Each
round runs, in alternating order, in separate processes:

- offline: `LLM` in a fresh process, requests one after another; TTFT = first token - arrival, TPOT = (finish -
  first token) / (output tokens - 1), from the engine's own RequestOutput metrics;
- server: `ernie45 serve` (the engine core in its own process), streaming /v1/completions from this process;
  TTFT = first streamed token - request sent, TPOT = (last token - first token) / (output tokens - 1).

`--server-root DIR` runs the server from another source tree (a `git worktree` of an older commit), to compare the
process split against the former engine thread in the same run. Prints medians over rounds and the per-round
ratio; one JSON line at the end.

    python benchmarks/bench_server_overhead.py CHECKPOINT [--rounds 3] [--requests 4] [--input-len 128]
        [--output-len 128] [--threads 2] [--server-root DIR]

CHECKPOINT: e.g. one written by benchmarks/make_random_checkpoint.py (ERNIE-4.5-0.3B shape).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

from ernie45.bench import SampleRequest, ServeTarget, cpu_description

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import launched_server, run_level


def make_prompts(count: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 8000) for _ in range(length)] for _ in range(count)]


def offline_worker(args: argparse.Namespace) -> None:
    """Runs in its own process: prints {"ttft": [...], "tpot": [...]} in seconds."""
    import torch

    from ernie45.engine import LLM, SamplingParams

    torch.set_num_threads(args.threads)
    llm = LLM(args.model, max_model_len=args.input_len + args.output_len + 16, enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    prompts = make_prompts(args.requests + 1, args.input_len, args.seed)
    llm.generate({"prompt_token_ids": prompts[0]}, params, use_tqdm=False)  # warm-up at full length, not measured
    ttft, tpot = [], []
    for prompt in prompts[1:]:
        out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
        m = out.metrics
        ttft.append(m.first_token_time - m.arrival_time)
        tpot.append((m.finish_time - m.first_token_time) / (len(out.outputs[0].token_ids) - 1))
    print(json.dumps({"ttft": ttft, "tpot": tpot}))


def run_offline(args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, args.model, "--worker", "--threads", str(args.threads), "--requests",
           str(args.requests), "--input-len", str(args.input_len), "--output-len", str(args.output_len),
           "--seed", str(args.seed)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_server(args: argparse.Namespace, root: str | None) -> dict:
    server_args = f"--threads {args.threads} --max-model-len {args.input_len + args.output_len + 16} " \
                  "--no-enable-prefix-caching"
    env_before = os.environ.get("PYTHONPATH")
    if root:
        os.environ["PYTHONPATH"] = root  # the server imports ernie45 from that tree
        server_args = server_args.replace(" --no-enable-prefix-caching", "")  # older trees lack the flag
    try:
        with launched_server(args.model, server_args) as url:
            requests = [SampleRequest(p, len(p), args.output_len)
                        for p in make_prompts(args.requests + 1, args.input_len, args.seed)]
            target = ServeTarget(url, args.model, ignore_eos=True)  # greedy, exactly --output-len tokens
            results, _ = asyncio.run(run_level(target, requests, 1, None, args.seed))
            results = results[1:]  # the first one warms up at full length, as offline
    finally:
        if root:
            if env_before is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = env_before
    bad = [r.error for r in results if not r.ok]
    if bad:
        raise SystemExit(f"server requests failed: {bad[:3]}")
    return {"ttft": [r.ttft for r in results], "tpot": [r.tpot for r in results]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=4, help="sequential requests per round and engine")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-root", default=None, help="also time a server run from this source tree")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        offline_worker(args)
        return

    kinds = ["offline", "server"] + (["server_old"] if args.server_root else [])
    rounds: list[dict[str, dict]] = []
    for r in range(args.rounds):
        order = kinds if r % 2 == 0 else list(reversed(kinds))
        measured = {}
        for kind in order:
            measured[kind] = (run_offline(args) if kind == "offline"
                              else run_server(args, args.server_root if kind == "server_old" else None))
        row = {k: {"ttft_ms": 1e3 * statistics.median(v["ttft"]), "tpot_ms": 1e3 * statistics.median(v["tpot"])}
               for k, v in measured.items()}
        rounds.append(row)
        print(f"round {r + 1}: " + "  ".join(f"{k}: TTFT {v['ttft_ms']:.1f} ms TPOT {v['tpot_ms']:.2f} ms"
                                              for k, v in row.items()), flush=True)

    print(f"\n{cpu_description()}; {args.requests} requests x ({args.input_len} prompt + {args.output_len} output), "
          f"concurrency 1, {args.threads} threads, medians of {args.rounds} rounds")
    summary = {}
    for kind in kinds:
        summary[kind] = {m: statistics.median(row[kind][m] for row in rounds) for m in ("ttft_ms", "tpot_ms")}
        print(f"  {kind:<11} TTFT {summary[kind]['ttft_ms']:7.1f} ms   TPOT {summary[kind]['tpot_ms']:6.2f} ms")
    for kind in kinds[1:]:
        ratios = [row[kind]["tpot_ms"] / row["offline"]["tpot_ms"] for row in rounds]
        overheads = [row[kind]["ttft_ms"] - row["offline"]["ttft_ms"] for row in rounds]
        summary[kind]["tpot_ratio_per_round"] = ratios
        summary[kind]["ttft_overhead_ms_per_round"] = overheads
        print(f"  {kind}: TPOT / offline per round {', '.join(f'{x:.3f}' for x in ratios)} "
              f"(median {statistics.median(ratios):.3f}; target <= 1.1); TTFT overhead per round "
              f"{', '.join(f'{x:.1f}' for x in overheads)} ms (median {statistics.median(overheads):.1f}; "
              "target <= 10)")
    print(json.dumps({"cpu": cpu_description(), "args": vars(args), "rounds": rounds, "summary": summary}))


if __name__ == "__main__":
    main()
