"""Serving throughput of ernie45's engine (`LLM.generate`) vs transformers' `generate`, same weights, same run.

ERNIE-4.5-0.3B shape with random weights. N requests of P prompt + O output tokens (greedy, eos ignored):

- engine: all N submitted at once to `LLM.generate` (continuous batching, chunked prefill, paged KV cache);
- transformers: one request at a time (batch 1, timed on the first `--hf-b1-requests` requests) and padded static
  batches of 8 and 32 (left padding, `max_new_tokens = min_new_tokens = O`, eos disabled);
- engine batch-1 decode vs the model core's own `ernie45.generation.generate` (same model object): decode tokens/s
  between the first and the last generated token, so the prefill is not counted;
- time to first token of a repeated `--ttft-prompt-len`-token prompt, first uncached, then served from the prefix
  cache (engine with enable_prefix_caching=True, `RequestOutput.metrics`).

Prints a table, the targets of the issue next to the measured ratios, and one JSON line.

    python benchmarks/bench_throughput.py [--num-requests 32] [--prompt-len 128] [--output-len 128]
        [--dtype float32] [--threads 2] [--hf-b1-requests 4] [--skip-hf-batch32] [--breakdown] [--profile 30]

Quick run (about a minute on 2 cores):
    python benchmarks/bench_throughput.py --num-requests 8 --output-len 16 --hf-b1-requests 1 --skip-hf-batch32 \
        --ttft-prompt-len 256 --repeats 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections import defaultdict

import torch

from ernie45.engine import LLM, SamplingParams, paged_attention
from ernie45.generation.generate import GenerationConfig, stream_generate
from ernie45.models.layers import linear
from ernie45.tokenizer.testing import build_tiny_sentencepiece_tokenizer

SHAPE_0_3B = dict(
    vocab_size=103424, hidden_size=1024, intermediate_size=3072, num_hidden_layers=18, num_attention_heads=16,
    num_key_value_heads=2, head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
)

TARGETS = {
    "engine_vs_hf_b1": 10.0,  # N concurrent >= 10x transformers batch-1 throughput
    "engine_vs_hf_b32": 3.0,  # ... and >= 3x its padded batch of 32
    "engine_vs_core_b1_decode": 1.0,  # engine batch-1 decode no slower than the core's generate
    "cached_vs_uncached_ttft": 0.1,  # cached-prefix TTFT <= 0.1x uncached
}


class Prompts:
    """Random prompt ids; every call gives new ones, so the prefix cache never hits unless a test wants it to."""

    def __init__(self, seed: int, low: int = 3, high: int = 100000):
        self.generator = torch.Generator().manual_seed(seed)
        self.low, self.high = low, high

    def ids(self, length: int) -> list[int]:
        return torch.randint(self.low, self.high, (length,), generator=self.generator).tolist()

    def lengths(self, count: int, length: int, jitter: int) -> list[int]:
        if jitter <= 0:
            return [length] * count
        return torch.randint(max(1, length - jitter), length + 1, (count,), generator=self.generator).tolist()


def gemm_seconds(rows: int, dtype: torch.dtype, lm_head: bool, repeats: int = 3) -> float:
    """Best seconds of one forward's matmuls alone (the 7 linears of every layer, plus the LM head if asked) for
    `rows` tokens, through ernie45's `linear` (routed by row count exactly as the engine's linears are) on random
    weights of the 0.3B shape: the matmul floor of one step."""
    H, I = SHAPE_0_3B["hidden_size"], SHAPE_0_3B["intermediate_size"]
    NQ = SHAPE_0_3B["num_attention_heads"] * SHAPE_0_3B["head_dim"]
    NKV = SHAPE_0_3B["num_key_value_heads"] * SHAPE_0_3B["head_dim"]
    layer = [(NQ, H), (NKV, H), (NKV, H), (H, NQ), (I, H), (I, H), (H, I)]
    weights = [torch.randn(o, i).to(dtype) for o, i in layer]
    head = torch.randn(SHAPE_0_3B["vocab_size"], H).to(dtype) if lm_head else None
    xs = {i: torch.randn(rows, i).to(dtype) for i in (H, NQ, I)}

    best_layer, best_head = float("inf"), 0.0
    for _ in range(repeats + 1):
        t = time.perf_counter()
        with torch.inference_mode():
            for w in weights:
                linear(xs[w.shape[1]], w)
        best_layer = min(best_layer, time.perf_counter() - t)
    if head is not None:
        best_head = float("inf")
        for _ in range(repeats + 1):
            t = time.perf_counter()
            with torch.inference_mode():
                linear(xs[H], head)
            best_head = min(best_head, time.perf_counter() - t)
    return SHAPE_0_3B["num_hidden_layers"] * best_layer + best_head


def gemm_floor(num_requests: int, prompt_len: int, output_len: int, budget: int, dtype: torch.dtype) -> float:
    """Seconds the N-concurrent run would take if it did nothing but its matmuls (prefill in chunks of the
    engine's token budget without LM head, then output_len - 1 decode steps of N rows with the LM head; the
    prefill's N sampled rows and everything else ignored)."""
    prefill_tokens = num_requests * prompt_len
    chunk = min(budget, prefill_tokens)
    prefill = prefill_tokens / chunk * gemm_seconds(chunk, dtype, lm_head=False)
    decode = (output_len - 1) * gemm_seconds(num_requests, dtype, lm_head=True) if output_len > 1 else 0.0
    return prefill + decode


def load() -> float:
    """1-minute load average: above the thread count, other processes were competing for the cores."""
    return os.getloadavg()[0]


# ------------------------------------------------------------------------------------------------ engine


def engine_run(llm: LLM, prompts: list[list[int]], output_len: int):
    """Seconds of one `LLM.generate` of all prompts, and its outputs (each checked to have output_len tokens)."""
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    t = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - t
    lengths = {len(o.outputs[0].token_ids) for o in outputs}
    if lengths != {output_len}:
        raise RuntimeError(f"engine outputs have {sorted(lengths)} tokens, expected {output_len}")
    return elapsed, outputs


def engine_b1_decode(llm: LLM, prompt: list[int], output_len: int) -> tuple[float, float]:
    """(decode tokens/s between the first and the last token, end-to-end output tokens/s) of one request alone."""
    elapsed, (out,) = engine_run(llm, [prompt], output_len)
    m = out.metrics
    return (output_len - 1) / (m.finish_time - m.first_token_time), output_len / elapsed


def core_b1_decode(model, prompt: list[int], output_len: int) -> tuple[float, float]:
    """The same for the model core's `stream_generate` (static KV cache, no scheduler)."""
    ids = torch.tensor([prompt])
    t0 = time.perf_counter()
    stamps = [time.perf_counter() for _ in stream_generate(model, ids, GenerationConfig(max_new_tokens=output_len))]
    if len(stamps) != output_len:
        raise RuntimeError(f"core generate gave {len(stamps)} tokens, expected {output_len}")
    return (output_len - 1) / (stamps[-1] - stamps[0]), output_len / (stamps[-1] - t0)


def ttft(llm: LLM, prompt: list[int]) -> tuple[float, int]:
    """(time to first token in seconds, prompt tokens served from the prefix cache) of a max_tokens=1 request."""
    _, (out,) = engine_run(llm, [prompt], 1)
    return out.metrics.time_to_first_token, out.metrics.num_cached_tokens


# ------------------------------------------------------------------------------------------------ transformers


def hf_run(hf, prompts: list[list[int]], output_len: int, batch_size: int, max_batches: int | None):
    """(seconds, output tokens) of transformers' generate over static batches of `batch_size` (left-padded),
    timing the first `max_batches` batches (all when None)."""
    batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    if max_batches is not None:
        batches = batches[:max_batches]
    total_time, total_tokens = 0.0, 0
    for batch in batches:
        longest = max(map(len, batch))
        ids = torch.zeros(len(batch), longest, dtype=torch.long)
        mask = torch.zeros(len(batch), longest, dtype=torch.long)
        for row, p in enumerate(batch):
            ids[row, longest - len(p):] = torch.tensor(p)
            mask[row, longest - len(p):] = 1
        t = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=output_len, min_new_tokens=output_len,
                              do_sample=False, pad_token_id=0)
        total_time += time.perf_counter() - t
        if out.shape[1] - longest != output_len:
            raise RuntimeError(f"transformers generated {out.shape[1] - longest} tokens, expected {output_len}")
        total_tokens += len(batch) * output_len
    return total_time, total_tokens


