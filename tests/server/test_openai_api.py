"""The server through the official `openai` client: models, chat and completions (stream and not), sampling extras,
logprobs, thinking, and the side endpoints."""

import math

import openai
import pytest

from .conftest import MODEL_NAME

HI = [{"role": "user", "content": "hello there"}]
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


def stream_chat(client, **kwargs):
    """Concatenated content, reasoning, finish reasons by index, usage, and the chunks of a chat stream."""
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    content, reasoning, finish = {}, {}, {}
    for chunk in chunks:
        for choice in chunk.choices:
            content[choice.index] = content.get(choice.index, "") + (choice.delta.content or "")
            extra = choice.delta.model_extra or {}
            if extra.get("reasoning_content"):
                reasoning[choice.index] = reasoning.get(choice.index, "") + extra["reasoning_content"]
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    return content, reasoning, finish, chunks


def test_models_list(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_NAME]
    assert models[0].model_extra["max_model_len"] == 512


def test_chat_non_stream_and_stream_agree_at_temperature_0(client):
    kwargs = dict(model=MODEL_NAME, messages=HI, max_tokens=12, **GREEDY)
    full = client.chat.completions.create(**kwargs)
    assert full.id.startswith("chatcmpl-") and full.object == "chat.completion"
    choice = full.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant" and choice.message.content
    assert full.usage.completion_tokens == 12 and full.usage.prompt_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + 12
    content, _, finish, chunks = stream_chat(client, **kwargs)
    assert content[0] == choice.message.content and finish == {0: "length"}
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-") and chunks[0].id != full.id


def test_stream_usage_chunk(client):
    kwargs = dict(model=MODEL_NAME, messages=HI, max_tokens=5, stream_options={"include_usage": True}, **GREEDY)
    _, _, _, chunks = stream_chat(client, **kwargs)
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 5
    assert last.usage.prompt_tokens == client.chat.completions.create(**kwargs).usage.prompt_tokens


def test_system_multi_turn_and_text_parts(client, http):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "The model reads"},
    ]
    out = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=4, **GREEDY)
    rendered = http.post("/tokenize", json={"messages": messages}).json()
    assert out.usage.prompt_tokens == rendered["count"]
    prompt = http.post("/detokenize", json={"tokens": rendered["tokens"]}).json()["prompt"]
    assert "Be brief.\nUser: hello\nthere\nAssistant: Hi." in prompt and prompt.endswith("Assistant: ")


def test_n_samples_seed_and_stop(client):
    kwargs = {"model": MODEL_NAME, "messages": HI, "max_tokens": 8, "temperature": 1.0, "extra_body": {"ignore_eos": True}}
    a = client.chat.completions.create(n=2, seed=7, **kwargs)
    b = client.chat.completions.create(n=2, seed=7, **kwargs)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.usage.completion_tokens == 16
    content, _, finish, _ = stream_chat(client, n=2, seed=7, **kwargs)
    assert [content[0], content[1]] == [c.message.content for c in a.choices] and set(finish) == {0, 1}
    # A stop string taken from the greedy text ends the output just before it.
    text = client.chat.completions.create(model=MODEL_NAME, messages=HI, max_tokens=12, **GREEDY).choices[0]
    stop = text.message.content[3:6]
    stopped = client.chat.completions.create(model=MODEL_NAME, messages=HI, max_tokens=12, stop=[stop], **GREEDY)
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == text.message.content[: text.message.content.index(stop)]
    content, _, finish, _ = stream_chat(client, model=MODEL_NAME, messages=HI, max_tokens=12, stop=stop, **GREEDY)
    assert content[0] == stopped.choices[0].message.content and finish == {0: "stop"}


def test_chat_logprobs(client):
    out = client.chat.completions.create(model=MODEL_NAME, messages=HI, max_tokens=5, logprobs=True, top_logprobs=3,
                                         **GREEDY)
    entries = out.choices[0].logprobs.content
    assert len(entries) == 5
    for e in entries:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3 and bytes(e.bytes).decode("utf-8") == e.token
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-4)  # greedy: the chosen one is the best
    _, _, _, chunks = stream_chat(client, model=MODEL_NAME, messages=HI, max_tokens=5, logprobs=True, top_logprobs=3,
                                  **GREEDY)
    streamed = [e for c in chunks for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in entries]


