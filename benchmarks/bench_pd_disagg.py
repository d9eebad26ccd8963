"""Prefill/decode disaggregation vs one mixed engine on the same cores: does PD keep decode TPOT flat while long
prompts arrive? (issue 20)

Three deployments, all behind `ernie45 router` (so the proxy hop is the same):
  pd:      1 prefill + 1 decode instance, each pinned to one core (`taskset`, --threads 1); every request is
           prefilled on the prefill instance and its KV imported by the decode one;
  pd-long: the same instances, but the router sends only prompts of >= --pd-min-prompt-tokens through the prefill
           side (short ones are computed by the decode instance itself);
  mixed:   one instance over both cores (--threads 2).
Workload (the same random token ids for both): `--streams` closed-loop short requests (`--short-len` prompt
tokens, `--short-out` output tokens, eos ignored, greedy) run for the whole window; meanwhile `--long` requests of
`--long-len` prompt tokens and `--long-out` output tokens arrive every `--long-every` seconds. Measured per
request from the stream: TTFT, TPOT = (last token - first token) / (tokens - 1), and the inter-token gaps (ITL).
Goodput: requests per second that met the SLO (TTFT <= --slo-ttft and TPOT <= --slo-tpot); the no-stall goodput
also asks that no gap between two tokens of the request exceeded --slo-itl-max (a long prefill batched with the
decodes stalls every stream for the length of its chunk, which a per-request mean TPOT hides). Deployments run
alternately `--rounds` times (this VM's speed drifts), and the table gives each round.

    python benchmarks/bench_pd_disagg.py [--model DIR] [--rounds 2] [--window 20]

The router and this client run unpinned on the same two cores in both deployments. Prints a table and one JSON
line.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time

import httpx

DEPLOYMENTS = ("pd", "pd-long", "mixed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    def __init__(self, argv: list[str], url: str, log: str):
        self.url = url
        self._log = open(log, "w")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_healthy(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.url} exited with {self.process.returncode} (log: {self._log.name})")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.url} did not become healthy")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def _serve(model: list[str], cores: str, threads: int, role: str | None, engine_args: list[str], tag: str) -> Proc:
    port = _free_port()
    argv = ["taskset", "-c", cores, sys.executable, "-m", "ernie45.cli.main", "serve", *model, "--port", str(port),
            "--threads", str(threads), "--no-web-ui", "--log-level", "warning", *engine_args]
    if role:
        argv += ["--role", role]
    return Proc(argv, f"http://127.0.0.1:{port}", f"/tmp/bench-pd-{tag}.log")


def _router(args: list[str], tag: str) -> Proc:
    port = _free_port()
    return Proc([sys.executable, "-m", "ernie45.cli.main", "router", "--port", str(port), "--log-level", "warning",
                 "--health-interval", "0.5", *args], f"http://127.0.0.1:{port}", f"/tmp/bench-pd-{tag}.log")


async def _one(client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int) -> dict:
    start = time.perf_counter()
    times = []
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    async with client.stream("POST", url + "/v1/completions", json=body) as resp:
        async for line in resp.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"])
                if any(c.get("text") for c in chunk.get("choices", [])):
                    times.append(time.perf_counter())
    ttft = times[0] - start if times else float("nan")
    tpot = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else float("nan")
    return {"ttft": ttft, "tpot": tpot, "itl": [b - a for a, b in itertools.pairwise(times)], "tokens": len(times),
            "start": start}


async def _workload(url: str, a, rng_seed: int) -> dict:
    rng = random.Random(rng_seed)

    def prompt(n):
        return [rng.randrange(10, 8000) for _ in range(n)]

    results = {"short": [], "long": []}
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        await _one(client, url, prompt(8), 4)  # warm-up (first-use costs out of the window)
        t0 = time.perf_counter()
        end = t0 + a.window

        async def short_loop(i):
            while time.perf_counter() < end:
                results["short"].append(await _one(client, url, prompt(a.short_len), a.short_out))

        async def long_arrivals():
            tasks = []
            k = 0
            while time.perf_counter() < end:
                await asyncio.sleep(max(0.0, t0 + 1.0 + k * a.long_every - time.perf_counter()))
                if time.perf_counter() >= end:
                    break
                tasks.append(asyncio.create_task(_one(client, url, prompt(a.long_len), a.long_out)))
                k += 1
            results["long"].extend(await asyncio.gather(*tasks))

        await asyncio.gather(long_arrivals(), *(short_loop(i) for i in range(a.streams)))
        results["seconds"] = time.perf_counter() - t0
    return results


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(x for x in xs if not math.isnan(x))
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


def _summary(res: dict, a) -> dict:
    short, long_ = res["short"], res["long"]
    ok = [r for r in short + long_ if r["ttft"] <= a.slo_ttft and (r["tpot"] <= a.slo_tpot or r["tokens"] < 2)]
    smooth = [r for r in ok if max(r["itl"], default=0.0) <= a.slo_itl_max]
    return {
        "short_requests": len(short), "long_requests": len(long_),
        "tpot_p50_ms": 1e3 * _pct([r["tpot"] for r in short], 50),
        "tpot_p99_ms": 1e3 * _pct([r["tpot"] for r in short], 99),
        "itl_p99_ms": 1e3 * _pct([g for r in short for g in r["itl"]], 99),
        "itl_p999_ms": 1e3 * _pct([g for r in short for g in r["itl"]], 99.9),
        "itl_max_ms": 1e3 * max((g for r in short for g in r["itl"]), default=float("nan")),
        "stalls_over_100ms": sum(1 for r in short for g in r["itl"] if g > 0.1),
        "short_ttft_p50_ms": 1e3 * _pct([r["ttft"] for r in short], 50),
        "short_ttft_p99_ms": 1e3 * _pct([r["ttft"] for r in short], 99),
        "long_ttft_p50_ms": 1e3 * _pct([r["ttft"] for r in long_], 50),
        "long_ttft_max_ms": 1e3 * max((r["ttft"] for r in long_), default=float("nan")),
        "slo_met_fraction": len(ok) / max(1, len(short) + len(long_)),
        "goodput_rps": len(ok) / res["seconds"],
        "goodput_no_stall_rps": len(smooth) / res["seconds"],
        "output_tok_per_s": sum(r["tokens"] for r in short + long_) / res["seconds"],
    }


def _router_stats(url: str) -> dict:
    """The router's mean TTFT split over the streamed requests (ms) and what the KV transfers moved."""
    values = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        name, _, value = line.rpartition(" ")
        if name.startswith("ernie45:router_") and "{" not in name:
            values[name.removeprefix("ernie45:router_")] = float(value)
    split = {}
    for part in ("queue", "prefill", "transfer", "first_decode"):
        count = values.get(f"ttft_{part}_seconds_count", 0)
        split[part] = 1e3 * values.get(f"ttft_{part}_seconds_sum", 0) / count if count else None
    return {"ttft_split_mean_ms": split, "kv_transfer_bytes": values.get("kv_transfer_bytes_total", 0),
            "kv_transfer_blocks": values.get("kv_transfer_blocks_total", 0),
            "pd_fallbacks": values.get("pd_fallbacks_total", 0)}


