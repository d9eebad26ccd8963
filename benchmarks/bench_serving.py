"""Online serving benchmark of an OpenAI-compatible server (`ernie45 serve`, or any server with /v1/completions).

Streams `/v1/completions` requests of `--input-len` prompt tokens and exactly `--output-len` output tokens (eos
ignored, greedy) and reports, per load level, what vLLM's `vllm bench serve` reports, under the same names:
request throughput, output and total token throughput, and mean / median / p99 (and std) of TTFT, TPOT, ITL and
end-to-end latency (E2EL), in milliseconds.

The client, the arrival process and the metrics are `ernie45.bench` (what `ernie45 bench serve` runs); this script
adds load levels in one run and `--launch`.

Load levels: fixed concurrency (`--concurrency 1 8 32`, the default; `--num-prompts` requests per level, default
4x the concurrency, at least 8) or Poisson arrivals (`--request-rate R` requests/s, optionally capped by
`--max-concurrency`). Prompts are random token ids (different per request, so the prefix cache does not help).

    python benchmarks/bench_serving.py --base-url http://127.0.0.1:8000
    python benchmarks/bench_serving.py --launch CHECKPOINT [--server-args "--max-num-seqs 32"] \
        [--concurrency 1 8 32] [--request-rate 4 --num-prompts 64] [--input-len 128] [--output-len 64]

`--launch MODEL` starts `ernie45 serve MODEL` on a free port, waits for /health, and stops it at the end.
Prints a table and one JSON line (`{"runs": [...]}`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shlex
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import httpx

from ernie45.bench import (
    SampleRequest,
    ServerTokenizer,
    ServeTarget,
    compute_metrics,
    cpu_description,
    random_requests,
    run_requests,
    send_request,
    served_model,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def launched_server(model: str, server_args: str):
    port = _free_port()
    cmd = [sys.executable, "-m", "ernie45.cli.main", "serve", model, "--port", str(port), "--log-level", "warning",
           *shlex.split(server_args)]
    process = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if process.poll() is not None:
                raise SystemExit(f"the server exited with status {process.returncode}: {shlex.join(cmd)}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not become healthy in 600 s")
            time.sleep(0.2)
        yield url
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


async def run_level(target: ServeTarget, requests: list[SampleRequest], concurrency: int | None,
                    request_rate: float | None, seed: int):
    """One load level after one short unmeasured warm-up request: (results, duration)."""
    async with httpx.AsyncClient(base_url=target.base_url, headers=target.headers, timeout=600) as client:
        warmup = SampleRequest(requests[0].prompt[:8], min(8, requests[0].prompt_len), 2)
        await send_request(client, target, warmup)
    return await run_requests(target, requests, request_rate or float("inf"), max_concurrency=concurrency, seed=seed,
                              progress=False)


def print_table(runs: list[dict]) -> None:
    header = (f"{'load':>14} {'req/s':>7} {'out tok/s':>10} {'TTFT mean/p50/p99 ms':>24} "
              f"{'TPOT mean/p50/p99 ms':>22} {'ITL mean/p50/p99 ms':>22} {'E2EL mean/p50/p99 ms':>24} {'fail':>5}")
    print(header)
    print("-" * len(header))
    def trio(run: dict, name: str) -> str:
        return "/".join(f"{run[f'{k}_{name}_ms']:.1f}" for k in ("mean", "median", "p99"))

    for run in runs:
        load = f"rate {run['request_rate']}/s" if run["request_rate"] else f"conc {run['max_concurrency']}"
        print(f"{load:>14} {run['request_throughput']:>7.2f} {run['output_throughput']:>10.1f} "
              f"{trio(run, 'ttft'):>24} {trio(run, 'tpot'):>22} {trio(run, 'itl'):>22} {trio(run, 'e2el'):>24} "
              f"{run['failed']:>5}")


def benchmark(base_url: str, args: argparse.Namespace) -> list[dict]:
    model = served_model(base_url, args.api_key)
    # exactly --output-len tokens per request (eos ignored), greedy
    target = ServeTarget(base_url, model, api_key=args.api_key, ignore_eos=True)
    tokenizer = ServerTokenizer(base_url, model, target.headers)
    if args.request_rate:
        levels = [(args.max_concurrency, args.request_rate)]
    else:
        levels = [(c, None) for c in args.concurrency]
    runs = []
    for i, (concurrency, rate) in enumerate(levels):
        count = args.num_prompts or max(8, 4 * (concurrency or 1))
        requests = random_requests(tokenizer, count, args.input_len, args.output_len, seed=args.seed + i)
        results, duration = asyncio.run(run_level(target, requests, concurrency, rate, args.seed + i))
        for failure in [r for r in results if not r.ok][:3]:
            print(f"failed request: {failure.error}", file=sys.stderr)
        runs.append({"max_concurrency": concurrency, "request_rate": rate, "num_prompts": count,
                     "input_len": args.input_len, "output_len": args.output_len,
                     **compute_metrics(results, duration)})
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--base-url", help="a running server, e.g. http://127.0.0.1:8000")
    where.add_argument("--launch", metavar="MODEL", help="start `ernie45 serve MODEL` for the run")
    parser.add_argument("--server-args", default="", help="extra `ernie45 serve` flags with --launch")
    parser.add_argument("--api-key", default=None, help="sent as `Authorization: Bearer KEY`")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals, requests/s")
    parser.add_argument("--max-concurrency", type=int, default=None, help="cap in-flight requests with --request-rate")
    parser.add_argument("--num-prompts", type=int, default=None)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.launch:
        with launched_server(args.launch, args.server_args) as url:
            runs = benchmark(url, args)
    else:
        runs = benchmark(args.base_url.rstrip("/"), args)
    print_table(runs)
    print(json.dumps({"benchmark": "bench_serving", "cpu": cpu_description(), "machine": platform.machine(),
                      "python": platform.python_version(), "runs": runs}))


if __name__ == "__main__":
    main()
