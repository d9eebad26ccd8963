"""`ernie45 bench serve` (the CLI, as a user runs it) against `ernie45 serve`, checked against the server's own
/metrics: per load level and round, the client's request / token counts next to the deltas of the server's counters,
and the client's mean TTFT / TPOT next to the server's histograms (TTFT: the client's includes HTTP and the
prefill queue as the server sees it, so it is the larger; TPOT should agree to within a percent).

Shared machines: every run also records how much of the CPUs other processes used meanwhile (/proc/stat busy time
minus this benchmark's processes: the server, its engine core and the client), so a noisy round can be told from a
slow one; the summary takes, per level, the round with the least foreign CPU.

    python benchmarks/bench_cli_serve.py [MODEL] [--rounds 2] [--threads 2] [--input-len 128] [--output-len 128]
        [--levels c1:16 c8:64 c32:128 r8:64] [--json-dir DIR]

A level is cN:PROMPTS (max concurrency N, all requests at once) or rR:PROMPTS (Poisson arrivals at R requests/s).
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil  # installed with peft (the train extra)

from ernie45.bench import cpu_info
from ernie45.default_model import DEFAULT_MODEL_DIR

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import launched_server

_COUNTERS = ("prompt_tokens_total", "generation_tokens_total", "time_to_first_token_seconds_sum",
             "time_to_first_token_seconds_count", "time_per_output_token_seconds_sum",
             "time_per_output_token_seconds_count")


def scrape(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    values = {}
    for name in _COUNTERS:
        match = re.search(rf"^ernie45:{name}\{{[^}}]*\}} (\S+)$", text, re.MULTILINE)
        values[name] = float(match.group(1))
    values["requests"] = sum(float(v) for v in
                             re.findall(r"^ernie45:request_success_total\{[^}]*\} (\S+)$", text, re.MULTILINE))
    return values


def busy_seconds() -> float:
    """CPU seconds all CPUs spent busy since boot (/proc/stat: everything but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process and its live children (the server and its engine core)."""
    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def server_pid(port: int) -> int:
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return conn.pid
    raise RuntimeError(f"no process listens on port {port}")


def run_level(url: str, pid: int, level: str, args, json_path: Path) -> dict:
    kind, _, count = level.partition(":")
    load = (["--max-concurrency", kind[1:]] if kind.startswith("c") else ["--request-rate", kind[1:]])
    cmd = [sys.executable, "-m", "ernie45.cli.main", "bench", "serve", "--base-url", url, "--num-prompts", count,
           "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len), "--ignore-eos",
           "--seed", str(args.seed), "--disable-tqdm", "--result-file", str(json_path), *load]
    before, busy0, ours0 = scrape(url), busy_seconds(), tree_cpu_seconds(pid)
    wall0 = time.perf_counter()
    client = psutil.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    client_cpu = 0.0
    while client.poll() is None:
        try:
            t = client.cpu_times()
            client_cpu = t.user + t.system
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    wall = time.perf_counter() - wall0
    if client.returncode != 0:
        raise SystemExit(f"bench serve failed: {client.stderr.read()[-2000:]}")
    after, busy1, ours1 = scrape(url), busy_seconds(), tree_cpu_seconds(pid)
    foreign = max(0.0, (busy1 - busy0) - (ours1 - ours0) - client_cpu)
    d = {k: after[k] - before[k] for k in after}
    r = json.loads(json_path.read_text())
    return {
        "level": level, "completed": r["completed"], "total_input_tokens": r["total_input_tokens"],
        "total_output_tokens": r["total_output_tokens"], "request_throughput": r["request_throughput"],
        "output_throughput": r["output_throughput"], "total_token_throughput": r["total_token_throughput"],
        **{k: r[k] for k in r if k.endswith("_ms")},
        "server_requests": d["requests"], "server_prompt_tokens": d["prompt_tokens_total"],
        "server_generation_tokens": d["generation_tokens_total"],
        "server_mean_ttft_ms": 1e3 * d["time_to_first_token_seconds_sum"] / d["time_to_first_token_seconds_count"],
        "server_mean_tpot_ms": 1e3 * d["time_per_output_token_seconds_sum"] / d["time_per_output_token_seconds_count"],
        "foreign_cpu_share": foreign / (wall * psutil.cpu_count()),
        "wall_s": wall,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default=str(DEFAULT_MODEL_DIR))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--levels", nargs="+", default=["c1:16", "c8:64", "c32:128", "r8:64"])
    p.add_argument("--json-dir", default=None, help="keep each run's `ernie45 bench serve` JSON here")
    args = p.parse_args()
    json_dir = Path(args.json_dir or tempfile.mkdtemp(prefix="bench_cli_serve-"))
    json_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    server_args = f"--threads {args.threads} --max-num-seqs 32"
    with launched_server(args.model, server_args) as url:
        pid = server_pid(int(url.rsplit(":", 1)[1]))
        for r in range(args.rounds):
            for level in args.levels if r % 2 == 0 else list(reversed(args.levels)):
                run = run_level(url, pid, level, args, json_dir / f"{level.replace(':', '-')}-round{r + 1}.json")
                run["round"] = r + 1
                runs.append(run)
                print(f"round {r + 1} {level}: {run['output_throughput']:.1f} out tok/s, TPOT client/server "
                      f"{run['mean_tpot_ms']:.2f}/{run['server_mean_tpot_ms']:.2f} ms, foreign CPU "
                      f"{100 * run['foreign_cpu_share']:.0f}%", file=sys.stderr, flush=True)
    best = {level: min((x for x in runs if x["level"] == level), key=lambda x: x["foreign_cpu_share"])
            for level in args.levels}
    cpu = cpu_info()
    print(f"\n{cpu['model_name']} ({', '.join(cpu['isa_flags'])}), {cpu['cpus']} CPUs; server --threads "
          f"{args.threads}; {args.input_len} + {args.output_len} tokens, eos ignored, greedy; per level the round "
          "with the least foreign CPU")
    header = (f"{'level':>7} {'done':>5} {'= srv':>6} {'out tok/s':>10} {'TTFT mean/p50/p99 ms':>24} "
              f"{'TPOT mean/p50/p99 ms':>22} {'TPOT cli/srv':>13} {'ITL p99':>8} {'E2EL p50':>9} {'foreign':>8}")
    print(header)
    print("-" * len(header))
    for level, x in best.items():
        same = (x["completed"] == x["server_requests"] and x["total_input_tokens"] == x["server_prompt_tokens"]
                and x["total_output_tokens"] == x["server_generation_tokens"])
        print(f"{level:>7} {x['completed']:>5} {'yes' if same else 'NO':>6} {x['output_throughput']:>10.1f} "
              f"{x['mean_ttft_ms']:>8.1f}/{x['median_ttft_ms']:.1f}/{x['p99_ttft_ms']:.1f} "
              f"{x['mean_tpot_ms']:>8.2f}/{x['median_tpot_ms']:.2f}/{x['p99_tpot_ms']:.2f} "
              f"{x['mean_tpot_ms'] / x['server_mean_tpot_ms']:>13.4f} {x['p99_itl_ms']:>8.1f} "
              f"{x['median_e2el_ms']:>9.1f} {100 * x['foreign_cpu_share']:>7.0f}%")
    print(json.dumps({"bench": "cli_serve", "date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu,
                      "args": vars(args), "runs": runs, "best": best}))


if __name__ == "__main__":
    main()
