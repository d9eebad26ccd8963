"""`ernie45 serve --speculative-config '{json}'`: the same greedy text as the server without drafts, the
spec_decode_* counters on /metrics, and a bad flag refused at start."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import MODEL_NAME, ServerProcess

SPEC = {"method": "ngram", "num_speculative_tokens": 3, "disable_by_batch_size": None}


@pytest.fixture(scope="module")
def spec_server(thinking_checkpoint, tmp_path_factory):
    proc = ServerProcess(thinking_checkpoint, tmp_path_factory.mktemp("logs") / "spec.log", "--max-model-len", "512",
                         "--seed", "0", "--speculative-config", json.dumps(SPEC))
    yield proc
    assert proc.stop() == 0, proc.log()[-3000:]


def test_drafts_change_nothing_but_the_speed(spec_server, server, http):
    import httpx

    body = {"model": MODEL_NAME, "prompt": "one two three one two three one two three one two", "max_tokens": 40,
            "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    plain = http.post("/v1/completions", json=body).json()["choices"][0]
    spec = httpx.post(spec_server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    assert spec["token_ids"] == plain["token_ids"] and spec["text"] == plain["text"]
    metrics = spec_server.metrics()
    assert metrics["ernie45:spec_decode_num_draft_tokens_total"] > 0
    assert 0 < metrics["ernie45:spec_decode_num_accepted_tokens_total"] <= metrics[
        "ernie45:spec_decode_num_draft_tokens_total"]
    rate = metrics["ernie45:spec_decode_num_accepted_tokens_total"] / metrics["ernie45:spec_decode_num_draft_tokens_total"]
    assert metrics["ernie45:spec_decode_acceptance_rate"] == pytest.approx(rate)
    assert 1 < metrics["ernie45:spec_decode_mean_accepted_length"] <= 1 + SPEC["num_speculative_tokens"]
    assert server.metrics()["ernie45:spec_decode_num_drafts_total"] == 0


@pytest.mark.parametrize(("value", "code", "message"), [("{nope", 2, "not valid JSON"),  # argparse's usage error
                                                        ('{"method": "mtp"}', 1, "has no MTP layers")])
def test_a_bad_speculative_config_stops_the_server_at_start(thinking_checkpoint, value, code, message):
    result = subprocess.run([sys.executable, "-m", "ernie45.cli.main", "serve", str(thinking_checkpoint),
                             "--speculative-config", value], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == code and message in result.stderr, result.stderr[-2000:]


def test_the_default_model_serves_with_its_mtp_head(tmp_path):
    """`ernie45 serve --speculative-config '{"method": "mtp"}'` on the embedded model: the official client's chat
    answer equals the model's greedy answer without drafts (offline LLM), and /metrics counts accepted drafts."""
    import openai

    from ernie45.default_model import default_model_path
    from ernie45.engine import LLM, SamplingParams

    path = default_model_path()
    messages = [{"role": "user", "content": "What is 974 + 504?"}]
    llm = LLM(str(path))
    want = llm.chat(messages, SamplingParams(temperature=0, max_tokens=48))[0].outputs[0]
    proc = ServerProcess(path, tmp_path / "mtp.log", "--speculative-config", '{"method": "mtp"}')
    try:
        client = openai.OpenAI(base_url=proc.url + "/v1", api_key="none")
        got = client.chat.completions.create(model=MODEL_NAME, messages=messages, temperature=0, max_tokens=48)
        message = got.choices[0].message
        assert (message.content or "", getattr(message, "reasoning_content", None) or "") == (
            want.text, want.reasoning_content or "")
        assert want.reasoning_content  # the model thought: a long enough answer to draft in
        metrics = proc.metrics()
        assert 0 < metrics["ernie45:spec_decode_num_accepted_tokens_total"] <= metrics[
            "ernie45:spec_decode_num_draft_tokens_total"]
    finally:
        assert proc.stop() == 0, proc.log()[-3000:]
