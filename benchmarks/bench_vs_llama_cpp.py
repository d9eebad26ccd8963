"""Batch-1 greedy decode: ernie45 against llama.cpp at every precision, on the same random ERNIE-4.5-0.3B-shape
checkpoint, each engine in its own process, rounds alternating, medians, ratios and GB/s.

Pairs (ours vs llama.cpp): fp32 vs f32, bf16 vs f16, int8 (symmetric per channel) vs q8_0, int4 (group 128) vs
q4_0, 2-bit (group 64) vs q2_K. Ours quantizes with RTN (the runtime format, and so the speed, is the same for
every method) and quantizes lm_head too, as llama.cpp's q8_0 / q4_0 / q2_K files quantize the tied output matrix.
"ratio" divides the medians; "x/round" is the median over rounds of the ratio within a round (the two sides
measured seconds apart, so the shared VM's drifting memory bandwidth, +-30% between minutes here, cancels out).
Protocol of both sides: a 32-token prompt of random ids < 8000, 8 warm-up steps, then 3 runs of 128 greedy steps
(one token in, argmax of its logits out); the median run gives tok/s. Each round also measures the machine's read
bandwidth (summing a 1 GiB fp32 tensor, in ours' process) so that GB/s can be put next to it: ours reads every
linear weight (+ scales) per step, llama.cpp its whole file minus nothing (tied embeddings: the output matrix is
the embedding, read in full every step).

Needs what ../shared/anchors/setup.sh builds (not a project dependency; llama.cpp runs from its own venv):
    $ANCHORS/dense/             transformers-layout checkpoint (random weights, 0.3B shape)
    $ANCHORS/gguf/dense-*.gguf  its f32 / f16 / q8_0 / q4_0 / q2_k conversions (q2_k made here if missing)
    $ANCHORS/llama-venv/        a venv with llama-cpp-python compiled on this machine

    python benchmarks/bench_vs_llama_cpp.py --anchors /tmp/anchors --rounds 2
    python benchmarks/bench_vs_llama_cpp.py --pairs int8,int4 --isa avx2    # our AVX2 build on an AVX-512 CPU
    python benchmarks/bench_vs_llama_cpp.py --isa avx2 --llama-python $ANCHORS/llama-avx2-venv/bin/python
        # both on AVX2: llama-cpp-python built with CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON
        # -DGGML_F16C=ON -DGGML_AVX512=OFF" (pip install --no-binary)
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

PAIRS = {"fp32": "f32", "bf16": "f16", "int8": "q8_0", "int4": "q4_0", "2-bit": "q2_k"}
BITS = {"int8": 8, "int4": 4, "2-bit": 2}
PROMPT_LEN, WARMUP, STEPS, RUNS = 32, 8, 128, 3


def prompt_ids() -> list[int]:
    import numpy as np

    return [int(t) for t in np.random.default_rng(0).integers(3, 8000, PROMPT_LEN)]


def cpu_description() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            lines = f.read().splitlines()
    except OSError:
        return platform.processor()
    name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "?")
    family = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("cpu family")), "?")
    flags = set(next((ln.split(":", 1)[1] for ln in lines if ln.startswith("flags")), "").split())
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni") if f in flags]
    return f"{name} (family {family}; {' '.join(isa)})"


# ---- ours (runs in this repo's Python) ----


def weight_bytes_per_step(model) -> int:
    """Bytes of every linear weight (+ scales, zeros, bias) a decode step streams; the embedding only gathers a
    row (with tied embeddings lm_head is that matrix, counted once)."""
    import torch

    from ernie45.quant import QuantizedLinear

    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            tensors = (module.qweight, module.scales, module.qzeros, module.bias)
        elif isinstance(module, torch.nn.Linear):
            tensors = (module.weight, module.bias)
        else:
            continue
        for t in tensors:
            if t is not None and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def ours_worker(checkpoint: str, precision: str, threads: int) -> dict:
    import torch

    # bench_model.py sits beside this script (sys.path[0]); the llama.cpp worker's venv needs none of it.
    from bench_model import measure_read_bandwidth

    import ernie45
    from ernie45.generation.static_cache import StaticKVCache
    from ernie45.kernels import build
    from ernie45.quant import build_config, quantize_model

    torch.set_num_threads(threads)
    model = ernie45.load_model(checkpoint, dtype="bfloat16" if precision == "bf16" else "float32")
    if precision in BITS:
        model = quantize_model(model, build_config(model, bits=BITS[precision], method="rtn", quantize_lm_head=True))
    model.eval()
    bandwidth = measure_read_bandwidth()
    prompt = torch.tensor(prompt_ids())[None]

    @torch.inference_mode()
    def run(steps: int) -> float:
        cache = StaticKVCache(model.config, 1, PROMPT_LEN + steps + 2, model.dtype)
        hidden = model.forward_hidden(prompt, torch.arange(PROMPT_LEN), cache)
        cache.advance()
        token = model.compute_logits(hidden[:, -1]).argmax(-1)
        start = time.perf_counter()
        for _ in range(steps):
            hidden = model.forward_hidden(token[:, None], torch.tensor([cache.length]), cache)
            cache.advance()
            token = model.compute_logits(hidden[:, -1]).argmax(-1)
        return time.perf_counter() - start

    run(WARMUP)
    times = [run(STEPS) for _ in range(RUNS)]
    return {"seconds": times, "tok_s": STEPS / statistics.median(times), "read_bytes": weight_bytes_per_step(model),
            "read_gb_s": bandwidth, "isa": build.active_target().name}


# ---- llama.cpp (runs in the llama venv's Python) ----


def llama_worker(gguf: str, threads: int) -> dict:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=threads, n_threads_batch=threads,
                verbose=False)
    vocab = llm.n_vocab()
    prompt = prompt_ids()

    def run(steps: int) -> float:
        llm.reset()
        llm.eval(prompt)
        start = time.perf_counter()
        token = int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,)).argmax())
        for _ in range(steps):
            llm.eval([token])
            token = int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,)).argmax())
        return time.perf_counter() - start

    run(WARMUP)
    times = [run(STEPS) for _ in range(RUNS)]
    return {"seconds": times, "tok_s": STEPS / statistics.median(times), "read_bytes": os.path.getsize(gguf)}


def make_q2_k(anchors: Path, llama_python: str) -> None:
    target = anchors / "gguf" / "dense-q2_k.gguf"
    if target.exists():
        return
    script = ("import llama_cpp, sys; p = llama_cpp.llama_model_quantize_default_params(); "
              "p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q2_K; p.nthread = 2; "
              "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))")
    subprocess.run([llama_python, "-c", script, str(anchors / "gguf" / "dense-f32.gguf"), str(target)], check=True)


def run_worker(python: str, args: list[str], env: dict | None = None) -> dict:
    out = subprocess.run([python, __file__, *args], check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--anchors", default=os.environ.get("ANCHORS", "/tmp/anchors"))
    parser.add_argument("--llama-python", help="default: ANCHORS/llama-venv/bin/python")
    parser.add_argument("--pairs", default=",".join(PAIRS), help=f"comma-separated, from {', '.join(PAIRS)}")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--isa", default="auto", help="ernie45's kernel target for ours (ERNIE45_KERNEL_ISA)")
    parser.add_argument("--json-out", help="also write the results here")
    parser.add_argument("--worker", choices=["ours", "llama"], help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "ours":
        print(json.dumps(ours_worker(args.target, args.precision, args.threads)))
        return
    if args.worker == "llama":
        print(json.dumps(llama_worker(args.target, args.threads)))
        return

    anchors = Path(args.anchors)
    llama_python = args.llama_python or str(anchors / "llama-venv" / "bin" / "python")
    pairs = args.pairs.split(",")
    if unknown := [p for p in pairs if p not in PAIRS]:
        parser.error(f"unknown pair(s) {', '.join(unknown)}; choose from {', '.join(PAIRS)}")
    if not (anchors / "dense" / "config.json").exists() or not Path(llama_python).exists():
        parser.error(f"{anchors} lacks dense/ or the llama venv: run ../shared/anchors/setup.sh llama ckpt first")
    if "2-bit" in pairs:
        make_q2_k(anchors, llama_python)
    env = {**os.environ, "ERNIE45_KERNEL_ISA": args.isa}
    results: dict[str, dict[str, list[dict]]] = {p: {"ours": [], "llama": []} for p in pairs}
    for round_index in range(args.rounds):
        for pair in pairs:
            # Alternate which side goes first, so that drift within a round hits both alike.
            sides = ["ours", "llama"] if round_index % 2 == 0 else ["llama", "ours"]
            for side in sides:
                if side == "ours":
                    r = run_worker(sys.executable, ["--worker", "ours", "--target", str(anchors / "dense"),
                                                    "--precision", pair, "--threads", str(args.threads)], env)
                else:
                    gguf = anchors / "gguf" / f"dense-{PAIRS[pair]}.gguf"
                    r = run_worker(llama_python, ["--worker", "llama", "--target", str(gguf),
                                                  "--threads", str(args.threads)])
                results[pair][side].append(r)
                print(f"  round {round_index + 1} {pair:5} {side:5} {r['tok_s']:6.1f} tok/s", flush=True)

    print(f"\n{cpu_description()}, {args.threads} threads, {args.rounds} rounds, ours' kernels: "
          f"{results[pairs[0]]['ours'][0]['isa']}, llama.cpp: {llama_python}")
    print(f"{'ours':6} {'llama.cpp':9} {'ours tok/s':>17} {'llama tok/s':>17} {'ratio':>5} {'x/round':>7} "
          f"{'ours GB/s':>9} {'llama GB/s':>10} {'mem GB/s':>8} {'ours %mem':>9}")
    summary = []
    for pair in pairs:
        ours, llama = results[pair]["ours"], results[pair]["llama"]
        o = statistics.median(r["tok_s"] for r in ours)
        ll = statistics.median(r["tok_s"] for r in llama)
        bandwidth = statistics.median(r["read_gb_s"] for r in ours)
        o_gbs, l_gbs = ours[0]["read_bytes"] * o / 1e9, llama[0]["read_bytes"] * ll / 1e9
        o_range = f"{min(r['tok_s'] for r in ours):.1f}-{max(r['tok_s'] for r in ours):.1f}"
        l_range = f"{min(r['tok_s'] for r in llama):.1f}-{max(r['tok_s'] for r in llama):.1f}"
        # The ratio within each round (the two sides ran seconds apart) cancels the VM's drifting bandwidth.
        per_round = statistics.median(a["tok_s"] / b["tok_s"] for a, b in zip(ours, llama))
        print(f"{pair:6} {PAIRS[pair]:9} {o:6.1f} ({o_range:>9}) {ll:6.1f} ({l_range:>9}) {o / ll:5.2f} "
              f"{per_round:7.2f} {o_gbs:9.1f} {l_gbs:10.1f} {bandwidth:8.1f} {100 * o_gbs / bandwidth:8.0f}%")
        summary.append({"ours": pair, "llama_cpp": PAIRS[pair], "ours_tok_s": o, "llama_tok_s": ll, "ratio": o / ll, "ratio_per_round": per_round,
                        "ours_gb_s": o_gbs, "llama_gb_s": l_gbs, "read_bandwidth_gb_s": bandwidth,
                        "ours_runs": [r["tok_s"] for r in ours], "llama_runs": [r["tok_s"] for r in llama]})
    payload = {"cpu": cpu_description(), "threads": args.threads, "rounds": args.rounds,
               "ours_isa": results[pairs[0]]["ours"][0]["isa"], "llama_python": llama_python, "pairs": summary}
    print(json.dumps(payload))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
