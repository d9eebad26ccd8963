"""Tensor and expert parallelism over gloo with real worker processes: TP=2 (and TP=2 + EP) against TP=1 on tiny
dense and MoE checkpoints, with chunked prefill and preemption in the batch."""

from __future__ import annotations

import pytest
import torch

from ernie45 import LLM, SamplingParams
from ernie45.parallel import shutdown

U = 2.0**-24  # fp32 unit roundoff

# 16 prompts of 5..44 tokens: with a 64-token step budget the long ones prefill in chunks, and 40 blocks of 4 tokens
# cannot hold every sequence at once, so the scheduler preempts (asserted below).
PROMPTS = [{"prompt_token_ids": list(range(3, 3 + 5 + 7 * i % 40))} for i in range(16)]
ENGINE = {"max_num_batched_tokens": 64, "num_kv_blocks": 40, "block_size": 4, "max_model_len": 160}
GREEDY = SamplingParams(max_tokens=8, temperature=0)


def _recorded(llm: LLM) -> list[torch.Tensor]:
    """Every logits tensor the engine's model returns (rank 0's gathered logits under TP)."""
    logits, compute = [], llm.model.compute_logits

    def record(hidden):
        out = compute(hidden)
        logits.append(out.detach().clone())
        return out

    llm.model.compute_logits = record
    return logits


def _logits_tolerance(config, logits: list[torch.Tensor]) -> float:
    """TP=2 evaluates the same fp32 function with each row-parallel reduction (o_proj over Q*D columns, down_proj
    over I, the MoE experts' weighted sum) split into two partial sums added by the all-reduce. Either order of a
    length-n fp32 sum is within n*u*sum|terms| of the exact value, so the two differ by at most 2*n*u relative;
    2 such reductions per layer compound (first order) to 2 * 2L * n * u relative on the logits, taking
    sum|terms| ~ |result| (no catastrophic cancellation in random-weight layers)."""
    n = max(config.num_attention_heads * config.head_dim, config.intermediate_size, config.moe_intermediate_size,
            config.moe_k)
    scale = max(float(t.abs().max()) for t in logits)
    return 2 * (2 * config.num_hidden_layers) * n * U * scale


@pytest.mark.parametrize("kind, extra", [
    ("dense", {}),
    ("moe", {}),
    ("moe", {"enable_expert_parallel": True, "expert_placement": "round_robin"}),
], ids=["dense-tp2", "moe-tp2", "moe-tp2-ep2"])
def test_tp2_matches_tp1(kind, extra, tiny_dense_checkpoint, tiny_moe_checkpoint, one_thread):
    checkpoint = tiny_dense_checkpoint if kind == "dense" else tiny_moe_checkpoint
    single = LLM(str(checkpoint), **ENGINE)
    single_logits = _recorded(single)
    expected = single.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert single.engine.stats()["num_preemptions"] > 0  # the batch does exercise preemption

    tp = LLM(str(checkpoint), tensor_parallel_size=2, **ENGINE, **extra)
    try:
        tp_logits = _recorded(tp)
        got = tp.generate(PROMPTS, GREEDY, use_tqdm=False)
        assert tp.engine.stats()["num_preemptions"] == single.engine.stats()["num_preemptions"]
    finally:
        shutdown(tp.model)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    assert len(tp_logits) == len(single_logits)
    tolerance = _logits_tolerance(single.model.config, single_logits)
    worst = max(float((a - b).abs().max()) for a, b in zip(tp_logits, single_logits))
    assert worst <= tolerance, f"TP=2 logits differ by {worst:.3g} > {tolerance:.3g}"


def test_each_rank_holds_about_half(tiny_moe_checkpoint, one_thread):
    """Parameter bytes each rank holds, reported by the ranks themselves, against the whole model's."""
    whole = LLM(str(tiny_moe_checkpoint), **ENGINE)
    whole_bytes = sum(p.numel() * p.element_size() for p in whole.model.parameters())
    whole_kv = whole.engine.cache.k.numel() * whole.engine.cache.k.element_size() * 2
    tp = LLM(str(tiny_moe_checkpoint), tensor_parallel_size=2, **ENGINE)
    try:
        tp.generate(PROMPTS[:2], GREEDY, use_tqdm=False)  # the workers allocate their KV cache on the first step
        reports = tp.model.parallel_driver.report(tp.engine.cache)
    finally:
        shutdown(tp.model)
    assert [r["rank"] for r in reports] == [0, 1]
    for r in reports:
        assert r["weight_bytes"] <= 0.55 * whole_bytes, (r, whole_bytes)
        assert r["kv_cache_bytes"] == whole_kv // 2
        assert r["collectives"] > 0


def test_tp4_replicates_kv_heads(tiny_dense_checkpoint, one_thread):
    """4 ranks, 2 KV heads: each rank keeps the KV head its one query head reads; tokens still match TP=1."""
    prompts = PROMPTS[:6]
    expected = LLM(str(tiny_dense_checkpoint), **ENGINE).generate(prompts, GREEDY, use_tqdm=False)
    tp = LLM(str(tiny_dense_checkpoint), tensor_parallel_size=4, **ENGINE)
    try:
        assert tp.model.kv_heads_per_rank == 1
        got = tp.generate(prompts, GREEDY, use_tqdm=False)
    finally:
        shutdown(tp.model)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]


def test_tp2_prompt_logprobs_and_ngram_drafts(tiny_moe_checkpoint, one_thread):
    """The other model calls an engine makes: prompt-position logits (one compute_logits per request) and n-gram
    draft verification (k + 1 logits rows per request) mirror to the workers like any step."""
    prompts = [{"prompt_token_ids": [5, 6, 7, 8] * 4}, {"prompt_token_ids": [9, 10, 11] * 5}]
    params = SamplingParams(max_tokens=10, temperature=0, prompt_logprobs=1)
    spec = {"speculative_config": {"method": "ngram", "num_speculative_tokens": 3}}
    single = LLM(str(tiny_moe_checkpoint), **ENGINE, **spec)
    single_logits = _recorded(single)
    expected = single.generate(prompts, params, use_tqdm=False)
    # log_softmax moves each logprob by at most |d logit_i| + max_j |d logit_j|: twice the logits' bound.
    tolerance = 2 * _logits_tolerance(single.model.config, single_logits)
    tp = LLM(str(tiny_moe_checkpoint), tensor_parallel_size=2, **ENGINE, **spec)
    try:
        got = tp.generate(prompts, params, use_tqdm=False)
        assert tp.engine.stats()["spec_decode_num_draft_tokens"] > 0
    finally:
        shutdown(tp.model)
    for a, b in zip(got, expected):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        pairs = [(x, y) for x, y in zip(a.prompt_logprobs, b.prompt_logprobs) if x is not None]
        assert pairs and all(x.token_id == y.token_id and abs(x.logprob - y.logprob) <= tolerance
                             for x, y in pairs)
