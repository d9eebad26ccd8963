"""`ernie45 bench serve` against a real `ernie45 serve` of the default model on loopback: what it counts (requests,
prompt and output tokens) equals what the server's /metrics counted meanwhile, for random token-id prompts on
/v1/completions and a ShareGPT jsonl file on /v1/chat/completions with Poisson arrivals. The server runs with
--no-web-ui, which this module checks too."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import httpx
import pytest

from ernie45.default_model import DEFAULT_MODEL_DIR

from ..server.conftest import MODEL_NAME, ServerProcess

VLLM_METRICS = ["completed", "total_input_tokens", "total_output_tokens", "request_throughput", "output_throughput",
                "total_token_throughput"] + [f"{stat}_{name}_ms" for name in ("ttft", "tpot", "itl", "e2el")
                                             for stat in ("mean", "median", "p99")]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = ServerProcess(DEFAULT_MODEL_DIR, tmp_path_factory.mktemp("logs") / "bench.log", "--no-web-ui",
                         "--max-num-seqs", "8")
    yield proc
    assert proc.stop() == 0, proc.log()[-3000:]
    assert "Traceback" not in proc.log(), proc.log()[-5000:]


def finished_requests(server) -> float:
    """ernie45:request_success_total summed over finish reasons."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(r"^ernie45:request_success_total\{[^}]*\} (\S+)$", text, re.MULTILINE))


def bench_serve(server, tmp_path, *args: str) -> dict:
    result_file = tmp_path / "result.json"
    run = subprocess.run([sys.executable, "-m", "ernie45.cli.main", "bench", "serve", "--base-url", server.url,
                          "--result-file", str(result_file), "--disable-tqdm", *args],
                         check=False, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Serving Benchmark Result" in run.stdout and "Mean TTFT (ms):" in run.stdout
    return json.loads(result_file.read_text())


def counters(server) -> dict[str, float]:
    m = server.wait_idle()
    return {"requests": finished_requests(server), "prompt": m["ernie45:prompt_tokens_total"],
            "output": m["ernie45:generation_tokens_total"]}


def test_random_prompts_counts_equal_the_servers_metrics(server, tmp_path):
    before = counters(server)
    result = bench_serve(server, tmp_path, "--num-prompts", "12", "--max-concurrency", "4", "--random-input-len",
                         "24", "--random-output-len", "10", "--ignore-eos", "--seed", "1")
    after = counters(server)
    assert result["completed"] == 12 and result["failed"] == 0
    assert result["completed"] == after["requests"] - before["requests"]
    assert result["total_input_tokens"] == after["prompt"] - before["prompt"] == 12 * 24
    assert result["total_output_tokens"] == after["output"] - before["output"] == 12 * 10
    assert result["model_id"] == MODEL_NAME  # from /v1/models, as --model was not given
    assert result["max_concurrency"] == 4 and result["request_rate"] == "inf"
    for name in VLLM_METRICS:
        assert isinstance(result[name], (int, float)), name
    assert result["output_lens"] == [10] * 12 and result["input_lens"] == [24] * 12
    # arithmetic of the summaries: throughputs are totals over the duration, every request's ITLs are its
    # 9 gaps after the first token
    assert result["output_throughput"] == pytest.approx(120 / result["duration"])
    assert result["total_token_throughput"] == pytest.approx((120 + 288) / result["duration"])
    assert all(len(itl) == 9 for itl in result["itls"])
    assert result["median_ttft_ms"] <= result["p99_ttft_ms"] and result["mean_ttft_ms"] <= result["mean_e2el_ms"]


def test_sharegpt_jsonl_on_chat_with_poisson_arrivals(server, tmp_path):
    """ShareGPT prompts counted with a local tokenizer (--tokenizer) rather than the server's /tokenize."""
    dataset = tmp_path / "sharegpt.jsonl"
    questions = ["What is 347 + 85?", "How many letters are in the word river?", "Convert 3 meters to centimeters.",
                 "Tell me a short story about a small cat."]
    with dataset.open("w") as f:
        for i, question in enumerate(questions):
            f.write(json.dumps({"id": str(i), "conversations": [
                {"from": "human", "value": question}, {"from": "gpt", "value": "An answer of a few words here."}]})
                + "\n")
    before = counters(server)
    result = bench_serve(server, tmp_path, "--backend", "openai-chat", "--dataset-name", "sharegpt",
                         "--dataset-path", str(dataset), "--num-prompts", "4", "--request-rate", "20",
                         "--metric-percentiles", "50,90", "--tokenizer", str(DEFAULT_MODEL_DIR))
    after = counters(server)
    assert result["completed"] == 4 == after["requests"] - before["requests"]
    # chat prompts count the template's tokens too: the server's usage is what the benchmark reports
    assert result["total_input_tokens"] == after["prompt"] - before["prompt"]
    assert result["total_output_tokens"] == after["output"] - before["output"] > 0
    assert result["backend"] == "openai-chat" and result["endpoint"] == "/v1/chat/completions"
    assert result["request_rate"] == 20
    assert "p90_ttft_ms" in result and "p99_ttft_ms" not in result


def test_no_web_ui_leaves_root_a_404(server):
    response = httpx.get(server.url + "/")
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "no route GET /"
    assert httpx.get(server.url + "/web/app.js").status_code == 404
    assert "chat page:" not in server.log()