# ------------------------------------------------------------------------------------------------ profiling


@contextlib.contextmanager
def phase_timers(llm: LLM):
    """Wall time of the engine's phases during the block, by wrapping methods of this engine (and, for the
    attention, of the paged-attention class) for the duration only. Yields the dict of seconds."""
    engine, runner = llm.engine, llm.engine.runner
    seconds: dict[str, float] = defaultdict(float)

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[name] += time.perf_counter() - t
        return wrapper

    model = runner.model
    meta_cls = paged_attention.PagedAttentionMetadata
    saved_attend = meta_cls.attend
    saved_one = paged_attention._attend_one
    saved = dict(schedule=engine.scheduler.schedule, execute=runner.execute, context=runner._metadata,
                 sampler=engine.sampler, forward_hidden=model.forward_hidden, compute_logits=model.compute_logits,
                 append=engine._append_token, output=engine._output)
    sampler = engine.sampler

    class TimedSampler:
        def __call__(self, *args, **kwargs):
            return timed("sampler", sampler)(*args, **kwargs)

    engine.scheduler.schedule = timed("scheduler.schedule", saved["schedule"])
    runner.execute = timed("runner.execute (all)", saved["execute"])
    runner._metadata = timed("runner._metadata", saved["context"])
    model.forward_hidden = timed("model.forward_hidden (all)", saved["forward_hidden"])
    model.compute_logits = timed("model.compute_logits (LM head)", saved["compute_logits"])
    engine.sampler = TimedSampler()
    engine._append_token = timed("engine._append_token (detok + stop)", saved["append"])
    engine._output = timed("engine._output (RequestOutput)", saved["output"])
    meta_cls.attend = timed("paged attend (all)", saved_attend)
    paged_attention._attend_one = timed("paged _attend_one (math)", saved_one)
    try:
        yield seconds
    finally:
        engine.scheduler.schedule, engine.sampler = saved["schedule"], sampler
        for name in ("execute", "_metadata"):
            vars(runner).pop(name, None)
        for name in ("forward_hidden", "compute_logits"):
            vars(model).pop(name, None)
        for name in ("_append_token", "_output"):
            vars(engine).pop(name, None)
        vars(engine.scheduler).pop("schedule", None)
        meta_cls.attend = saved_attend
        paged_attention._attend_one = saved_one


