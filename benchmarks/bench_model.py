"""Prefill and decode speed of ernie45's model core vs transformers' generate, same weights, same run.

ERNIE-4.5-0.3B shape with random weights, float32 and bfloat16. Prints tokens/s, ours/transformers ratios and
achieved memory bandwidth (weight bytes read per decode step x steps/s) against the bandwidth measured here.

    python benchmarks/bench_model.py [--steps 128] [--prompt 512] [--repeats 3] [--dtypes float32,bfloat16]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time

import torch

import ernie45
from ernie45.generation.generate import generate

SHAPE_0_3B = dict(
    vocab_size=103424, hidden_size=1024, intermediate_size=3072, num_hidden_layers=18, num_attention_heads=16,
    num_key_value_heads=2, head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
)


def measure_read_bandwidth() -> float:
    """GB/s of summing a 1 GiB fp32 tensor (the memory roofline decode competes with)."""
    x = torch.ones(256 * 1024 * 1024)
    x.sum()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / min(times) / 1e9


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def weight_bytes(model) -> int:
    """Bytes a decode step reads: every parameter once (tied embedding counted once, as the LM head)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=128, help="decode steps")
    parser.add_argument("--prompt", type=int, default=512, help="prefill length")
    parser.add_argument("--decode-prompt", type=int, default=16, help="prompt length before the decode steps")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import Ernie4_5Config, Ernie4_5ForCausalLM

    bandwidth = measure_read_bandwidth()
    print(f"# {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
          f"measured read bandwidth {bandwidth:.1f} GB/s")
    torch.manual_seed(0)
    hf_fp32 = Ernie4_5ForCausalLM(Ernie4_5Config(**SHAPE_0_3B)).eval()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        hf_fp32.save_pretrained(tmp)
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            ours = ernie45.load_model(tmp, dtype=dtype_name)
            hf = hf_fp32.to(dtype) if dtype != torch.float32 else hf_fp32
            hf.generation_config.eos_token_id = None
            wbytes = weight_bytes(ours)

            prompt = torch.randint(3, 100000, (1, args.prompt))
            with torch.inference_mode():
                t_ours = timed(lambda: ours.compute_logits(ours.forward_hidden(prompt)[:, -1]), args.repeats)
                t_hf = timed(lambda: hf(prompt, logits_to_keep=1), args.repeats)
            results.append(dict(dtype=dtype_name, phase=f"prefill {args.prompt}", batch=1,
                                ours_tok_s=args.prompt / t_ours, hf_tok_s=args.prompt / t_hf))

            for batch in map(int, args.batches.split(",")):
                ids = torch.randint(3, 100000, (batch, args.decode_prompt))
                # Decode time = (prompt + steps) - (prompt + 1 step): isolates the per-token cost.
                def ours_run(n):
                    return lambda: generate(ours, ids, max_new_tokens=n)

                def hf_run(n):
                    return lambda: hf.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)

                with torch.inference_mode():
                    t_ours = timed(ours_run(args.steps), args.repeats) - timed(ours_run(1), args.repeats)
                    t_hf = timed(hf_run(args.steps), args.repeats) - timed(hf_run(1), args.repeats)
                steps = args.steps - 1
                results.append(dict(
                    dtype=dtype_name, phase=f"decode {args.steps}", batch=batch,
                    ours_tok_s=batch * steps / t_ours, hf_tok_s=batch * steps / t_hf,
                    ours_gb_s=wbytes * steps / t_ours / 1e9, hf_gb_s=wbytes * steps / t_hf / 1e9,
                ))
            del ours

    print(f"{'dtype':9} {'phase':12} {'batch':>5} {'ours tok/s':>11} {'hf tok/s':>9} {'ratio':>6} "
          f"{'ours GB/s':>9} {'% roofline':>10}")
    for r in results:
        r["ratio"] = r["ours_tok_s"] / r["hf_tok_s"]
        gb = r.get("ours_gb_s")
        roof = f"{100 * gb / bandwidth:9.0f}%" if gb else ""
        print(f"{r['dtype']:9} {r['phase']:12} {r['batch']:>5} {r['ours_tok_s']:11.1f} {r['hf_tok_s']:9.1f} "
              f"{r['ratio']:6.2f} {gb or 0:9.1f} {roof:>10}")
    print(json.dumps({"bench": "model", "bandwidth_gb_s": bandwidth, "results": results}))


if __name__ == "__main__":
    main()
