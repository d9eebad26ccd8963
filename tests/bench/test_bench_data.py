"""ernie45.bench's datasets (random token ids, ShareGPT json / jsonl) with the default model's tokenizer, and its
summaries (percentiles as numpy computes them, vLLM's metric names)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ernie45 import load_tokenizer
from ernie45.bench.datasets import load_sharegpt, random_requests, sharegpt_requests
from ernie45.bench.metrics import RequestResult, compute_metrics, format_summary, percentile
from ernie45.default_model import DEFAULT_MODEL_DIR


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(DEFAULT_MODEL_DIR)


def test_random_requests_have_the_asked_lengths_and_a_shared_prefix(tokenizer):
    requests = random_requests(tokenizer, 6, input_len=20, output_len=5, prefix_len=4, seed=3)
    assert [r.prompt_len for r in requests] == [24] * 6 and [len(r.prompt) for r in requests] == [24] * 6
    assert {tuple(r.prompt[:4]) for r in requests} == {tuple(requests[0].prompt[:4])}
    assert len({tuple(r.prompt) for r in requests}) == 6
    assert requests == random_requests(tokenizer, 6, input_len=20, output_len=5, prefix_len=4, seed=3)
    ranged = random_requests(tokenizer, 50, input_len=20, output_len=10, range_ratio=0.5, seed=0)
    assert all(10 <= r.prompt_len <= 30 and 5 <= r.expected_output_len <= 15 for r in ranged)
    text = random_requests(tokenizer, 2, input_len=12, output_len=3, as_text=True)
    assert all(isinstance(r.prompt, str) and r.prompt_len == len(tokenizer.encode(r.prompt)) for r in text)
    with pytest.raises(ValueError, match="range ratio"):
        random_requests(tokenizer, 1, 8, 8, range_ratio=1.0)


def conversation(question: str, answer: str, style: str = "sharegpt") -> dict:
    if style == "sharegpt":
        return {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def test_sharegpt_json_and_jsonl_read_the_same(tmp_path, tokenizer):
    entries = [conversation("What is the longest river in the world?", "The Nile, at about 6,650 km, is usually "
                            "named the longest."),
               conversation("Name three colours of the rainbow.", "Red, orange and yellow.", style="openai"),
               conversation("hi", "hello"),  # under 4 tokens: filtered, as vLLM does
               {"conversations": [{"from": "human", "value": "a turn without an answer"}]}]
    as_json, as_jsonl = tmp_path / "d.json", tmp_path / "d.jsonl"
    as_json.write_text(json.dumps(entries))
    as_jsonl.write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    assert load_sharegpt(as_json) == load_sharegpt(as_jsonl)
    requests = sharegpt_requests(as_jsonl, tokenizer, 2, seed=0)
    assert sorted(r.prompt for r in requests) == ["Name three colours of the rainbow.",
                                                  "What is the longest river in the world?"]
    for r in requests:
        assert r.prompt_len == len(tokenizer.encode(r.prompt)) and r.expected_output_len >= 4
    assert [r.expected_output_len for r in sharegpt_requests(as_json, tokenizer, 2, output_len=7)] == [7, 7]
    assert len(sharegpt_requests(as_json, tokenizer, 5)) == 5  # repeated to the count asked
    with pytest.raises(FileNotFoundError):
        load_sharegpt(tmp_path / "missing.json")
    (tmp_path / "bad.jsonl").write_text('{"conversations": []}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_sharegpt(tmp_path / "bad.jsonl")


def test_percentiles_match_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100):
        values = sorted(rng.random(n).tolist())
        for q in (1, 50, 90, 99, 99.9):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12, abs=1e-15)


def test_metrics_in_vllms_names():
    results = [RequestResult(ok=True, prompt_len=10, output_tokens=5, ttft=0.1, e2el=0.5, itl=[0.1] * 4),
               RequestResult(ok=True, prompt_len=20, output_tokens=1, ttft=0.2, e2el=0.2),
               RequestResult(ok=False, error="HTTP 400")]
    m = compute_metrics(results, duration=2.0, percentiles=(50.0, 99.0))
    assert (m["completed"], m["failed"], m["total_input_tokens"], m["total_output_tokens"]) == (2, 1, 30, 6)
    assert m["request_throughput"] == 1.0 and m["output_throughput"] == 3.0 and m["total_token_throughput"] == 18.0
    assert m["mean_ttft_ms"] == pytest.approx(150.0) and m["median_e2el_ms"] == pytest.approx(350.0)
    assert m["mean_tpot_ms"] == pytest.approx(100.0)  # (0.5 - 0.1) / 4; one-token requests have no TPOT
    assert m["p50_itl_ms"] == pytest.approx(100.0) and "p99_itl_ms" in m
    summary = format_summary(m, (50.0, 99.0))
    assert "Successful requests:" in summary and "P50 TTFT (ms):" in summary
    with pytest.raises(ValueError):
        compute_metrics(results, duration=0)
