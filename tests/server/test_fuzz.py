"""Schemathesis against the server's own OpenAPI schema: generated bodies for chat and completions, valid by the
schema (positive) and not (negative), never get a 5xx.

The schema is fetched from the server and only narrowed where the work per example would grow without teaching the
fuzzer anything new about shapes: max_tokens is always sent and at most 8, n at most 2, at most 4 prompts; and
where nearly every example would fail on one known check, so that more of them reach the engine: `model` is the
served name (the 404 has its own test), messages carry `content`, prompt token ids are in the tiny vocabulary.
"""

import copy
import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from .conftest import MODEL_NAME

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")


def _bounded(schema: dict, vocab_size: int) -> dict:
    schema = copy.deepcopy(schema)
    components = schema["components"]["schemas"]
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        body = components[name]
        props = body["properties"]
        props["n"]["maximum"] = 2
        props["model"] = {"enum": [MODEL_NAME]}  # the 404 for other names is tested on its own
        for field in ("max_tokens", "max_completion_tokens"):
            if field in props:
                props[field] = {"type": "integer", "minimum": -1, "maximum": 8}
        body["required"] = sorted({*body.get("required", []), "max_tokens"})
    message = components["ChatMessage"]
    message["required"] = sorted({*message.get("required", []), "content"})
    message["properties"]["content"]["anyOf"] = [
        option for option in message["properties"]["content"]["anyOf"] if option.get("type") != "null"]
    prompt = components["CompletionRequest"]["properties"]["prompt"]
    for option in prompt["anyOf"]:
        if option.get("type") == "array":
            option["maxItems"] = 4
            items = option["items"]
            token = items["items"] if items.get("type") == "array" else items
            if token.get("type") == "integer":
                token.update(minimum=0, maximum=vocab_size - 1)
    return schema


@pytest.fixture(scope="module")
def schema(server, thinking_checkpoint):
    raw = httpx.get(server.url + "/openapi.json").json()
    vocab_size = json.loads((thinking_checkpoint / "config.json").read_text())["vocab_size"]
    return schemathesis.openapi.from_dict(_bounded(raw, vocab_size))


@pytest.mark.parametrize("path", ENDPOINTS)
@pytest.mark.parametrize("mode, examples", [(GenerationMode.POSITIVE, 30), (GenerationMode.NEGATIVE, 20)])
def test_no_server_errors(server, schema, path, mode, examples):
    operation = schema[path]["POST"]
    statuses = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def check(case):
        response = case.call(base_url=server.url, timeout=60)
        statuses.append(response.status_code)
        assert response.status_code < 500, (case.body, response.text)
        if response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}

    check()
    assert len(statuses) >= examples // 2
    if mode == GenerationMode.POSITIVE:
        assert statuses.count(200) >= 3, statuses  # the fuzz reaches the engine, not only the validators
    assert httpx.get(server.url + "/health").status_code == 200
