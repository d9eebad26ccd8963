"""Engine decode-step time against its bandwidth roofline as the context grows (issue 16).

One `ModelRunner.execute` step of the ERNIE-4.5-0.3B shape (random weights) over the engine's paged KV cache, its
blocks scattered over the pool (shuffled block tables) and filled with random values (an untouched zero cache
reads from the kernel's zero page and would look faster than memory). Cases: batch-1 decode at 128, 1,024 and
4,096 tokens of context, 32 sequences x 256, and, so that the prompt side is watched too, a 512-token prefill and a
256-token chunk on 768 cached tokens. Roofline of a decode step = (weight bytes + KV bytes read) / read bandwidth,
both measured in the same round (`bench_model.measure_read_bandwidth`).

The baseline is another source tree (e.g. the parent commit: `git archive HEAD~1 | tar -x -C /tmp/base`), run in
its own process with the same seed, rounds alternating with ours; each figure is the median over rounds of the
median step of a round.

    flock /tmp/coord/cpu.lock python benchmarks/bench_long_context.py [--baseline-tree /tmp/base] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

CASES = {  # name -> (sequences, cached tokens per sequence, new tokens per sequence)
    "decode ctx 128": (1, 127, 1),
    "decode ctx 1024": (1, 1023, 1),
    "decode ctx 4096": (1, 4095, 1),
    "decode 32 x 256": (32, 255, 1),
    "prefill 512": (1, 0, 512),
    "chunk 256 @ 768": (1, 768, 256),
}
BLOCK_SIZE = 16


def worker(args) -> None:
    """Times every case in this process (the tree on PYTHONPATH) and prints one JSON line."""
    sys.path.insert(0, str(Path(__file__).parent))  # bench_model beside this file
    from bench_model import SHAPE_0_3B, measure_read_bandwidth, weight_bytes

    from ernie45.engine.model_runner import ModelRunner
    from ernie45.engine.paged_attention import KVCache
    from ernie45.engine.scheduler import ScheduledBatch
    from ernie45.models.config import Ernie45Config
    from ernie45.models.ernie45 import Ernie45ForCausalLM

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    shape = {k: v for k, v in SHAPE_0_3B.items() if k != "rope_parameters"}
    config = Ernie45Config(**shape, rope_theta=500000.0)
    torch.manual_seed(0)
    model = Ernie45ForCausalLM(config)
    model.init_weights(torch.Generator().manual_seed(0))
    model = model.to(dtype).eval()
    model.tie_weights()
    wbytes = weight_bytes(model)
    L, K, D = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    elem = torch.empty((), dtype=dtype).element_size()
    results = {"bandwidth_gb_s": measure_read_bandwidth(), "weight_bytes": wbytes, "cases": {}}
    g = torch.Generator().manual_seed(1)
    for name in args.cases.split(","):
        S, cached, new = CASES[name]
        per_seq = -(-(cached + new) // BLOCK_SIZE)
        num_blocks = S * per_seq + 8
        cache = KVCache(L, num_blocks, BLOCK_SIZE, K, D, dtype)
        cache.k.normal_(generator=g)
        cache.v.normal_(generator=g)
        order = torch.randperm(num_blocks, generator=g).tolist()  # no sequence's blocks are contiguous
        tables = {str(i): order[i * per_seq : (i + 1) * per_seq] for i in range(S)}
        runner = ModelRunner(model, cache, tables.__getitem__)
        no_logprobs = SimpleNamespace(prompt_logprobs=None)
        requests = [SimpleNamespace(request_id=str(i), token_ids=[5] * (cached + new), num_computed_tokens=cached,
                                    num_prompt_tokens=cached + new, num_tokens=cached + new, params=no_logprobs,
                                    mm=None) for i in range(S)]
        batch = ScheduledBatch(requests=[(r, new) for r in requests])
        times = []
        for _ in range(args.steps + 1):
            t = time.perf_counter()
            runner.execute(batch)
            times.append(time.perf_counter() - t)
        kv_bytes = 2 * L * S * (cached + new) * K * D * elem
        results["cases"][name] = dict(step_s=statistics.median(times[1:]), kv_bytes=kv_bytes, tokens=S * new)
        del runner, cache
    print(json.dumps(results))


def run_tree(tree: str | None, args) -> dict:
    env = dict(os.environ)
    if tree:
        env["PYTHONPATH"] = tree
    cmd = [sys.executable, __file__, "--worker", "--dtype", args.dtype, "--steps", str(args.steps),
           "--threads", str(args.threads), "--cases", args.cases]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-tree", help="a source tree to compare with (its ernie45 package)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case and round (after one warm-up)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    ours_tree = str(Path(__file__).resolve().parents[1])
    trees = {"ours": ours_tree} | ({"base": args.baseline_tree} if args.baseline_tree else {})
    rounds: dict[str, list[dict]] = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():  # alternating: drift in bandwidth hits both alike
            rounds[name].append(run_tree(tree, args))

    from ernie45.kernels import build

    print(f"# {platform.processor() or platform.machine()}, kernels {build.active_target().name}, "
          f"{args.threads} threads, {args.dtype}, torch {torch.__version__}, {args.rounds} rounds (medians)")
    summary = {}
    for name in trees:
        bw = statistics.median(r["bandwidth_gb_s"] for r in rounds[name])
        wbytes = rounds[name][0]["weight_bytes"]
        rows = {}
        for case in args.cases.split(","):
            step = statistics.median(r["cases"][case]["step_s"] for r in rounds[name])
            # The roofline in each round with that round's bandwidth, then the median ratio.
            ratio = statistics.median(r["cases"][case]["step_s"] * r["bandwidth_gb_s"] * 1e9
                                      / (wbytes + r["cases"][case]["kv_bytes"]) for r in rounds[name])
            nbytes = wbytes + rounds[name][0]["cases"][case]["kv_bytes"]
            rows[case] = dict(ms=1e3 * step, roofline_ms=1e3 * nbytes / (bw * 1e9), ratio=ratio,
                              gb_s=nbytes / step / 1e9, tok_s=rounds[name][0]["cases"][case]["tokens"] / step)
        summary[name] = dict(bandwidth_gb_s=bw, cases=rows)
    print(f"{'case':18} {'tree':5} {'ms/step':>8} {'roofline':>8} {'ratio':>6} {'GB/s':>6} {'bw GB/s':>7} "
          f"{'tok/s':>8} {'vs base':>7}")
    for case in args.cases.split(","):
        for name in trees:
            r = summary[name]["cases"][case]
            vs = (f"{summary['base']['cases'][case]['ms'] / r['ms']:6.2f}x"
                  if "base" in summary and name == "ours" else "")
            print(f"{case:18} {name:5} {r['ms']:8.1f} {r['roofline_ms']:8.1f} {r['ratio']:6.2f} {r['gb_s']:6.1f} "
                  f"{summary[name]['bandwidth_gb_s']:7.1f} {r['tok_s']:8.1f} {vs:>7}")
    print("# roofline / ratio / GB/s count weights + KV bytes; for the prefill rows they only show bytes, "
          "those steps are compute-bound")
    print(json.dumps({"bench": "long_context", "dtype": args.dtype, "isa": build.active_target().name,
                      "summary": summary}))


if __name__ == "__main__":
    main()
