"""Decode speed with a grammar vs without, in the same process, and the grammar compile time.

Each round runs, in alternating order, the same batch of random prompts unconstrained (eos ignored) and constrained
by a JSON schema whose output is long (an array of bounded strings), greedy, one `LLM` for both. Decode tok/s =
output tokens after the first / (finish - first token), summed over the batch's requests, from the engine's own
metrics, so prefill is left out. Prints per-round ratios and medians at batch 1 and 16, the compile time of a
typical schema (cold and from the cache) and of the vocabulary scan; one JSON line at the end.

    python benchmarks/bench_structured_output.py CHECKPOINT [--rounds 3] [--input-len 64] [--output-len 128]
        [--threads 2]

CHECKPOINT: e.g. one written by benchmarks/make_random_checkpoint.py (ERNIE-4.5-0.3B shape).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from ernie45.bench import cpu_description
from ernie45.engine import LLM, SamplingParams
from ernie45.engine.structured_output import StructuredOutputsParams
from ernie45.engine.structured_output.xgrammar_backend import XgrammarBackend

# Long outputs: up to 64 strings of up to 12 characters, compact (no optional whitespace).
LONG_SCHEMA = {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 64, "maxItems": 64}
# A typical API schema (nested object, enums, arrays, bounds) for the compile time.
TYPICAL_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "format": "email"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 10},
        "address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["street", "city"]},
        "scores": {"type": "array", "items": {"type": "number"}},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address", "active"],
}


def decode_tok_s(outputs) -> tuple[float, int]:
    tokens, seconds = 0, 0.0
    for out in outputs:
        m = out.metrics
        tokens += len(out.outputs[0].token_ids) - 1
        seconds += m.finish_time - m.first_token_time
    return tokens / seconds * len(outputs), tokens  # requests run concurrently: per-request rates add up


def run(llm: LLM, prompts, params: SamplingParams):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def compile_times(llm: LLM) -> dict[str, float]:
    engine = llm.engine
    start = time.perf_counter()
    backend = XgrammarBackend(engine.tokenizer, engine.model.config.vocab_size, sorted(engine.eos_token_ids))
    scan = time.perf_counter() - start
    params = StructuredOutputsParams(json=TYPICAL_SCHEMA)
    start = time.perf_counter()
    backend.grammar_for(params)
    cold = time.perf_counter() - start
    same = StructuredOutputsParams(json=json.loads(json.dumps(TYPICAL_SCHEMA)))  # an equal schema, a new object
    start = time.perf_counter()
    backend.grammar_for(same)
    cached = time.perf_counter() - start
    # What every request pays in the API process: the schema checked and turned into a grammar, no tokenizer.
    start = time.perf_counter()
    StructuredOutputsParams(json=TYPICAL_SCHEMA)
    admission = time.perf_counter() - start
    return {"vocab_scan_ms": scan * 1e3, "compile_cold_ms": cold * 1e3, "compile_cached_ms": cached * 1e3,
            "admission_check_ms": admission * 1e3}


def sampler_cost(llm: LLM, batches: list[int], repeats: int = 200) -> dict[str, float]:
    """Per-step milliseconds the grammar adds on the sampling side (mask fill + bitmask + sampler), isolated from the
    model's forward, whose speed drifts more between rounds than the whole overhead."""
    from ernie45.engine.sampler import Sampler, SamplingRow

    engine = llm.engine
    vocab = engine.model.config.vocab_size
    backend = XgrammarBackend(engine.tokenizer, vocab, sorted(engine.eos_token_ids))
    params = StructuredOutputsParams(json=LONG_SCHEMA, disable_any_whitespace=True)
    out = {}
    for batch in batches:
        grammars = [backend.grammar_for(params) for _ in range(batch)]
        for grammar in grammars:
            for token in engine.tokenizer.encode('["ab'):
                grammar.accept_token(token)
        logits = torch.randn(batch, vocab)
        sampler = Sampler()
        free_rows = [SamplingRow(SamplingParams(temperature=0)) for _ in range(batch)]

        def constrained_step():
            mask = backend.allocate_bitmask(batch)
            for i, grammar in enumerate(grammars):
                grammar.fill_bitmask(mask, i)
            sampler(logits, [SamplingRow(SamplingParams(temperature=0), token_bitmask=mask[i]) for i in range(batch)])

        timings = {}
        for name, step in (("free", lambda: sampler(logits, free_rows)), ("constrained", constrained_step)):
            step()
            start = time.perf_counter()
            for _ in range(repeats):
                step()
            timings[name] = (time.perf_counter() - start) / repeats * 1e3
        out[f"batch{batch}_sampling_added_ms"] = timings["constrained"] - timings["free"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(args.model, max_model_len=args.input_len + args.output_len + 16, max_num_seqs=max(args.batches))
    rng = random.Random(0)
    free = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    constrained = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True,
                                 structured_outputs={"json": LONG_SCHEMA, "disable_any_whitespace": True})
    print(f"# {cpu_description()}, {args.threads} threads, vocab {llm.engine.model.config.vocab_size} "
          f"(tokenizer {len(llm.engine.tokenizer)})")
    results = {}
    for batch in args.batches:
        prompts = [[rng.randrange(100, 8000) for _ in range(args.input_len)] for _ in range(batch)]
        run(llm, prompts, free)  # warm-up, not measured
        run(llm, prompts, constrained)
        ratios, free_rates, constrained_rates = [], [], []
        for r in range(args.rounds):
            order = [("free", free), ("constrained", constrained)]
            rates = {}
            for name, params in order if r % 2 == 0 else order[::-1]:
                rates[name], tokens = decode_tok_s(run(llm, prompts, params))
                rates[name + "_tokens"] = tokens
            free_rates.append(rates["free"])
            constrained_rates.append(rates["constrained"])
            ratios.append(rates["constrained"] / rates["free"])
            print(f"batch {batch:2d} round {r}: free {rates['free']:7.1f} tok/s ({rates['free_tokens']} tokens), "
                  f"constrained {rates['constrained']:7.1f} tok/s ({rates['constrained_tokens']} tokens), "
                  f"ratio {ratios[-1]:.3f}")
        results[f"batch{batch}"] = {"free_tok_s": statistics.median(free_rates),
                                    "constrained_tok_s": statistics.median(constrained_rates),
                                    "ratio_median": statistics.median(ratios),
                                    "overhead_pct": (1 - statistics.median(ratios)) * 100}
        print(f"batch {batch:2d} median: constrained / free = {statistics.median(ratios):.3f} "
              f"(overhead {(1 - statistics.median(ratios)) * 100:.1f}%)")
    added = sampler_cost(llm, args.batches)
    for batch in args.batches:
        print(f"batch {batch:2d}: the grammar adds {added[f'batch{batch}_sampling_added_ms']:.2f} ms per step on the "
              f"sampling side (mask fill, bitmask, sampler), measured alone")
    times = compile_times(llm)
    print(f"typical schema: vocabulary scan {times['vocab_scan_ms']:.0f} ms (once per engine), compile "
          f"{times['compile_cold_ms']:.1f} ms cold, {times['compile_cached_ms']:.3f} ms from the cache, admission "
          f"check {times['admission_check_ms']:.1f} ms per request")
    print(json.dumps({"cpu": cpu_description(), **results, **added, **times}))


if __name__ == "__main__":
    main()