def profile_engine(llm: LLM, prompts: list[list[int]], output_len: int, rows: int, every: int) -> dict:
    """torch.profiler on one N-concurrent run, recording one engine step in `every` (recording all of them keeps
    millions of events: tens of GB); prints the top `rows` ops by self CPU time, summed over the recorded steps."""
    from torch.profiler import ProfilerActivity, profile, schedule

    totals: dict[str, list] = defaultdict(lambda: [0.0, 0])

    def collect(prof) -> None:
        for event in prof.key_averages():
            totals[event.key][0] += event.self_cpu_time_total
            totals[event.key][1] += event.count

    warnings.filterwarnings("ignore", message="Profiler clears events")
    engine = llm.engine
    step = engine.step
    steps = [0]
    with profile(activities=[ProfilerActivity.CPU], on_trace_ready=collect,
                 schedule=schedule(wait=max(every - 2, 0), warmup=1 if every > 1 else 0, active=1)) as prof:
        def profiled_step():
            out = step()
            steps[0] += 1
            prof.step()
            return out

        engine.step = profiled_step
        try:
            elapsed, _ = engine_run(llm, prompts, output_len)
        finally:
            vars(engine).pop("step", None)
    recorded = sum(t for t, _ in totals.values())
    print(f"\ntorch.profiler, 1 engine step in {every} recorded ({steps[0]} steps, {elapsed:.1f} s wall with the "
          f"profiler): top ops by self CPU time")
    print(f"  {'op':36} {'self CPU ms':>12} {'%':>6} {'calls':>8}")
    top = sorted(totals.items(), key=lambda kv: -kv[1][0])[:rows]
    for key, (us, count) in top:
        # ProfilerStep's self time is what no ATen op covers: Python (scheduler, sampler loops, detokenizer, module
        # calls) and the ctypes GEMV kernel (the linears it takes).
        name = "(outside ATen: Python, GEMV kernel)" if key.startswith("ProfilerStep") else key[:36]
        print(f"  {name:36} {us / 1000:12.1f} {100 * us / recorded:6.1f} {count:8d}")
    return {"every": every, "steps": steps[0], "wall_s": elapsed, "recorded_self_cpu_ms": recorded / 1000,
            "top": [dict(op=k, self_cpu_ms=v[0] / 1000, calls=v[1]) for k, v in top]}


# ------------------------------------------------------------------------------------------------ main


