"""Decode speed with speculative decoding (n-gram, MTP, MTP + n-gram) vs without, same process, rounds alternating.

Workloads: "repeat" continues a text that repeats (editing / quoting a given text): the prompt is a passage followed
by its first sentence again, so a model that copies finds its next tokens in the prompt; eos ignored. "chat" asks
the default model's kind of questions (arithmetic, counting, conversions, quotes) in thinking mode and lets it answer
to its end. Greedy. Two `LLM`s on the same weights (with and without `speculative_config`), batch 1 and 8
concurrent; decode tok/s = output tokens after the first / (finish - first token) per request, summed over the
concurrent requests. Prints per-round ratios, medians, the acceptance rate and mean accepted length, and one JSON
line.

    python benchmarks/bench_spec_decode.py [CHECKPOINT] [--method ngram|mtp|mtp_ngram] [--workload repeat|chat]
        [--rounds 3] [--output-len 128] [--k 4] [--threads 2]
    python benchmarks/bench_spec_decode.py [CHECKPOINT] --mtp-variants

--mtp-variants measures, teacher-forced on the model's own greedy chat answers, how often the MTP head's first draft
is right under each of its four input/output conventions (pre- or post-norm hidden state in, final norm before the
LM head or not: wave2-facts 1.2): the figure that picks `mtp_hidden_state` / `mtp_final_norm` for a checkpoint.

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
QUESTIONS = ["What is 974 + 504?", "How many days are in 2 weeks?", "Tell me a quote about life.",
             "How many times does 6 appear in: 8 3 1 6 3 5 0 1 6 6?", "What is 318 + 45?", "计算 56 + 77。",
             "How many minutes are in 3 hours?", "Give me a quote about friendship.", "What is 1234 + 4321?",
             "数一数 2 在 2 5 2 9 2 1 中出现几次？", "How many grams are in 4 kilograms?", "Say something wise.",
             "What is 88 + 12?", "How many seconds are in 5 minutes?", "What is 605 + 397?", "给我一句名言。"]


def chat_prompts(tok, count: int) -> list[dict]:
    return [{"prompt_token_ids": tok.apply_chat_template(
        [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], add_generation_prompt=True, tokenize=True,
        enable_thinking=True)} for i in range(count)]


@torch.no_grad()
def mtp_variant_acceptance(llm, prompts: list[dict], max_tokens: int) -> dict[str, float]:
    """Share of positions of the model's greedy answers where the MTP head's argmax for token p + 2 (reading the
    hidden state at p and token p + 1) is the token the model generated, per variant."""
    model = llm.engine.model
    inner = model.model
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)
    hits = {f"{h}+{'norm' if n else 'no_norm'}": [0, 0] for h in ("pre_norm", "post_norm") for n in (True, False)}
    for prompt, out in zip(prompts, outs):
        ids = prompt["prompt_token_ids"] + out.outputs[0].token_ids
        first = len(prompt["prompt_token_ids"]) - 1  # positions whose t + 2 is a generated token
        x = torch.tensor([ids[:-1]])
        hidden = model.forward_hidden(x)[0]
        for hidden_kind in ("pre_norm", "post_norm"):
            h = hidden if hidden_kind == "pre_norm" else inner.norm(hidden)
            y = inner.mtp_forward(torch.tensor([ids[1:]]), h[None], torch.arange(len(ids) - 1)[None])[0]
            for final_norm in (True, False):
                logits = model.lm_head(inner.norm(y) if final_norm else y)
                predicted = logits[first:-1].argmax(-1)
                target = torch.tensor(ids[first + 2:])
                hit = hits[f"{hidden_kind}+{'norm' if final_norm else 'no_norm'}"]
                hit[0] += int((predicted == target).sum())
                hit[1] += len(target)
    return {name: h / max(n, 1) for name, (h, n) in hits.items()}


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
    parser.add_argument("--k", type=int, default=None, help="num_speculative_tokens (default: the method's)")
    parser.add_argument("--method", default="ngram", choices=["ngram", "mtp", "mtp_ngram"])
    parser.add_argument("--workload", default="repeat", choices=["repeat", "chat"])
    parser.add_argument("--mtp-variants", action="store_true", help="teacher-forced acceptance of the 4 MTP variants")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    common = dict(max_model_len=2048, enable_prefix_caching=False)
    plain = LLM(args.model, **common)
    tok = plain.engine.tokenizer
    if args.mtp_variants:
        rates = mtp_variant_acceptance(plain, chat_prompts(tok, 16), args.output_len)
        for name, rate in rates.items():
            print(f"MTP variant {name:18s}: first-draft acceptance {rate:.1%} (teacher-forced)")
        print(json.dumps({"cpu": cpu_description(), "model": args.model or "default", "mtp_variants": rates}))
        return
    spec_config = {"method": args.method, "num_speculative_tokens": args.k, "prompt_lookup_max": 4,
                   "disable_by_batch_size": None}
    spec = LLM(args.model, speculative_config=spec_config, **common)
    k = spec.engine.speculative_config.num_speculative_tokens
    passage_ids = tok.encode(PASSAGE)[:400]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=args.workload == "repeat")
    print(f"# {cpu_description()}, {args.threads} threads, model {args.model or 'default'}, method {args.method}, "
          f"k={k}, workload {args.workload}, at most {args.output_len} output tokens")
    results = {}
    for batch in args.batches:
        if args.workload == "repeat":
            # Each request its own passage window, so concurrent requests are not identical.
            prompts = [{"prompt_token_ids": passage_ids[i * 7:] + passage_ids[i * 7:i * 7 + 24]}
                       for i in range(batch)]
        else:
            prompts = chat_prompts(tok, batch)
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
              f"accepted length {mean_len:.2f} (of {k + 1}), greedy tokens identical: {same}")
    print(json.dumps({"cpu": cpu_description(), "model": args.model or "default", "method": args.method, "k": k,
                      "workload": args.workload, **results}))


if __name__ == "__main__":
    main()
