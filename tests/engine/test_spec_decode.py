"""Speculative decoding (n-gram): lossless verification, greedy output identical to decoding without drafts under
every engine feature, the sampled distribution preserved, KV returned, config errors."""

from __future__ import annotations

import math
import random

import pytest
import torch

import ernie45
from ernie45.engine import EngineConfig, LLMEngine, SamplingParams
from ernie45.engine.sampler import Sampler, SamplingRow
from ernie45.engine.spec_decode import SpeculativeConfig, propose_ngram, verify

from .test_engine_vs_model import SETTINGS
from .test_engine_vs_model import run_outputs as run

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "disable_by_batch_size": None}


def chi_square_critical(df: int, z: float = 3.29) -> float:
    """Wilson-Hilferty: the chi-square quantile at normal quantile z (3.29: p = 0.0005, one-sided)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi_square(counts: list[int], probs: list[float]) -> tuple[float, int]:
    """Pearson's statistic of counts against probabilities, bins with an expected count under 5 pooled."""
    total = sum(counts)
    stat, df, pool_obs, pool_exp = 0.0, -1, 0, 0.0
    for observed, p in zip(counts, probs):
        expected = total * p
        if expected < 5:
            pool_obs, pool_exp = pool_obs + observed, pool_exp + expected
            continue
        stat += (observed - expected) ** 2 / expected
        df += 1
    if pool_exp > 0:
        stat += (pool_obs - pool_exp) ** 2 / max(pool_exp, 1e-12)
        df += 1
    return stat, df


def test_propose_ngram_takes_the_latest_longest_match():
    assert propose_ngram([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], 2, 1, 3) == [7, 1]
    assert propose_ngram([5, 6, 7], 3, 1, 2) == []
    assert propose_ngram([4, 4], 3, 1, 2) == [4]  # the tail token itself repeats
    assert propose_ngram([1, 2, 3, 1], 5, 1, 1) == [2, 3, 1]
    assert propose_ngram([7, 5, 5, 5, 5], 3, 1, 1) == [5, 5, 5]  # a loop drafts k tokens, not one


def test_greedy_verification_accepts_the_matching_prefix():
    logits = torch.full((4, 10), -5.0)
    for j, t in enumerate([3, 4, 8, 6]):
        logits[j, t] = 5.0
    row = SamplingRow(SamplingParams(temperature=0))
    assert verify(Sampler(), logits, row, [3, 4, 5]).token_ids == [3, 4, 8]
    out = verify(Sampler(), logits, row, [3, 4, 8])
    assert out.token_ids == [3, 4, 8, 6] and out.num_accepted == 3  # all accepted: the bonus token
    assert verify(Sampler(), logits, row, [1, 4, 8]).token_ids == [3]


def test_sampled_verification_keeps_the_model_distribution():
    """First token ~ p0 whatever the draft; given the draft was accepted, the next ~ p1 (one-sample chi-square,
    6,000 seeded draws on a 6-token vocabulary, each probability checked against the exact softmax)."""
    logits = torch.tensor([[1.0, 0.2, -0.5, 0.7, 0.0, -1.0], [0.3, -0.2, 1.2, 0.0, -0.7, 0.5]])
    p0, p1 = logits.softmax(-1).tolist()
    draft = 3
    first, second = [0] * 6, [0] * 6
    sampler = Sampler()
    for seed in range(6000):
        row = SamplingRow(SamplingParams(temperature=1.0), generator=torch.Generator().manual_seed(seed))
        out = verify(sampler, logits, row, [draft])
        first[out.token_ids[0]] += 1
        if out.num_accepted == 1:
            second[out.token_ids[1]] += 1
    for counts, probs in ((first, p0), (second, p1)):
        stat, df = chi_square(counts, probs)
        assert stat < chi_square_critical(df), (counts, probs, stat)