def test_max_completion_tokens_and_extras(client):
    base = {"model": MODEL_NAME, "messages": HI, "temperature": 0}
    out = client.chat.completions.create(max_completion_tokens=3, max_tokens=10, extra_body={"ignore_eos": True}, **base)
    assert out.usage.completion_tokens == 3
    extras = {"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.3, "min_tokens": 4, "ignore_eos": True,
              "include_stop_str_in_output": False, "return_token_ids": True}
    out = client.chat.completions.create(max_tokens=6, extra_body=extras, **base)
    raw = out.model_extra
    assert len(raw["prompt_token_ids"]) == out.usage.prompt_tokens
    assert len(out.choices[0].model_extra["token_ids"]) == 6
    # stop_token_ids: stop on the first greedy token.
    plain = client.chat.completions.create(max_tokens=6, extra_body={"return_token_ids": True}, **base)
    first = plain.choices[0].model_extra["token_ids"][0]
    stopped = client.chat.completions.create(max_tokens=6, extra_body={"stop_token_ids": [first]}, **base)
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == 1


def test_thinking_on_splits_reasoning_content(client):
    kwargs = {"model": MODEL_NAME, "messages": HI, "max_tokens": 12, "temperature": 0,
                  "extra_body": {"chat_template_kwargs": {"enable_thinking": True}, "reasoning_max_tokens": 3,
                              "ignore_eos": True}}
    out = client.chat.completions.create(**kwargs).choices[0].message
    reasoning = out.model_extra["reasoning_content"]
    assert reasoning is not None and "</think>" not in reasoning and "</think>" not in out.content
    content, streamed_reasoning, _, _ = stream_chat(client, **kwargs)
    assert streamed_reasoning.get(0, "") == reasoning and content[0] == out.content
    # Without a budget the whole output stays in the open think block.
    kwargs["extra_body"] = {"chat_template_kwargs": {"enable_thinking": True}, "ignore_eos": True}
    out = client.chat.completions.create(**kwargs).choices[0].message
    assert out.content == "" and out.model_extra["reasoning_content"]


def test_thinking_off_has_no_reasoning_content(client):
    for template_kwargs in ({"enable_thinking": False}, {}):
        out = client.chat.completions.create(model=MODEL_NAME, messages=HI, max_tokens=8, temperature=0,
                                             extra_body={"chat_template_kwargs": template_kwargs, "ignore_eos": True})
        message = out.choices[0].message
        assert message.model_extra["reasoning_content"] is None and message.content


def test_completions_prompt_shapes(client, http):
    ids = http.post("/tokenize", json={"prompt": "The model reads"}).json()["tokens"]
    kwargs = {"model": MODEL_NAME, "max_tokens": 6, "temperature": 0, "extra_body": {"ignore_eos": True}}
    by_text = client.completions.create(prompt="The model reads", **kwargs)
    by_ids = client.completions.create(prompt=ids, **kwargs)
    assert by_text.id.startswith("cmpl-") and by_text.choices[0].text == by_ids.choices[0].text
    assert by_text.usage.prompt_tokens == len(ids) and by_text.usage.completion_tokens == 6
    many = client.completions.create(prompt=["The model reads", "模型正在学习"], n=2, **kwargs)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == by_text.choices[0].text  # greedy: n samples agree
    nested = client.completions.create(prompt=[ids, ids], **kwargs)
    assert [c.text for c in nested.choices] == [by_text.choices[0].text] * 2
    # Streaming gives the same texts, per index.
    texts, finish = {}, {}
    for chunk in client.completions.create(prompt=["The model reads", "模型正在学习"], n=2, stream=True, **kwargs):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            finish[c.index] = c.finish_reason or finish.get(c.index)
    assert texts == {c.index: c.text for c in many.choices} and set(finish.values()) == {"length"}


