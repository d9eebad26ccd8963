"""The engine's greedy output equals the plain model's, whatever the batching, chunking and preemption."""

import random

import pytest
import torch

import ernie45
from ernie45.engine import EngineConfig, LLMEngine, SamplingParams

MAX_TOKENS = 10


def greedy_reference(model, prompt_ids: list[int], steps: int) -> list[int]:
    """Cache-free greedy decoding: one full forward per token."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids], device=model.device))[0, -1].argmax()))
    return ids[len(prompt_ids):]


def mixed_prompts(vocab: int, count: int = 16, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [3, 300, 17, 64, 5, 129, 33, 250, 8, 16, 47, 200, 90, 31, 12, 160][:count]
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def run_outputs(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> dict:
    """Request id ("0", "1", ...) -> its final RequestOutput."""
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": ids}, params)
    results = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out
    return results


def run_engine(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> dict[str, list[int]]:
    return {key: out.outputs[0].token_ids for key, out in run_outputs(engine, prompts, params).items()}


SETTINGS = {
    "default": dict(),
    "tiny_token_budget": dict(max_num_batched_tokens=16),  # forces chunked prefill and mixed batches
    "tiny_kv_pool": dict(max_model_len=320, num_kv_blocks=24, block_size=16),  # forces preemption
}


DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible); run on a GPU machine"),
])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("kind", ["moe", "dense"])
def test_greedy_equals_plain_model(setting, kind, device, tiny_moe_checkpoint, tiny_dense_checkpoint):
    path = tiny_moe_checkpoint if kind == "moe" else tiny_dense_checkpoint
    model, tok = ernie45.load_model(path, device=device), ernie45.load_tokenizer(path)
    engine = LLMEngine(model, tok, EngineConfig(**SETTINGS[setting]))
    prompts = mixed_prompts(model.config.vocab_size)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    got = run_engine(engine, prompts, params)
    for i, ids in enumerate(prompts):
        assert got[str(i)] == greedy_reference(model, ids, MAX_TOKENS), f"prompt {i} ({len(ids)} tokens)"
    if setting == "tiny_kv_pool":
        assert engine.scheduler.num_preemptions > 0
    assert engine.block_manager.num_free_blocks == engine.num_kv_blocks  # everything returned
    if device == "cpu":
        # Decode-only steps of the dense model ran every layer in one C call (models/fused_decode.py); MoE declined.
        plans = engine.cache.fused_plans.values()
        assert any(p is not None for p in plans) == (kind == "dense") and len(plans) > 0
    engine.block_manager.check_invariants()


def test_prefix_cache_hit_gives_same_output(tiny_moe_checkpoint):
    model, tok = ernie45.load_model(tiny_moe_checkpoint), ernie45.load_tokenizer(tiny_moe_checkpoint)
    engine = LLMEngine(model, tok, EngineConfig())
    prompt = mixed_prompts(model.config.vocab_size)[1]  # 300 tokens
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    first = run_engine(engine, [prompt], params)["0"]
    hits_before = engine.block_manager.prefix_cache_hits
    engine.add_request("again", {"prompt_token_ids": prompt}, params)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.finished]
    assert outputs[0].outputs[0].token_ids == first
    assert engine.block_manager.prefix_cache_hits - hits_before == (300 // 16) * 16
    assert outputs[0].metrics.num_cached_tokens == (300 // 16) * 16


def test_n2_shares_prompt_blocks(tiny_moe_checkpoint):
    model, tok = ernie45.load_model(tiny_moe_checkpoint), ernie45.load_tokenizer(tiny_moe_checkpoint)
    engine = LLMEngine(model, tok, EngineConfig())
    prompt = mixed_prompts(model.config.vocab_size)[3]  # 64 tokens = 4 full blocks
    engine.add_request("pair", {"prompt_token_ids": prompt}, SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=5))
    shared = None
    while engine.has_unfinished_requests():
        engine.step()
        bm = engine.block_manager
        if bm.has_request("pair-0") and bm.has_request("pair-1"):
            shared = set(bm.block_table("pair-0")[:3]) & set(bm.block_table("pair-1")[:3])
            break
    assert shared and len(shared) == 3  # the full prompt blocks before the one the second sample recomputes


def test_abort_frees_everything(tiny_moe_checkpoint):
    model, tok = ernie45.load_model(tiny_moe_checkpoint), ernie45.load_tokenizer(tiny_moe_checkpoint)
    engine = LLMEngine(model, tok, EngineConfig())
    for i, ids in enumerate(mixed_prompts(model.config.vocab_size, 6)):
        engine.add_request(str(i), {"prompt_token_ids": ids}, SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    for i in range(6):
        out = engine.abort_request(str(i))
        assert out.finished and out.outputs[0].finish_reason == "abort"
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.num_kv_blocks
    engine.block_manager.check_invariants()


def test_prompt_too_long_is_refused(tiny_moe_checkpoint):
    model, tok = ernie45.load_model(tiny_moe_checkpoint), ernie45.load_tokenizer(tiny_moe_checkpoint)
    engine = LLMEngine(model, tok, EngineConfig(max_model_len=64))
    with pytest.raises(ValueError, match="the prompt has 64 tokens, but max_model_len is 64"):
        engine.add_request("long", {"prompt_token_ids": [5] * 64})
    with pytest.raises(ValueError, match="KV cache holds 2 blocks x 16 = 32 tokens, fewer than max_model_len=64"):
        LLMEngine(model, tok, EngineConfig(max_model_len=64, num_kv_blocks=2))


def test_stats_report_cache_hits_and_usage(tiny_moe_checkpoint):
    model, tok = ernie45.load_model(tiny_moe_checkpoint), ernie45.load_tokenizer(tiny_moe_checkpoint)
    engine = LLMEngine(model, tok, EngineConfig())
    prompt = mixed_prompts(model.config.vocab_size)[3]  # 64 tokens
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    run_engine(engine, [prompt, prompt], params)  # the second is admitted in the same step: no hit yet
    run_engine(engine, [prompt], params)
    stats = engine.stats()
    assert stats["prefix_cache_hits"] == 48 and stats["prefix_cache_queries"] == 3 * 64
    assert stats["kv_cache_usage_perc"] == 0.0 and stats["num_free_kv_blocks"] == engine.num_kv_blocks
    assert stats["prompt_tokens_total"] == 3 * 64 and stats["generation_tokens_total"] == 6


def test_request_ids_never_collide_with_fanned_out_samples(tiny_moe_checkpoint):
    model, tok = ernie45.load_model(tiny_moe_checkpoint), ernie45.load_tokenizer(tiny_moe_checkpoint)
    engine = LLMEngine(model, tok, EngineConfig())
    engine.add_request("x-0", {"prompt_token_ids": [5, 6]})
    with pytest.raises(ValueError, match="request id 'x' is already in use"):
        engine.add_request("x", {"prompt_token_ids": [5, 6]}, SamplingParams(n=2))
    engine.abort_request("x-0")
    engine.add_request("x", {"prompt_token_ids": [5, 6]}, SamplingParams(n=2))  # free again once x-0 is gone
    assert engine.has_unfinished_requests()
