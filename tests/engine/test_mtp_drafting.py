"""MTP drafting (engine/spec_decode/mtp_proposer.py): the engine's drafts equal the MTP head run on the whole
sequence without a cache, greedy output is identical with and without MTP drafts under every engine feature, and
the errors a user can hit."""

from __future__ import annotations

import pytest
import torch

import ernie45
from ernie45.default_model import default_model_path
from ernie45.engine import EngineConfig, LLMEngine, SamplingParams
from ernie45.models import Ernie45Config
from ernie45.training.init_model import init_checkpoint

from .test_engine_vs_model import SETTINGS
from .test_engine_vs_model import run_outputs as run
from .test_spec_decode import repetitive_prompts

MARGIN = 1e-3
"""Reference drafts closer than this to a tie are not compared: the engine computes the same logits in another
summation order (chunked, paged), which moves fp32 logits of this tiny model by ~1e-5, so it may break a near tie
the other way; 1e-3 is a hundred times that."""


@pytest.fixture(scope="module", params=["dense", "moe"])
def mtp_checkpoint(request, tmp_path_factory, tiny_dense_checkpoint, tiny_moe_checkpoint):
    base = tiny_dense_checkpoint if request.param == "dense" else tiny_moe_checkpoint
    out = tmp_path_factory.mktemp("mtp") / request.param
    return init_checkpoint(Ernie45Config.from_file(base), base, out, seed=5, num_mtp_layers=1)


def reference_drafts(model, token_ids: list[int], k: int, post_norm: bool = False) -> list[tuple[int, float]]:
    """(draft, top-2 logit margin) of k greedy MTP drafts continuing `token_ids`, the head run over the whole
    sequence with plain causal attention: position p reads the main model's hidden state at p and token p + 1;
    draft j > 0 comes from position e - 1 + j reading the head's own previous output."""
    inner = model.model
    e = len(token_ids) - 1
    with torch.no_grad():
        hidden = model.forward_hidden(torch.tensor([token_ids[:e]]))[0]
        as_input = inner.norm if post_norm else (lambda h: h)
        hiddens, ids, drafts = as_input(hidden), list(token_ids[1:]), []
        for _ in range(k):
            out = inner.mtp_forward(torch.tensor([ids]), hiddens[None], torch.arange(len(ids))[None])[0]
            top = model.lm_head(inner.norm(out[-1])).topk(2)
            drafts.append((int(top.indices[0]), float(top.values[0] - top.values[1])))
            hiddens = torch.cat([hiddens, as_input(out[-1:])])
            ids.append(drafts[-1][0])
    return drafts


@pytest.mark.parametrize("setting", SETTINGS)
def test_engine_drafts_equal_the_head_run_on_the_whole_sequence(setting, mtp_checkpoint):
    model, tok = ernie45.load_model(mtp_checkpoint), ernie45.load_tokenizer(mtp_checkpoint)
    spec = {"method": "mtp", "num_speculative_tokens": 2, "disable_by_batch_size": None}
    engine = LLMEngine(model, tok, EngineConfig(**SETTINGS[setting], enable_prefix_caching=False,
                                                speculative_config=spec))
    for i, ids in enumerate(repetitive_prompts(model.config.vocab_size, 16, seed=1)):
        engine.add_request(str(i), {"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=12,
                                                                             ignore_eos=True))
    compared = skipped = 0
    while engine.has_unfinished_requests():
        engine.step()
        for request in engine.scheduler.running:
            if not request.spec_token_ids or request.num_computed_tokens != request.num_tokens - 1:
                continue
            for got, (want, margin) in zip(request.spec_token_ids, reference_drafts(
                    model, request.token_ids, len(request.spec_token_ids))):
                if margin < MARGIN:
                    skipped += 1
                    break  # later drafts continue from a different token
                assert got == want, f"{request.request_id} at {request.num_tokens} tokens"
                compared += 1
    assert compared > 40 and skipped < compared / 10
    assert engine.block_manager.num_free_blocks == engine.num_kv_blocks
    if setting == "tiny_kv_pool":
        assert engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize(("method", "setting"), [("mtp", s) for s in SETTINGS] + [("mtp_ngram", "tiny_kv_pool")])