def median(values):
    return statistics.median(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--prompt-len-jitter", type=int, default=0,
                        help="draw prompt lengths in [prompt-len - jitter, prompt-len] (transformers pads them)")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-num-seqs", type=int, default=None, help="engine; default max(64, num-requests)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=1024, help="engine token budget per step")
    parser.add_argument("--hf-b1-requests", type=int, default=4, help="requests timed for transformers batch 1")
    parser.add_argument("--hf-batch8-batches", type=int, default=2,
                        help="batches of 8 timed for transformers (0: all; equal shapes, so 2 are representative)")
    parser.add_argument("--skip-hf", action="store_true", help="no transformers runs at all")
    parser.add_argument("--skip-hf-batch1", action="store_true")
    parser.add_argument("--skip-hf-batch8", action="store_true")
    parser.add_argument("--skip-hf-batch32", action="store_true")
    parser.add_argument("--skip-b1-decode", action="store_true", help="no engine vs core batch-1 decode")
    parser.add_argument("--skip-ttft", action="store_true")
    parser.add_argument("--skip-floor", action="store_true", help="no matmul-only floor of the engine run")
    parser.add_argument("--ttft-prompt-len", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the batch-1 decode and TTFT tests")
    parser.add_argument("--engine-repeats", type=int, default=2,
                        help="timed engine runs of the N requests (fresh prompts each); the median counts")
    parser.add_argument("--breakdown", action="store_true",
                        help="extra engine run with per-phase wall timers (scheduler, attention, LM head, ...)")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="extra engine run under torch.profiler; print the top ROWS ops by self CPU time")
    parser.add_argument("--profile-every", type=int, default=8, help="record one engine step in this many")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    N, P, O = args.num_requests, args.prompt_len, args.output_len

    from transformers import Ernie4_5Config, Ernie4_5ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    dtype = getattr(torch, args.dtype)
    print(f"# {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
          f"dtype {args.dtype}; {N} requests x {P} prompt + {O} output tokens")
    torch.manual_seed(args.seed)
    hf = Ernie4_5ForCausalLM(Ernie4_5Config(**SHAPE_0_3B)).eval()
    prompts_src = Prompts(args.seed + 1)
    rows: list[dict] = []
    extra: dict = {}

    def add(name, batch, tok_s, note=""):
        rows.append(dict(name=name, batch=batch, tok_s=tok_s, note=note, load=load()))
        print(f"  {name:44} batch {batch!s:>4}  {tok_s:9.1f} tok/s  load {load():4.1f}  {note}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        build_tiny_sentencepiece_tokenizer(tmp)
        llm = LLM(model=tmp, dtype=args.dtype, max_num_seqs=args.max_num_seqs or max(64, N),
                  max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=True)
        hf = hf.to(dtype)
        hf.generation_config.eos_token_id = None
        hf.generation_config.pad_token_id = 0

        # Warm-up: kernel JIT, allocator, one short mixed prefill/decode batch through each path.
        engine_run(llm, [prompts_src.ids(16) for _ in range(4)], 4)
        list(stream_generate(llm.model, torch.tensor([prompts_src.ids(16)]), GenerationConfig(max_new_tokens=4)))
        if not args.skip_hf:
            hf_run(hf, [prompts_src.ids(16)], 4, 1, None)

        lengths = prompts_src.lengths(N, P, args.prompt_len_jitter)
        prompts = [prompts_src.ids(n) for n in lengths]

        # 1. Engine, N concurrent requests.
        times = []
        for r in range(args.engine_repeats):
            run_prompts = prompts if r == 0 else [prompts_src.ids(n) for n in lengths]  # no prefix-cache hits
            elapsed, _ = engine_run(llm, run_prompts, O)
            times.append(elapsed)
        t_engine = median(times)
        engine_tok_s = N * O / t_engine
        extra["engine_run_s"] = times
        add("engine LLM.generate, all concurrent", N, engine_tok_s,
            f"{t_engine:.1f} s, {N * (P + O) / t_engine:.0f} prompt+output tok/s")
        if not args.skip_floor:
            floor = gemm_floor(N, P, O, args.max_num_batched_tokens, dtype)
            extra["gemm_floor_s"] = floor
            add("  matmuls alone (floor of that run)", N, N * O / floor,
                f"{floor:.1f} s = {100 * floor / t_engine:.0f}% of the engine run's wall time")

        # 2. transformers, batch 1 and padded static batches.
        hf_tok_s = {}
        if not args.skip_hf:
            plan = []
            if not args.skip_hf_batch1:
                plan.append((1, min(args.hf_b1_requests, N)))
            if not args.skip_hf_batch8:
                plan.append((8, args.hf_batch8_batches or None))
            if not args.skip_hf_batch32:
                plan.append((32, None))
            for batch_size, max_batches in plan:
                elapsed, tokens = hf_run(hf, prompts, O, batch_size, max_batches)
                hf_tok_s[batch_size] = tokens / elapsed
                add("transformers generate, static batches", batch_size, hf_tok_s[batch_size],
                    f"{elapsed:.1f} s for {tokens // O} requests")

        # 3. Batch-1 decode: engine vs the core's generate (same model object), interleaved.
        if not args.skip_b1_decode:
            eng, core = [], []
            for _ in range(args.repeats):
                core.append(core_b1_decode(llm.model, prompts_src.ids(P), O))
                eng.append(engine_b1_decode(llm, prompts_src.ids(P), O))
            extra["b1"] = dict(engine_decode=[e[0] for e in eng], core_decode=[c[0] for c in core],
                               engine_e2e=[e[1] for e in eng], core_e2e=[c[1] for c in core])
            add("engine batch-1 decode (first->last token)", 1, median([e[0] for e in eng]))
            add("core generate batch-1 decode", 1, median([c[0] for c in core]))
            add("engine batch-1 end to end (incl. prefill)", 1, median([e[1] for e in eng]))
            add("core generate batch-1 end to end", 1, median([c[1] for c in core]))

        # 4. TTFT of a repeated long prompt: uncached, then from the prefix cache.
        if not args.skip_ttft:
            uncached, cached, hits = [], [], []
            for _ in range(args.repeats):
                prompt = prompts_src.ids(args.ttft_prompt_len)
                t_first, hit_first = ttft(llm, prompt)
                t_again, hit_again = ttft(llm, prompt)
                if hit_first != 0:
                    raise RuntimeError(f"the first request of a fresh prompt hit the cache ({hit_first} tokens)")
                uncached.append(t_first)
                cached.append(t_again)
                hits.append(hit_again)
            extra["ttft"] = dict(prompt_len=args.ttft_prompt_len, uncached_s=uncached, cached_s=cached,
                                 cached_tokens=hits)
            print(f"  TTFT {args.ttft_prompt_len}-token prompt: uncached {1000 * median(uncached):.1f} ms, "
                  f"cached {1000 * median(cached):.1f} ms ({hits[0]} tokens from the cache)  load {load():4.1f}",
                  flush=True)

        # 5. Optional: where the engine's time goes on the N-concurrent run.
        if args.breakdown:
            run_prompts = [prompts_src.ids(n) for n in lengths]
            with phase_timers(llm) as seconds:
                elapsed, _ = engine_run(llm, run_prompts, O)
            extra["breakdown_s"] = dict(seconds, total=elapsed)
            print(f"\nengine phase breakdown ({N} concurrent, {elapsed:.1f} s wall; nested rows are inside the row "
                  f"above them):")
            for name, s in sorted(seconds.items(), key=lambda kv: -kv[1]):
                print(f"  {name:40} {s:7.2f} s  {100 * s / elapsed:5.1f}%")
        if args.profile:
            extra["profile"] = profile_engine(llm, [prompts_src.ids(n) for n in lengths], O, args.profile,
                                              args.profile_every)

    # Summary.
    ratios = {}
    if 1 in hf_tok_s:
        ratios["engine_vs_hf_b1"] = engine_tok_s / hf_tok_s[1]
    if 8 in hf_tok_s:
        ratios["engine_vs_hf_b8"] = engine_tok_s / hf_tok_s[8]
    if 32 in hf_tok_s:
        ratios["engine_vs_hf_b32"] = engine_tok_s / hf_tok_s[32]
    if "b1" in extra:
        # Median of the per-repeat ratios: each repeat runs core and engine back to back, so a ratio compares two
        # runs under the same machine conditions (this VM's speed drifts by tens of % over minutes).
        ratios["engine_vs_core_b1_decode"] = median(
            [e / c for e, c in zip(extra["b1"]["engine_decode"], extra["b1"]["core_decode"])])
    if "ttft" in extra:
        ratios["cached_vs_uncached_ttft"] = median(extra["ttft"]["cached_s"]) / median(extra["ttft"]["uncached_s"])

    print(f"\n{'comparison':28} {'measured':>9} {'target':>9}  met")
    for name, value in ratios.items():
        target = TARGETS.get(name)
        if target is None:
            print(f"{name:28} {value:9.3f} {'':>9}")
            continue
        lower_is_better = name == "cached_vs_uncached_ttft"
        met = value <= target if lower_is_better else value >= target
        verdict = "yes" if met else "NO"
        # Batch-1 decode pairs spread by about +-5% on this VM: a shortfall under 3% is reported as such, not as met.
        if name == "engine_vs_core_b1_decode" and not met and value >= 0.97:
            verdict = "NO (within noise)"
        print(f"{name:28} {value:9.3f} {('<= ' if lower_is_better else '>= ') + format(target, 'g'):>9}  {verdict}")
    print(json.dumps({"bench": "throughput", "threads": args.threads, "dtype": args.dtype, "num_requests": N,
                      "prompt_len": P, "output_len": O, "results": rows, "ratios": ratios, "targets": TARGETS,
                      **extra}))


if __name__ == "__main__":
    main()
