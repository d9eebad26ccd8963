"""Online serving benchmark of an OpenAI-compatible server (`ernie45 serve`, or any server with /v1/completions).

Streams `/v1/completions` requests of `--input-len` prompt tokens and exactly `--output-len` output tokens (eos
ignored, greedy) and reports, per load level, what vLLM's `vllm bench serve` reports, under the same names:
request throughput, output and total token throughput, and mean / median / p99 (and std) of TTFT, TPOT, ITL and
end-to-end latency (E2EL), in milliseconds.

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
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2el: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


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


def random_prompts(base_url: str, count: int, input_len: int, seed: int, headers: dict) -> list[list[int]]:
    """`count` prompts of exactly `input_len` token ids, drawn from the ids of a random text (so they are ids the
    tokenizer produces), shuffled per prompt."""
    rng = random.Random(seed)
    words = ["model", "token", "reads", "writes", "the", "next", "answer", "short", "test", "stream", "模型", "学习",
             "engine", "batch", "cache", "prefix", "a", "of", "to", "and"]
    text = " ".join(rng.choice(words) for _ in range(2000))
    pool = httpx.post(base_url + "/tokenize", json={"prompt": text}, headers=headers, timeout=60).json()["tokens"]
    return [[rng.choice(pool) for _ in range(input_len)] for _ in range(count)]


async def one_request(client: httpx.AsyncClient, model: str, prompt: list[int], output_len: int) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True},
            # vLLM's extra: each chunk lists its token ids, so a token counts as arrived even when it decodes to no
            # text (random weights emit ids beyond the benchmark tokenizer's pieces).
            "return_token_ids": True}
    start = time.perf_counter()
    last = None
    result = RequestResult(ok=False)
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    result.error = chunk["error"]["message"]
                    return result
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if not any(c.get("text") or c.get("token_ids") for c in chunk.get("choices", [])):
                    continue
                now = time.perf_counter()
                if last is None:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.e2el = time.perf_counter() - start
    result.ok = last is not None
    return result


async def run_level(base_url: str, model: str, prompts: list[list[int]], output_len: int,
                    concurrency: int | None, request_rate: float | None, seed: int,
                    headers: dict) -> tuple[list[RequestResult], float]:
    limits = httpx.Limits(max_connections=max(concurrency or 0, len(prompts)) + 4)
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(600), limits=limits,
                                 headers=headers) as client:
        await one_request(client, model, prompts[0][:8], 2)  # warm-up, not measured
        semaphore = asyncio.Semaphore(concurrency) if concurrency else None

        async def limited(prompt):
            if semaphore is None:
                return await one_request(client, model, prompt, output_len)
            async with semaphore:
                return await one_request(client, model, prompt, output_len)

        start = time.perf_counter()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(limited(prompt)))
            if request_rate:
                await asyncio.sleep(rng.expovariate(request_rate))  # Poisson arrivals
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def _ms_stats(name: str, values: list[float]) -> dict[str, float]:
    if not values:
        return {f"mean_{name}_ms": 0.0, f"median_{name}_ms": 0.0, f"std_{name}_ms": 0.0, f"p99_{name}_ms": 0.0}
    ms = sorted(v * 1000 for v in values)
    p99 = ms[min(len(ms) - 1, max(0, round(0.99 * (len(ms) - 1))))]
    return {f"mean_{name}_ms": statistics.fmean(ms), f"median_{name}_ms": statistics.median(ms),
            f"std_{name}_ms": statistics.pstdev(ms), f"p99_{name}_ms": p99}


def metrics(results: list[RequestResult], duration: float) -> dict[str, float]:
    """vLLM's BenchmarkMetrics names (vllm.benchmarks.serve)."""
    done = [r for r in results if r.ok]
    total_input = sum(r.prompt_tokens for r in done)
    total_output = sum(r.output_tokens for r in done)
    tpots = [(r.e2el - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    return {
        "completed": len(done), "failed": len(results) - len(done), "duration": duration,
        "total_input_tokens": total_input, "total_output_tokens": total_output,
        "request_throughput": len(done) / duration, "output_throughput": total_output / duration,
        "total_token_throughput": (total_input + total_output) / duration,
        **_ms_stats("ttft", [r.ttft for r in done]), **_ms_stats("tpot", tpots),
        **_ms_stats("itl", [x for r in done for x in r.itl]), **_ms_stats("e2el", [r.e2el for r in done]),
    }


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
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = httpx.get(base_url + "/v1/models", timeout=30, headers=headers).json()["data"][0]["id"]
    if args.request_rate:
        levels = [(args.max_concurrency, args.request_rate)]
    else:
        levels = [(c, None) for c in args.concurrency]
    runs = []
    for i, (concurrency, rate) in enumerate(levels):
        count = args.num_prompts or max(8, 4 * (concurrency or 1))
        prompts = random_prompts(base_url, count, args.input_len, args.seed + i, headers)
        results, duration = asyncio.run(run_level(base_url, model, prompts, args.output_len, concurrency, rate,
                                                  args.seed + i, headers))
        for failure in [r for r in results if not r.ok][:3]:
            print(f"failed request: {failure.error}", file=sys.stderr)
        runs.append({"max_concurrency": concurrency, "request_rate": rate, "num_prompts": count,
                     "input_len": args.input_len, "output_len": args.output_len, **metrics(results, duration)})
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
    print(json.dumps({"benchmark": "bench_serving", "machine": platform.machine(), "python": platform.python_version(),
                      "runs": runs}))


if __name__ == "__main__":
    main()