def test_completions_echo_and_logprobs(client):
    kwargs = {"model": MODEL_NAME, "prompt": "The model reads", "max_tokens": 4, "temperature": 0, "logprobs": 2,
                  "extra_body": {"ignore_eos": True}}
    plain = client.completions.create(**kwargs).choices[0]
    lp = plain.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == plain.text and lp.text_offset[0] == 0
    assert all(len(t) >= 2 and max(t.values()) == pytest.approx(v, abs=1e-4)
               for t, v in zip(lp.top_logprobs, lp.token_logprobs))
    echoed = client.completions.create(echo=True, **kwargs).choices[0]
    assert echoed.text == "The model reads" + plain.text
    elp = echoed.logprobs
    assert elp.token_logprobs[0] is None and elp.token_logprobs[-4:] == pytest.approx(lp.token_logprobs, abs=1e-4)
    assert "".join(elp.tokens) == echoed.text
    assert all(math.isfinite(v) for v in elp.token_logprobs[1:])
    streamed_text, streamed_tokens = "", []
    for chunk in client.completions.create(stream=True, echo=True, **kwargs):
        for c in chunk.choices:
            streamed_text += c.text
            streamed_tokens += c.logprobs.tokens if c.logprobs else []
    assert streamed_text == echoed.text and streamed_tokens == elp.tokens


def test_side_endpoints_and_request_id(http):
    r = http.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2})
    assert r.status_code == 200 and r.headers["x-request-id"] == r.json()["id"]
    assert http.get("/health").status_code == 200
    assert http.get("/version").json()["version"]
    tok = http.post("/tokenize", json={"prompt": "hello there"}).json()
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 512
    assert http.post("/detokenize", json={"tokens": tok["tokens"]}).json() == {"prompt": "hello there"}
    assert http.get("/health").headers["x-request-id"]


def test_metrics_count_requests(client, server):
    long = [{"role": "user", "content": "The engineer explains the chat template. " * 4}]  # > one 16-token block
    client.chat.completions.create(model=MODEL_NAME, messages=long, max_tokens=3, **GREEDY)
    before = server.metrics()
    client.chat.completions.create(model=MODEL_NAME, messages=long, max_tokens=3, **GREEDY)
    after = server.metrics()
    assert after["ernie45:generation_tokens_total"] >= before["ernie45:generation_tokens_total"] + 3
    assert after["ernie45:e2e_request_latency_seconds_count"] == before["ernie45:e2e_request_latency_seconds_count"] + 1
    assert after["ernie45:time_to_first_token_seconds_count"] > before["ernie45:time_to_first_token_seconds_count"]
    assert after["ernie45:time_per_output_token_seconds_count"] > before["ernie45:time_per_output_token_seconds_count"]
    assert after["ernie45:prefix_cache_queries_total"] > before["ernie45:prefix_cache_queries_total"]
    assert after["ernie45:prefix_cache_hits_total"] >= before["ernie45:prefix_cache_hits_total"] + 16
    assert 0 < after["ernie45:prefix_cache_hit_rate"] <= 1


def test_openai_client_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=HI)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_NAME, messages=HI, temperature=-1)
    assert info.value.body["param"] == "temperature"


def test_tools_and_tool_history_are_accepted(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "weather of a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    messages = [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    kwargs = dict(model=MODEL_NAME, messages=messages, tools=tools, max_tokens=6, **GREEDY)
    reply = client.chat.completions.create(tool_choice="auto", **kwargs)
    choice = reply.choices[0]
    # The tiny random model writes no <tool_call> block: the text stays content and no call is invented.
    assert not choice.message.tool_calls and choice.finish_reason == "length"
    content, _, finish, _ = stream_chat(client, tool_choice="auto", **kwargs)
    assert content[0] == choice.message.content and finish[0] == "length"
    # "required" constrains the output to calls (tests/server/test_structured_outputs.py): even cut by max_tokens,
    # the text is the start of a <tool_call> block.
    forced = client.chat.completions.create(tool_choice="required", **kwargs).choices[0]
    text = forced.message.content or ""
    assert forced.finish_reason == "length" and (text.startswith("<tool_call>") or "<tool_call>".startswith(text))
