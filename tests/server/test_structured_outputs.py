"""Structured output through the real server and the official openai client: every dialect (OpenAI
response_format, vLLM structured_outputs, FastDeploy guided_*), forced tool calls, thinking + schema, the 400s.

The server's model is the tiny random-weight one at temperature 1, i.e. close to uniform over whatever the grammar
allows: the outputs must still parse and validate, which is the point. Schemas bound every string, array and
number, so each output has at most a few dozen characters of content plus at most 10 whitespace characters per
gap (xgrammar_backend.MAX_JSON_WHITESPACE), far below max_tokens: finishing with "stop" is guaranteed, not lucky.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"]},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "address", "active"],
}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"]}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "integer", "minimum": -12,
                                                                                 "maximum": 12}},
                                       "required": ["zone"]}}}
MESSAGES = [{"role": "user", "content": "Describe a person."}]


def _many(client, count: int = 20, **kwargs) -> list:
    """`count` seeded temperature-1 chat completions, sent concurrently (one batch in the engine)."""
    def one(seed: int):
        return client.chat.completions.create(model="tiny-ernie", messages=MESSAGES, temperature=1.0, seed=seed,
                                              max_tokens=400, **kwargs)
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(count)))


def test_response_format_json_schema_outputs_validate(client):
    for response in _many(client, response_format={"type": "json_schema",
                                                   "json_schema": {"name": "person", "schema": PERSON,
                                                                   "strict": True}}):
        choice = response.choices[0]
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_object_gives_an_object(client):
    for response in _many(client, count=8, max_completion_tokens=400, response_format={"type": "json_object"}):
        choice = response.choices[0]
        if choice.finish_reason == "stop":  # an unbounded object may run out of tokens; what it gives must parse
            assert isinstance(json.loads(choice.message.content), dict)
        else:
            assert choice.message.content.lstrip().startswith("{")


def test_vllm_structured_outputs_regex_choice_grammar_and_json(client):
    pattern = r"[a-z]{2,6}-[0-9]{3}"
    for response in _many(client, extra_body={"structured_outputs": {"regex": pattern}}):
        assert re.fullmatch(pattern, response.choices[0].message.content), response.choices[0].message.content
    choices = ["yes", "no", "maybe not"]
    for response in _many(client, extra_body={"structured_outputs": {"choice": choices}}):
        assert response.choices[0].message.content in choices
    grammar = 'root ::= "(" num (" + " num)* ")"\nnum ::= [1-9] [0-9]?'
    for response in _many(client, count=8, extra_body={"structured_outputs": {"grammar": grammar}}):
        assert re.fullmatch(r"\([1-9][0-9]?( \+ [1-9][0-9]?)*\)", response.choices[0].message.content)
    for response in _many(client, count=8, extra_body={"structured_outputs": {"json": PERSON}}):
        jsonschema.validate(json.loads(response.choices[0].message.content), PERSON)


def test_fastdeploy_guided_fields(client):
    for response in _many(client, count=8, extra_body={"guided_json": PERSON}):
        jsonschema.validate(json.loads(response.choices[0].message.content), PERSON)
    for response in _many(client, count=8, extra_body={"guided_regex": r"\d{4}"}):
        assert re.fullmatch(r"\d{4}", response.choices[0].message.content)
    for response in _many(client, count=8, extra_body={"guided_choice": ["red", "green"]}):
        assert response.choices[0].message.content in ("red", "green")
    for response in _many(client, count=4, extra_body={"guided_grammar": 'root ::= "a"+ "b"'}):
        assert re.fullmatch(r"a+b", response.choices[0].message.content)


class Pet(BaseModel):
    name: str = Field(max_length=8)
    kind: Literal["cat", "dog", "fish"]
    age: int = Field(ge=0, le=30)
    toys: list[Literal["ball", "rope"]] = Field(max_length=2)


def test_openai_parse_returns_the_pydantic_object(client):
    for seed in range(5):
        completion = client.chat.completions.parse(model="tiny-ernie", messages=MESSAGES, response_format=Pet,
                                                   temperature=1.0, seed=seed, max_tokens=300)
        pet = completion.choices[0].message.parsed
        assert isinstance(pet, Pet), completion
        assert len(pet.name) <= 8 and 0 <= pet.age <= 30


def test_completions_endpoint_takes_the_same_fields(client):
    for seed in range(8):
        response = client.completions.create(model="tiny-ernie", prompt="The code is", temperature=1.0, seed=seed,
                                             max_tokens=50, extra_body={"structured_outputs": {"regex": "[A-F]{4}"}})
        assert re.fullmatch("[A-F]{4}", response.choices[0].text)
        response = client.completions.create(model="tiny-ernie", prompt="A person:", temperature=1.0, seed=seed,
                                             max_tokens=400, extra_body={"response_format": {
                                                 "type": "json_schema", "json_schema": {"name": "p",
                                                                                        "schema": PERSON}}})
        jsonschema.validate(json.loads(response.choices[0].text), PERSON)


def test_streamed_deltas_add_up_to_valid_json(client):
    stream = client.chat.completions.create(model="tiny-ernie", messages=MESSAGES, temperature=1.0, seed=3,
                                            max_tokens=400, stream=True, extra_body={"guided_json": PERSON})
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    jsonschema.validate(json.loads(text), PERSON)


def _validate_calls(message, allowed: dict[str, dict]) -> list:
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), allowed[call.function.name])
    return message.tool_calls


def test_tool_choice_required_forces_valid_calls(client):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER_TOOL, TIME_TOOL)}
    # Parallel calls are allowed, so after each call the grammar offers another one or the end. A random model has
    # no reason to end; +3 on the stop tokens (which the grammar masks everywhere but after a complete call)
    # makes it end within max_tokens. tests/engine/test_structured_output.py checks the grammar takes several.
    for response in _many(client, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required",
                          logit_bias={"2": 3, "4": 3}):
        choice = response.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert len(_validate_calls(choice.message, schemas)) >= 1


def test_named_tool_choice_and_no_parallel_calls(client):
    weather = {"get_weather": WEATHER_TOOL["function"]["parameters"]}
    for response in _many(client, count=10, tools=[WEATHER_TOOL, TIME_TOOL], parallel_tool_calls=False,
                          tool_choice={"type": "function", "function": {"name": "get_weather"}}):
        calls = _validate_calls(response.choices[0].message, weather)
        assert len(calls) == 1


def test_auto_tool_choice_stays_free_and_omits_empty_tool_calls(http):
    body = {"model": "tiny-ernie", "messages": MESSAGES, "max_tokens": 8, "temperature": 0, "tools": [WEATHER_TOOL]}
    message = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    if "<tool_call>" not in (message["content"] or ""):
        assert "tool_calls" not in message  # OpenAI leaves the key out when there are no calls
    assert message["reasoning_content"] is None  # thinking off: null, never ""


def test_thinking_stays_free_and_the_answer_follows_the_schema(client):
    for response in _many(client, count=8, response_format={"type": "json_schema",
                                                            "json_schema": {"name": "p", "schema": PERSON}},
                          extra_body={"chat_template_kwargs": {"enable_thinking": True}, "reasoning_max_tokens": 6}):
        message = response.choices[0].message
        assert message.model_extra["reasoning_content"], message
        jsonschema.validate(json.loads(message.content), PERSON)


def test_a_grammar_cut_by_max_tokens_ends_with_length(client):
    response = client.chat.completions.create(model="tiny-ernie", messages=MESSAGES, temperature=1.0, seed=0,
                                              max_tokens=5, extra_body={"guided_json": PERSON})
    choice = response.choices[0]
    assert choice.finish_reason == "length" and choice.message.content.startswith("{")


@pytest.mark.parametrize(("extra", "param"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "uniqueItems": True}}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"structured_outputs": {"regex": "(abc"}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"jsonn": {}}}, "structured_outputs"),
    ({"guided_grammar": 'root ::= "a" |'}, "guided_grammar"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex"),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
])
def test_bad_constraints_are_400_naming_the_field(client, extra, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny-ernie", messages=MESSAGES, max_tokens=4, extra_body=extra)
    error = info.value.body
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error" and error["message"]


def test_unconstrained_requests_keep_their_tokens_beside_constrained_ones(client):
    def free(seed: int):
        return client.completions.create(model="tiny-ernie", prompt=f"Story {seed}:", temperature=0, max_tokens=12,
                                         extra_body={"ignore_eos": True, "return_token_ids": True})

    alone = [free(seed).choices[0].model_extra["token_ids"] for seed in range(4)]
    with ThreadPoolExecutor(8) as pool:
        constrained = [pool.submit(client.chat.completions.create, model="tiny-ernie", messages=MESSAGES,
                                   temperature=1.0, seed=s, max_tokens=400, extra_body={"guided_json": PERSON})
                       for s in range(4)]
        mixed = [pool.submit(free, seed) for seed in range(4)]
        together = [f.result().choices[0].model_extra["token_ids"] for f in mixed]
        for f in constrained:
            jsonschema.validate(json.loads(f.result().choices[0].message.content), PERSON)
    assert together == alone


def test_compiled_grammars_are_cached_across_requests(client, server):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"]}
    before = server.metrics()
    _many(client, count=6, max_completion_tokens=60, extra_body={"guided_json": schema})
    after = server.metrics()
    compiles = after["ernie45:structured_output_grammar_compiles_total"] - before.get(
        "ernie45:structured_output_grammar_compiles_total", 0)
    hits = after["ernie45:structured_output_grammar_cache_hits_total"] - before.get(
        "ernie45:structured_output_grammar_cache_hits_total", 0)
    assert compiles == 1 and hits == 5  # one compile for six requests with the same schema
