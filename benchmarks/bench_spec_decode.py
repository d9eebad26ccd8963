"""Decode speed with n-gram speculative decoding vs without, same process, rounds alternating.

Workload: "continue a text that repeats" (editing / quoting a given text): the prompt is a passage followed by its
first sentence again, so a model that copies finds its next tokens in the prompt. Greedy, eos ignored. Two `LLM`s
on the same weights (with and without `speculative_config`), batch 1 and 8 concurrent; decode tok/s = output tokens
after the first / (finish - first token) per request, summed over the concurrent requests. Prints per-round ratios,
medians, the acceptance rate and mean accepted length, and one JSON line.

    python benchmarks/bench_spec_decode.py [CHECKPOINT] [--rounds 3] [--output-len 128] [--k 4] [--threads 2]

CHECKPOINT: default the embedded default model; a 0.3B-shape one from benchmarks/make_random_checkpoint.py
measures a memory-bound model (its random weights copy only as far as their greedy loops repeat).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from ernie45.bench import cpu_description
from ernie45.engine import LLM, SamplingParams

PASSAGE = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")[:1500]


def decode_tok_s(outputs) -> float:
    rates = []
    for out in outputs:
        m = out.metrics
        rates.append((len(out.outputs[0].token_ids) - 1) / (m.finish_time - m.first_token_time))
    return sum(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    common = dict(max_model_len=2048, enable_prefix_caching=False)
    plain = LLM(args.model, **common)
    spec_config = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": 4,
                   "disable_by_batch_size": None}
    spec = LLM(args.model, speculative_config=spec_config, **common)
    tok = plain.engine.tokenizer
    passage_ids = tok.encode(PASSAGE)[:400]
    first_sentence = passage_ids[:24]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    print(f"# {cpu_description()}, {args.threads} threads, model {args.model or 'default'}, k={args.k}, "
          f"prompt {len(passage_ids) + len(first_sentence)} tokens, {args.output_len} output tokens")
    results = {}
    for batch in args.batches:
        # Each request its own passage window, so concurrent requests are not identical.
        prompts = [{"prompt_token_ids": passage_ids[i * 7:] + passage_ids[i * 7:i * 7 + 24]} for i in range(batch)]
        for llm in (plain, spec):
            llm.generate(prompts, params, use_tqdm=False)  # warm-up
        ratios, rates = [], {"plain": [], "spec": []}
        before = dict(spec.engine.spec_stats.as_dict())
        same = True
        for r in range(args.rounds):
            order = [("plain", plain), ("spec", spec)]
            round_rates, tokens = {}, {}
            for name, llm in order if r % 2 == 0 else order[::-1]:
                outs = llm.generate(prompts, params, use_tqdm=False)
                round_rates[name] = decode_tok_s(outs)
                tokens[name] = [o.outputs[0].token_ids for o in outs]
            same = same and tokens["plain"] == tokens["spec"]
            for name in rates:
                rates[name].append(round_rates[name])
            ratios.append(round_rates["spec"] / round_rates["plain"])
            print(f"batch {batch} round {r}: plain {round_rates['plain']:6.1f} tok/s, speculative "
                  f"{round_rates['spec']:6.1f} tok/s, ratio {ratios[-1]:.2f}")
        after = spec.engine.spec_stats.as_dict()
        drafts = after["spec_decode_num_drafts"] - before["spec_decode_num_drafts"]
        draft_tokens = after["spec_decode_num_draft_tokens"] - before["spec_decode_num_draft_tokens"]
        accepted = after["spec_decode_num_accepted_tokens"] - before["spec_decode_num_accepted_tokens"]
        acceptance = accepted / draft_tokens if draft_tokens else 0.0
        mean_len = 1 + accepted / drafts if drafts else 0.0
        results[f"batch{batch}"] = {"plain_tok_s": statistics.median(rates["plain"]),
                                    "spec_tok_s": statistics.median(rates["spec"]),
                                    "speedup_median": statistics.median(ratios), "acceptance_rate": acceptance,
                                    "mean_accepted_length": mean_len, "greedy_tokens_identical": same}
        print(f"batch {batch} median speedup {statistics.median(ratios):.2f}x, acceptance {acceptance:.1%}, mean "
              f"accepted length {mean_len:.2f} (of {args.k + 1}), greedy tokens identical: {same}")
    print(json.dumps({"cpu": cpu_description(), "model": args.model or "default", "k": args.k, **results}))


if __name__ == "__main__":
    main()