def repetitive_prompts(vocab: int, count: int, seed: int = 0) -> list[list[int]]:
    """Prompts that repeat a random phrase, so that n-gram drafts find matches (and some get rejected)."""
    rng = random.Random(seed)
    prompts = []
    for i in range(count):
        phrase = [rng.randrange(3, vocab) for _ in range(rng.randrange(3, 9))]
        prompts.append((phrase * 40)[: [9, 150, 40, 70, 20, 120, 33, 90][i % 8]])
    return prompts


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_greedy_output_is_identical_with_and_without_drafts(kind, setting, tiny_dense_checkpoint,
                                                           tiny_moe_checkpoint):
    path = tiny_dense_checkpoint if kind == "dense" else tiny_moe_checkpoint
    model, tok = ernie45.load_model(path), ernie45.load_tokenizer(path)
    prompts = repetitive_prompts(model.config.vocab_size, 16)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    plain = run(LLMEngine(model, tok, EngineConfig(**SETTINGS[setting])), prompts, params)
    engine = LLMEngine(model, tok, EngineConfig(**SETTINGS[setting], speculative_config=NGRAM))
    spec = run(engine, prompts, params)
    for i in range(len(prompts)):
        a, b = plain[str(i)].outputs[0], spec[str(i)].outputs[0]
        assert b.token_ids == a.token_ids, f"prompt {i}"
        # Logprobs come from a k + 1-row forward instead of a 1-row one: equal up to fp32 summation order
        # (|logit| < ~10 over a few-hundred-term dot products: well under 1e-3).
        for x, y in zip(a.logprobs, b.logprobs):
            assert abs(x.logprob - y.logprob) < 1e-3 and [t for t, _ in x.top] == [
                t for t, _ in y.top]
    stats = engine.stats()
    assert sum(out.metrics.num_draft_tokens for out in spec.values()) == stats["spec_decode_num_draft_tokens"]
    assert sum(out.metrics.num_accepted_tokens for out in spec.values()) == stats["spec_decode_num_accepted_tokens"]
    assert stats["spec_decode_num_draft_tokens"] > 0
    assert 0 < stats["spec_decode_num_accepted_tokens"] < stats["spec_decode_num_draft_tokens"]
    if setting == "tiny_kv_pool":
        assert engine.scheduler.num_preemptions > 0
    assert engine.block_manager.num_free_blocks == engine.num_kv_blocks


def test_stop_strings_n_and_thinking_budget_with_drafts(tiny_dense_checkpoint):
    model, tok = ernie45.load_model(tiny_dense_checkpoint), ernie45.load_tokenizer(tiny_dense_checkpoint)
    prompts = repetitive_prompts(model.config.vocab_size, 4, seed=3)
    think = tok.token_to_id("<think>")
    prompts = [ids + [think] for ids in prompts]
    params = SamplingParams(n=2, temperature=0, max_tokens=30, reasoning_max_tokens=6, ignore_eos=True)
    plain = run(LLMEngine(model, tok, EngineConfig()), prompts, params)
    engine = LLMEngine(model, tok, EngineConfig(speculative_config=NGRAM))
    spec = run(engine, prompts, params)
    for key, out in plain.items():
        assert [c.token_ids for c in spec[key].outputs] == [c.token_ids for c in out.outputs]
        assert "</think>" in out.outputs[0].text
    # A stop string inside accepted drafts ends the text at the same place.
    text = plain["0"].outputs[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    if stop.strip():
        stopped = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop])
        a = run(LLMEngine(model, tok, EngineConfig()), prompts[:1], stopped)["0"].outputs[0]
        b = run(LLMEngine(model, tok, EngineConfig(speculative_config=NGRAM)), prompts[:1], stopped)["0"].outputs[0]
        assert (a.text, a.finish_reason) == (b.text, b.finish_reason)
    assert engine.block_manager.num_free_blocks == engine.num_kv_blocks


def test_drafting_stops_above_the_batch_size_limit(tiny_dense_checkpoint):
    model, tok = ernie45.load_model(tiny_dense_checkpoint), ernie45.load_tokenizer(tiny_dense_checkpoint)
    prompts = repetitive_prompts(model.config.vocab_size, 8)
    engine = LLMEngine(model, tok, EngineConfig(speculative_config={**NGRAM, "disable_by_batch_size": 2}))
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=8))
    while len(engine.scheduler.running) + len(engine.scheduler.waiting) > 2:
        engine.step()
        if len(engine.scheduler.running) > 2:
            assert all(not r.spec_token_ids for r in engine.scheduler.running)
    while engine.has_unfinished_requests():
        engine.step()


@pytest.mark.parametrize(("config", "match"), [
    ({"method": "eagle"}, "method must be one of"),
    ({"num_speculative_tokens": 0}, "num_speculative_tokens must be an integer >= 1"),
    ({"prompt_lookup_min": 3, "prompt_lookup_max": 2}, "prompt_lookup_min"),
    ({"num_speculative_token": 2}, "unknown field 'num_speculative_token'"),
    ("{bad json", "not valid JSON"),
])
def test_bad_speculative_config_names_the_field(config, match):
    with pytest.raises(ValueError, match=match):
        SpeculativeConfig.of(config)
    if isinstance(config, dict):
        with pytest.raises(ValueError, match=match):
            EngineConfig(speculative_config=config)