def _deploy(kind: str, model: list[str], engine_args: list[str], pd_min: int) -> list[Proc]:
    if kind in ("pd", "pd-long"):
        p = _serve(model, "0", 1, "prefill", engine_args, "prefill")
        d = _serve(model, "1", 1, "decode", engine_args, "decode")
        for s in (p, d):
            s.wait_healthy()
        threshold = ["--pd-min-prompt-tokens", str(pd_min)] if kind == "pd-long" else []
        r = _router(["--prefill", p.url, "--decode", d.url, *threshold], "router-pd")
        procs = [p, d, r]
    else:
        m = _serve(model, "0,1", 2, None, engine_args, "mixed")
        m.wait_healthy()
        r = _router(["--mixed", m.url], "router-mixed")
        procs = [m, r]
    r.wait_healthy()
    return procs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint (default: the embedded default model)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--window", type=float, default=20.0, help="seconds of load per deployment and round")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--short-len", type=int, default=32)
    parser.add_argument("--short-out", type=int, default=64)
    parser.add_argument("--long", dest="long_len", type=int, default=1536, help="long prompt tokens")
    parser.add_argument("--long-out", type=int, default=8)
    parser.add_argument("--long-every", type=float, default=2.0)
    parser.add_argument("--slo-ttft", type=float, default=2.0, help="seconds")
    parser.add_argument("--slo-tpot", type=float, default=0.05, help="seconds")
    parser.add_argument("--slo-itl-max", type=float, default=0.1,
                        help="seconds; the stricter goodput also requires no token gap longer than this")
    parser.add_argument("--max-num-batched-tokens", type=int, default=1024)
    parser.add_argument("--pd-min-prompt-tokens", type=int, default=256,
                        help="the pd-long deployment's router sends only prompts this long through the prefill side")
    a = parser.parse_args()
    from ernie45.bench.machine import cpu_description

    model = [a.model] if a.model else []
    engine_args = ["--max-model-len", "2048", "--max-num-seqs", "32",
                   "--max-num-batched-tokens", str(a.max_num_batched_tokens)]
    runs = []
    for rnd in range(a.rounds):
        for kind in DEPLOYMENTS:
            procs = _deploy(kind, model, engine_args, a.pd_min_prompt_tokens)
            load_before = os.getloadavg()[0]
            try:
                res = asyncio.run(_workload(procs[-1].url, a, rng_seed=rnd))
                router_stats = _router_stats(procs[-1].url)
            finally:
                for proc in reversed(procs):
                    proc.stop()
            # The 1-minute load average after the run: ~3 is this benchmark alone (two engines or one 2-thread
            # engine, the router, the client); more means another process shared the cores.
            runs.append({"deployment": kind, "round": rnd, **_summary(res, a), **router_stats, "load_before": load_before,
                         "load_after": os.getloadavg()[0]})
    print(f"{cpu_description()}; {a.streams} short streams ({a.short_len} in / {a.short_out} out) + a "
          f"{a.long_len}-token prompt every {a.long_every}s, {a.window}s per run; SLO TTFT <= {a.slo_ttft}s, "
          f"TPOT <= {1e3 * a.slo_tpot:.0f} ms (no-stall: and no token gap > {1e3 * a.slo_itl_max:.0f} ms)")
    cols = ("load_after", "tpot_p50_ms", "tpot_p99_ms", "itl_p99_ms", "itl_p999_ms", "itl_max_ms", "stalls_over_100ms",
            "short_ttft_p50_ms", "long_ttft_p50_ms", "slo_met_fraction", "goodput_rps", "goodput_no_stall_rps", "output_tok_per_s")
    print(f"{'run':11} " + " ".join(f"{c:>17}" for c in cols))
    for r in runs:
        print(f"{r['deployment']:7} r{r['round']:<2} " + " ".join(f"{r[c]:17.3f}" for c in cols))
    for rnd in range(a.rounds):
        mx = next(r for r in runs if r["deployment"] == "mixed" and r["round"] == rnd)
        for kind in DEPLOYMENTS[:-1]:
            pd = next(r for r in runs if r["deployment"] == kind and r["round"] == rnd)
            print(f"round {rnd}: {kind} / mixed  TPOT p50 {pd['tpot_p50_ms'] / mx['tpot_p50_ms']:.2f}x  p99 "
                  f"{pd['tpot_p99_ms'] / mx['tpot_p99_ms']:.2f}x  ITL max {pd['itl_max_ms'] / mx['itl_max_ms']:.2f}x  "
                  f"long TTFT {pd['long_ttft_p50_ms'] / mx['long_ttft_p50_ms']:.2f}x  "
                  f"goodput {pd['goodput_rps'] / max(mx['goodput_rps'], 1e-9):.2f}x  no-stall goodput "
                  f"{pd['goodput_no_stall_rps'] / max(mx['goodput_no_stall_rps'], 1e-9):.2f}x")
    for r in runs:
        if r["deployment"] != "mixed":
            split = ", ".join(f"{k} {v:.1f}" for k, v in r["ttft_split_mean_ms"].items() if v is not None)
            print(f"{r['deployment']} r{r['round']}: TTFT split (mean ms over streamed requests): {split}; KV moved "
                  f"{r['kv_transfer_bytes'] / 1e6:.1f} MB in {r['kv_transfer_blocks']:.0f} blocks; "
                  f"{r['pd_fallbacks']:.0f} fallbacks")
    print(json.dumps({"bench": "pd_disagg", "machine": cpu_description(), "args": vars(a), "runs": runs}))


if __name__ == "__main__":
    main()
