"""`ernie45 bench` arguments: bad values exit with status 2 and say what is wrong, before anything is loaded or
contacted; `bench throughput` and `bench latency` on the default model write vLLM's JSON fields."""

from __future__ import annotations

import json

import pytest

from ernie45.cli.main import main


def exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own errors
        return exc.code


@pytest.mark.parametrize(("argv", "message"), [
    (["serve", "--num-prompts", "-1"], "argument --num-prompts: must be >= 1, got -1"),
    (["serve", "--num-prompts", "0"], "argument --num-prompts: must be >= 1, got 0"),
    (["serve", "--request-rate", "0"], "argument --request-rate: must be > 0"),
    (["serve", "--max-concurrency", "0"], "argument --max-concurrency: must be >= 1"),
    (["serve", "--dataset-name", "sharegpt"], "--dataset-name sharegpt needs --dataset-path"),
    (["serve", "--dataset-name", "sharegpt", "--dataset-path", "/nonexistent/sharegpt.json"], "no such file"),
    (["serve", "--dataset-path", "/nonexistent/sharegpt.json"], "--dataset-path is read with --dataset-name sharegpt"),
    (["serve", "--dataset-name", "alpaca"], "invalid choice: 'alpaca'"),
    (["serve", "--random-range-ratio", "1.5"], "--random-range-ratio must be in [0, 1)"),
    (["serve", "--metric-percentiles", "abc"], "expected comma-separated numbers"),
    (["serve", "--base-url", "127.0.0.1:8000"], "--base-url must start with http://"),
    (["serve", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["serve", "--backend", "tgi"], "invalid choice: 'tgi'"),
    (["serve", "--percentile-metrics", "ttft,latency"], "expected some of ttft,tpot,itl,e2el"),
    (["throughput", "--num-prompts", "-5"], "argument --num-prompts: must be >= 1"),
    (["latency", "--batch-size", "0"], "argument --batch-size: must be >= 1"),
    (["latency", "--num-iters-warmup", "-1"], "argument --num-iters-warmup: must be >= 0"),
    ([], "the following arguments are required"),
])
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    assert exit_code(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


def test_unreachable_server_is_a_clear_error(capsys):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert exit_code(["bench", "serve", "--base-url", f"http://127.0.0.1:{port}", "--num-prompts", "1"]) == 1
    assert f"cannot reach http://127.0.0.1:{port}/v1/models" in capsys.readouterr().err


def test_throughput_on_the_default_model(tmp_path, capsys):
    out = tmp_path / "throughput.json"
    assert main(["bench", "throughput", "--num-prompts", "4", "--random-input-len", "16", "--random-output-len", "8",
                 "--disable-tqdm", "--output-json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["num_requests"] == 4
    assert result["total_output_tokens"] == 4 * 8  # eos ignored by default, as vLLM's
    assert result["total_num_tokens"] == 4 * 16 + 4 * 8
    assert result["requests_per_second"] == pytest.approx(4 / result["elapsed_time"])
    assert result["tokens_per_second"] == pytest.approx(96 / result["elapsed_time"])
    assert "Throughput: " in capsys.readouterr().out


def test_latency_on_the_default_model(tmp_path, capsys):
    out = tmp_path / "latency.json"
    assert main(["bench", "latency", "--batch-size", "2", "--input-len", "8", "--output-len", "4", "--num-iters", "3",
                 "--num-iters-warmup", "1", "--disable-tqdm", "--output-json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["latencies"]) == 3
    assert result["avg_latency"] == pytest.approx(sum(result["latencies"]) / 3)
    assert set(result["percentiles"]) == {"10", "25", "50", "75", "90", "99"}
    assert min(result["latencies"]) <= result["percentiles"]["50"] <= max(result["latencies"])
    assert "Avg latency: " in capsys.readouterr().out
