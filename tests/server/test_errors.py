"""Bad input through raw HTTP: the right status, OpenAI's error shape, and a server that stays up."""

import json

import pytest

from .conftest import MODEL_NAME

HI = [{"role": "user", "content": "hi"}]
LONG_TEXT = "The model reads the next token. " * 120  # > 512 tokens


def chat(**fields):
    return {"model": MODEL_NAME, "messages": HI, "max_tokens": 2, **fields}


def completion(**fields):
    return {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2, **fields}


CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"

# (path, json body, expected status, expected param or None, a phrase the message must hold or None)
CASES = [
    (CHAT, chat(temperature=-1), 400, "temperature", "temperature must be >= 0"),
    (CHAT, chat(temperature="hot"), 400, "temperature", None),
    (CHAT, chat(top_p=0), 400, "top_p", "top_p must be in (0, 1]"),
    (CHAT, chat(top_p=1.5), 400, "top_p", None),
    (CHAT, chat(max_tokens=0), 400, "max_tokens", "max_tokens must be >= 1"),
    (CHAT, chat(max_completion_tokens=-3), 400, "max_tokens", None),
    (CHAT, chat(n=0), 400, "n", None),
    (CHAT, chat(n=1000), 400, "n", None),
    (CHAT, chat(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages.0.role", None),
    (CHAT, chat(messages=[]), 400, "messages", None),
    (CHAT, {"model": MODEL_NAME}, 400, "messages", None),
    (CHAT, chat(messages="hi"), 400, "messages", None),
    (CHAT, chat(messages=[{"role": "user", "content": 5}]), 400, None, None),
    (CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400,
     None, None),
    (CHAT, chat(messages=[{"role": "user", "content": None}]), 400, "messages.0", "content is required"),
    (CHAT, chat(messages=[{"role": "assistant", "tool_calls": [{"id": "1"}]}]), 400, "messages.0.tool_calls.0.function",
     "Field required"),
    (CHAT, chat(stream="yes"), 400, "stream", None),
    (CHAT, chat(logprobs=True, top_logprobs=30), 400, "logprobs", None),
    (CHAT, chat(top_logprobs=2), 400, "top_logprobs", None),
    (CHAT, chat(logit_bias={"abc": 1}), 400, "logit_bias", None),
    (CHAT, chat(logit_bias={"5": 500}), 400, "logit_bias", None),
    (CHAT, chat(stop_token_ids=[-1]), 400, "stop_token_ids", None),
    (CHAT, chat(stop_token_ids=[10**9]), 400, "stop_token_ids", "outside the vocabulary"),
    (CHAT, chat(stop=[""]), 400, "stop", None),
    (CHAT, chat(seed=2**70), 400, "seed", None),
    (CHAT, chat(top_k=-5), 400, "top_k", None),
    (CHAT, chat(min_p=2), 400, "min_p", None),
    (CHAT, chat(repetition_penalty=0), 400, "repetition_penalty", None),
    (CHAT, chat(presence_penalty=3), 400, "presence_penalty", None),
    (CHAT, chat(min_tokens=5, max_tokens=2), 400, "min_tokens", None),
    (CHAT, chat(reasoning_max_tokens=10), 400, "reasoning_max_tokens", None),
    (CHAT, chat(chat_template_kwargs={"tokenize": True}), 400, "chat_template_kwargs", None),
    (CHAT, chat(chat_template_kwargs="on"), 400, "chat_template_kwargs", None),
    (CHAT, chat(model="gpt-4o"), 404, "model", "does not exist"),
    (CHAT, chat(messages=[{"role": "user", "content": LONG_TEXT}]), 400, "prompt", "max_model_len is 512"),
    (CHAT, chat(messages=[{"role": "user", "content": LONG_TEXT}], stream=True), 400, "prompt", None),
    (CHAT, chat(temperature=-1, stream=True), 400, "temperature", None),
    (COMPLETIONS, completion(prompt=[]), 400, "prompt", None),
    (COMPLETIONS, completion(prompt=[[]]), 400, "prompt", "empty"),
    (COMPLETIONS, completion(prompt=""), 400, "prompt", "empty"),
    (COMPLETIONS, completion(prompt=[-1]), 400, "prompt", None),
    (COMPLETIONS, completion(prompt=5), 400, "prompt", None),
    (COMPLETIONS, completion(prompt=[1, "a"]), 400, "prompt", None),
    (COMPLETIONS, {"model": MODEL_NAME}, 400, "prompt", None),
    (COMPLETIONS, completion(prompt=LONG_TEXT), 400, "prompt", "max_model_len is 512"),
    (COMPLETIONS, completion(prompt=list(range(3, 600))), 400, "prompt", "597 tokens"),
    (COMPLETIONS, completion(prompt=list(range(3, 500)), max_tokens=100), 400, "max_tokens",
     "you requested 597 tokens (497 in the prompt, 100 in the completion)"),
    (CHAT, chat(max_tokens=600), 400, "max_tokens", "maximum context length is 512 tokens"),
    (CHAT, chat(max_completion_tokens=600, stream=True), 400, "max_tokens", "in the completion"),
    (COMPLETIONS, completion(logprobs=50), 400, "logprobs", None),
    (COMPLETIONS, completion(suffix="x"), 400, "suffix", None),
    (COMPLETIONS, completion(best_of=3), 400, "best_of", None),
    (COMPLETIONS, completion(echo="yes"), 400, "echo", None),
    (COMPLETIONS, completion(max_tokens=-1), 400, "max_tokens", None),
    (COMPLETIONS, completion(model="nope"), 404, "model", None),
    (COMPLETIONS, completion(prompt="hi \ud800"), 400, None, "lone UTF-16 surrogate"),
    (CHAT, chat(messages=[{"role": "user", "content": "\udfff"}]), 400, None, "messages.0.content"),
    (CHAT, chat(model="\ud800"), 400, None, "surrogate"),
    (CHAT, chat(tools=[{"type": "function", "function": {"name": "\ud800"}}]), 400, None, "surrogate"),
    ("/tokenize", {"prompt": "\ud800"}, 400, None, "surrogate"),
    ("/tokenize", {"prompt": "a", "messages": HI}, 400, None, None),
    ("/tokenize", {}, 400, None, None),
    ("/detokenize", {"tokens": [10**9]}, 400, "tokens", None),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens", None),
]


def assert_error_shape(response, status):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["type"], str)
    return body["error"]


@pytest.mark.parametrize("path, body, status, param, phrase", CASES,
                         ids=[f"{i}-{c[0].rsplit('/', 1)[-1]}" for i, c in enumerate(CASES)])
def test_bad_request(http, path, body, status, param, phrase):
    # json.dumps escapes lone surrogates as \\udxxx (httpx's json= would fail to encode them).
    raw = json.dumps(body).encode()
    error = assert_error_shape(http.post(path, content=raw, headers={"content-type": "application/json"}), status)
    if param is not None:
        assert error["param"] == param, error
    if phrase is not None:
        assert phrase in error["message"], error


def test_prompt_too_long_names_both_lengths(http):
    error = assert_error_shape(http.post(COMPLETIONS, json=completion(prompt=list(range(3, 600)))), 400)
    assert "597" in error["message"] and "512" in error["message"] and error["code"] == "context_length_exceeded"


@pytest.mark.parametrize("raw, content_type", [
    (b'{"model": "tiny-ernie", "messages": [', "application/json"),
    (b"not json at all", "application/json"),
    (b"[1, 2, 3]", "application/json"),
    (b"", "application/json"),
    (b"\xff\xfe\x00", "application/json"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "application/json"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}', "application/json"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', "text/plain"),
])
def test_malformed_bodies(http, raw, content_type):
    assert_error_shape(http.post(CHAT, content=raw, headers={"content-type": content_type}), 400)


def test_unknown_route_and_method(http):
    assert_error_shape(http.get("/v1/nothing"), 404)
    assert_error_shape(http.get(CHAT), 405)


def test_server_is_healthy_after_bad_input(http):
    assert http.get("/health").status_code == 200
    ok = http.post(CHAT, json=chat())
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] is not None
