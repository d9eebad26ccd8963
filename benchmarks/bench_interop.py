"""Paddle-layout load vs transformers-layout load, and GGUF export against llama.cpp's own converter.

    python benchmarks/bench_interop.py --dense DENSE_DIR --moe MOE_DIR --work WORK_DIR \
        [--anchor-gguf DIR] [--rounds 3]

DENSE_DIR / MOE_DIR: transformers-layout checkpoints with a tokenizer.model (../shared/anchors/make_checkpoints.py
builds a 0.3B-shape dense and a 21B-A3B-like MoE). Each load runs in a fresh process (peak RSS is the process's
ru_maxrss), HF and Paddle alternating per round, so both see the same page cache and machine state. The GGUF part
times `export_gguf` per outtype, compares the f32 file tensor by tensor with llama.cpp's converter's
(`--anchor-gguf`/dense-f32.gguf, moe-f32.gguf), and runs both in llama.cpp (llama-cpp-python) for 32 greedy tokens
against ernie45's. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

LOAD = """
import resource, sys, time, torch, ernie45
torch.set_num_threads(2)
t = time.perf_counter(); m = ernie45.load_model(sys.argv[1], dtype="float32"); dt = time.perf_counter() - t
print(dt, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, sum(p.numel() * 4 for p in m.parameters()) / 2**30)
"""

LLAMA = """
import sys, json, numpy as np
from llama_cpp import Llama
ids = json.loads(sys.argv[2])
try:
    llm = Llama(model_path=sys.argv[1], n_ctx=256, n_threads=2, logits_all=True, verbose=False)
except Exception as exc:
    print(json.dumps({"error": str(exc)})); sys.exit(0)
llm.eval(ids); out = []
for _ in range(32):
    out.append(int(np.argmax(llm.scores[llm.n_tokens - 1]))); llm.eval([out[-1]])
print(json.dumps({"tokens": out}))
"""


def run_py(code: str, *args: str) -> str:
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=False)
    if res.returncode:
        raise RuntimeError(res.stderr[-2000:])
    return res.stdout.strip().splitlines()[-1]


def bench_loads(hf_dir: Path, paddle_dir: Path, rounds: int) -> dict:
    rows = {"hf": [], "paddle": []}
    for _ in range(rounds):
        for kind, path in (("hf", hf_dir), ("paddle", paddle_dir)):
            seconds, rss_gib, model_gib = map(float, run_py(LOAD, str(path)).split())
            rows[kind].append((seconds, rss_gib, model_gib))
    out = {}
    for kind, vals in rows.items():
        out[kind] = {"seconds": statistics.median(v[0] for v in vals), "peak_rss_gib": max(v[1] for v in vals),
                     "model_gib": vals[0][2]}
    out["ratio_paddle_over_hf"] = statistics.median(p[0] / h[0] for p, h in zip(rows["paddle"], rows["hf"]))
    return out


def compare_with_converter(ours: Path, theirs: Path) -> dict:
    import gguf
    import numpy as np

    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    # Values compared flat: the converter writes exp_probs_b as [1, E], we write [E] (the same ggml ne, E).
    equal = sum(np.array_equal(np.ravel(ta[n].data), np.ravel(tb[n].data)) for n in ta.keys() & tb.keys())
    keys_a = {k for k in a.fields if not k.startswith("GGUF.")}
    keys_b = {k for k in b.fields if not k.startswith("GGUF.")}
    differing = sorted(k for k in keys_a & keys_b
                       if k != "general.name" and str(a.fields[k].contents()) != str(b.fields[k].contents()))
    return {"tensors_ours": len(ta), "tensors_converter": len(tb), "tensors_equal": int(equal),
            "only_ours": sorted(ta.keys() - tb.keys()), "only_converter": sorted(tb.keys() - ta.keys()),
            "keys_only_ours": sorted(keys_a - keys_b), "keys_only_converter": sorted(keys_b - keys_a),
            "keys_differing": {k: [str(a.fields[k].contents()), str(b.fields[k].contents())] for k in differing}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dense", type=Path, required=True)
    ap.add_argument("--moe", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True, help="scratch directory (Paddle copies, GGUF files)")
    ap.add_argument("--anchor-gguf", type=Path, default=None, help="directory of llama.cpp-converted dense/moe-f32.gguf")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    import torch

    import ernie45
    from ernie45.checkpoint.gguf_export import OUTTYPES, export_gguf
    from ernie45.checkpoint.paddle_saver import save_paddle
    from ernie45.generation.generate import generate

    torch.set_num_threads(2)
    args.work.mkdir(parents=True, exist_ok=True)
    result: dict = {"cpu": os.uname().machine}
    dense = ernie45.load_model(args.dense, dtype="float32")
    t = time.perf_counter()
    save_paddle(dense, args.work / "dense-paddle")
    result["paddle_export_dense_s"] = time.perf_counter() - t
    del dense
    result["load_dense"] = bench_loads(args.dense, args.work / "dense-paddle", args.rounds)

    prompt = list(range(100, 132))
    for name, src in (("dense", args.dense), ("moe", args.moe)):
        model = ernie45.load_model(src, dtype="float32")
        greedy = generate(model, torch.tensor([prompt]), max_new_tokens=32)[0, len(prompt):].tolist()
        for outtype in OUTTYPES if name == "dense" else ("f32", "q8_0"):
            path = args.work / f"{name}-{outtype}.gguf"
            t = time.perf_counter()
            export_gguf(model, path, outtype)
            entry = {"export_s": time.perf_counter() - t, "bytes": path.stat().st_size}
            if outtype == "f32":
                entry["llama_cpp"] = json.loads(run_py(LLAMA, str(path), json.dumps(prompt)))
                entry["greedy_equal"] = entry["llama_cpp"].get("tokens") == greedy
                anchor = args.anchor_gguf / f"{name}-f32.gguf" if args.anchor_gguf else None
                if anchor and anchor.is_file():
                    entry["vs_converter"] = compare_with_converter(path, anchor)
                    entry["converter_file_in_llama_cpp"] = json.loads(run_py(LLAMA, str(anchor), json.dumps(prompt)))
            result[f"gguf_{name}_{outtype}"] = entry
        del model

    ld = result["load_dense"]
    print(f"{'load (fresh process, fp32)':32} {'seconds':>8} {'peak RSS GiB':>13} {'model GiB':>10}")
    for kind in ("hf", "paddle"):
        r = ld[kind]
        print(f"{kind:32} {r['seconds']:8.2f} {r['peak_rss_gib']:13.2f} {r['model_gib']:10.2f}")
    print(f"paddle / hf load time: {ld['ratio_paddle_over_hf']:.2f}x")
    for key, entry in result.items():
        if key.startswith("gguf_"):
            extra = "" if "greedy_equal" not in entry else f"  llama.cpp greedy == ernie45: {entry['greedy_equal']}"
            print(f"{key:32} {entry['export_s']:8.2f} s {entry['bytes'] / 2**20:10.1f} MiB{extra}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