def test_greedy_output_is_identical_with_mtp_drafts(method, setting, mtp_checkpoint):
    model, tok = ernie45.load_model(mtp_checkpoint), ernie45.load_tokenizer(mtp_checkpoint)
    prompts = repetitive_prompts(model.config.vocab_size, 16)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=1)
    plain = run(LLMEngine(model, tok, EngineConfig(**SETTINGS[setting])), prompts, params)
    spec = {"method": method, "num_speculative_tokens": 3, "disable_by_batch_size": None}
    engine = LLMEngine(model, tok, EngineConfig(**SETTINGS[setting], speculative_config=spec))
    drafted = run(engine, prompts, params)
    for key, out in plain.items():
        assert drafted[key].outputs[0].token_ids == out.outputs[0].token_ids, f"prompt {key}"
    stats = engine.stats()
    assert stats["spec_decode_num_draft_tokens"] > 0
    assert stats["spec_decode_num_accepted_tokens"] <= stats["spec_decode_num_draft_tokens"]
    assert engine.block_manager.num_free_blocks == engine.num_kv_blocks


def test_post_norm_variant_drafts_what_its_reference_drafts(mtp_checkpoint):
    model, tok = ernie45.load_model(mtp_checkpoint), ernie45.load_tokenizer(mtp_checkpoint)
    spec = {"method": "mtp", "num_speculative_tokens": 2, "mtp_hidden_state": "post_norm"}
    engine = LLMEngine(model, tok, EngineConfig(speculative_config=spec))
    ids = repetitive_prompts(model.config.vocab_size, 1, seed=4)[0]
    engine.add_request("0", {"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    engine.step()
    request = engine.scheduler.running[0]
    want = reference_drafts(model, request.token_ids, 2, post_norm=True)
    assert [t for t, _ in want[: len(request.spec_token_ids)]] == request.spec_token_ids


def test_mtp_on_a_model_without_mtp_weights_fails_at_start(tiny_dense_checkpoint):
    model, tok = ernie45.load_model(tiny_dense_checkpoint), ernie45.load_tokenizer(tiny_dense_checkpoint)
    with pytest.raises(ValueError, match=r"method 'mtp': .* has no MTP layers .*use method \"ngram\""):
        LLMEngine(model, tok, EngineConfig(speculative_config={"method": "mtp"}))


@pytest.mark.parametrize(("config", "match"), [
    ({"method": "mtp_ngram", "num_speculative_tokens": 2, "num_model_steps": 2}, "num_model_steps"),
    ({"method": "mtp", "mtp_hidden_state": "middle"}, "mtp_hidden_state must be one of"),
    ({"method": "mtp", "mtp_final_norm": "yes"}, "mtp_final_norm must be true or false"),
])
def test_bad_mtp_settings_name_the_field(config, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(speculative_config=config)


def test_default_model_mtp_head_loads_and_drafts_what_it_accepts():
    """The embedded model ships a trained MTP head: on 16 concurrent chats (chunked prefill, a pool small enough
    to preempt) greedy output equals decoding without drafts, and most drafts are accepted."""
    path = default_model_path()
    model, tok = ernie45.load_model(path), ernie45.load_tokenizer(path)
    assert model.model.num_mtp_layers == 1
    questions = ["What is 974 + 504?", "How many days are in 2 weeks?", "Tell me a quote about life.",
                 "How many times does 6 appear in: 8 3 1 6 3 5 0 1 6 6?"]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q * (1 + i % 3)}], add_generation_prompt=True,
                                       tokenize=True) for i, q in enumerate(questions * 4)]
    params = SamplingParams(temperature=0, max_tokens=24)
    setting = dict(max_num_batched_tokens=48, num_kv_blocks=14, block_size=16, max_model_len=192)
    plain = run(LLMEngine(model, tok, EngineConfig(**setting)), prompts, params)
    spec = {"method": "mtp", "num_speculative_tokens": 2, "disable_by_batch_size": None}
    engine = LLMEngine(model, tok, EngineConfig(**setting, speculative_config=spec))
    drafted = run(engine, prompts, params)
    for key, out in plain.items():
        assert drafted[key].outputs[0].token_ids == out.outputs[0].token_ids, f"prompt {key}"
    stats = engine.stats()
    assert engine.scheduler.num_preemptions > 0
    # A trained head, not noise: a random one accepts ~1 / vocab of its drafts.
    assert stats["spec_decode_num_accepted_tokens"] > 0.5 * stats["spec_decode_num_draft_tokens"] > 0
    assert engine.block_manager.num_free_blocks == engine.num_kv_blocks
