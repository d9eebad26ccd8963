"""The offline `LLM` API and the asyncio `AsyncLLM` front, on a tiny checkpoint."""

import asyncio

import pytest
import torch

import ernie45
from ernie45 import engine as eng
from ernie45.engine import LLM, AsyncLLM, SamplingParams

from .test_engine_vs_model import greedy_reference


@pytest.fixture(scope="module")
def llm(tiny_moe_checkpoint):
    return LLM(tiny_moe_checkpoint, max_num_seqs=8, seed=0)


def test_generate_strings_and_token_ids_in_input_order(llm):
    prompts = ["The model reads", {"prompt_token_ids": [5, 6, 7, 8]}, "模型正在学习"]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.prompt for o in outputs] == ["The model reads", None, "模型正在学习"]
    for o in outputs:
        assert o.finished and len(o.outputs[0].token_ids) == 6 and o.outputs[0].finish_reason == "length"
        assert o.outputs[0].token_ids == greedy_reference(llm.model, o.prompt_token_ids, 6)
        assert o.outputs[0].text == llm.tokenizer.decode(o.outputs[0].token_ids, skip_special_tokens=True)
        m = o.metrics
        assert m.arrival_time <= m.first_token_time <= m.finish_time


def test_per_prompt_params_seed_and_n(llm):
    a = SamplingParams(temperature=1.0, seed=11, max_tokens=8, ignore_eos=True)
    b = SamplingParams(temperature=1.0, max_tokens=8, n=3, ignore_eos=True)
    out1 = llm.generate(["hello", "world"], [a, b], use_tqdm=False)
    out2 = llm.generate(["hello"], a, use_tqdm=False)
    assert out1[0].outputs[0].token_ids == out2[0].outputs[0].token_ids  # same seed, other batch
    assert len(out1[1].outputs) == 3 and [c.index for c in out1[1].outputs] == [0, 1, 2]
    with pytest.raises(ValueError, match="got 1 sampling_params for 2 prompts"):
        llm.generate(["a", "b"], [a], use_tqdm=False)


def test_logprobs_and_prompt_logprobs(llm):
    params = SamplingParams(temperature=0, max_tokens=3, logprobs=2, prompt_logprobs=1, ignore_eos=True)
    out = llm.generate({"prompt_token_ids": [5, 9, 13, 21, 34]}, params, use_tqdm=False)[0]
    ids = out.prompt_token_ids + out.outputs[0].token_ids
    with torch.no_grad():
        ref = torch.log_softmax(llm.model(torch.tensor([ids]))[0].float(), -1)
    for i, lp in enumerate(out.outputs[0].logprobs):
        pos = len(out.prompt_token_ids) - 1 + i
        assert lp.token_id == ids[pos + 1]
        assert lp.logprob == pytest.approx(ref[pos, lp.token_id].item(), abs=1e-4)
        assert len(lp.top) == 2 and lp.top[0][1] >= lp.top[1][1]
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == 5
    for t in range(1, 5):
        assert out.prompt_logprobs[t].logprob == pytest.approx(ref[t - 1, ids[t]].item(), abs=1e-4)


def test_chat_splits_reasoning(tiny_moe_checkpoint):
    llm = LLM(tiny_moe_checkpoint, seed=0)
    think_end = llm.tokenizer.token_to_id("</think>")
    # Force the model to close its thinking block after two tokens, then answer.
    conv = [{"role": "user", "content": "hi"}]
    prompt = llm.tokenizer.apply_chat_template(conv, add_generation_prompt=True) + "<think>\n"
    params = SamplingParams(temperature=0, max_tokens=12, reasoning_max_tokens=2, ignore_eos=True)
    out = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    ids = out.token_ids
    assert think_end in ids and ids.index(think_end) <= 3  # 2 thinking tokens, then the forced "\n</think>\n\n"
    reasoning, content = eng.llm.ReasoningParser().parse(out.text, True)
    assert reasoning is not None and "</think>" not in content
    outputs = llm.chat([conv, conv], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(outputs) == 2 and outputs[0].outputs[0].text == outputs[1].outputs[0].text


def test_async_llm_streams_and_abort_frees_blocks(tiny_moe_checkpoint):
    model, tok = ernie45.load_model(tiny_moe_checkpoint), ernie45.load_tokenizer(tiny_moe_checkpoint)
    engine = eng.LLMEngine(model, tok, eng.EngineConfig())
    front = AsyncLLM(engine)

    async def scenario():
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        chunks = [o async for o in front.generate({"prompt_token_ids": [5, 6, 7]}, params)]
        assert chunks[-1].finished and len(chunks[-1].outputs[0].token_ids) == 8
        assert "".join(c.new_text[0] for c in chunks) == chunks[-1].outputs[0].text
        long = SamplingParams(max_tokens=10_000, ignore_eos=True)
        stream = front.generate({"prompt_token_ids": [5, 6, 7]}, long)
        async for _ in stream:
            break
        await stream.aclose()  # the client leaves: the request is aborted
        with pytest.raises(ValueError, match="the prompt is empty"):
            async for _ in front.generate("", params):
                pass
        for _ in range(100):
            if not engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.02)

    try:
        asyncio.run(scenario())
        assert not engine.has_unfinished_requests()
        assert engine.block_manager.num_free_blocks == engine.num_kv_blocks
    finally:
        front.shutdown()
