"""A second server with an API key and a one-sequence queue (401, 429), SIGTERM with a stream in flight, and an
engine core process that dies under a stream."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest

from .conftest import MODEL_NAME, ServerProcess

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 400,
        "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def guarded(thinking_checkpoint, tmp_path_factory):
    proc = ServerProcess(thinking_checkpoint, tmp_path_factory.mktemp("logs") / "guarded.log", "--api-key", KEY,
                         "--max-num-seqs", "1", "--max-queue", "1", "--max-model-len", "512")
    yield proc
    assert proc.stop() == 0, proc.log()[-3000:]
    assert "Traceback" not in proc.log(), proc.log()[-5000:]


def assert_error(response, status, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if code is not None:
        assert error["code"] == code
    return error


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}])
def test_api_key_required(guarded, headers):
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with httpx.Client(base_url=guarded.url) as http:
        assert_error(http.post("/v1/chat/completions", json=body, headers=headers), 401, "invalid_api_key")
        assert_error(http.get("/v1/models", headers=headers), 401)
        assert_error(http.post("/v1/completions", json={"prompt": "hi"}, headers=headers), 401)
        assert http.get("/health").status_code == 200  # probes need no key
        assert http.get("/metrics").status_code == 200


def test_api_key_accepted_by_the_openai_client(guarded):
    good = openai.OpenAI(base_url=guarded.url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in good.models.list().data] == [MODEL_NAME]
    out = good.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert out.usage.completion_tokens <= 2
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=guarded.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_queue_full_is_429(guarded):
    a, b, c = (httpx.Client(base_url=guarded.url, headers=AUTH, timeout=60) for _ in range(3))
    with a, b, c, a.stream("POST", "/v1/chat/completions", json=LONG) as running:
        assert running.status_code == 200
        deadline = time.monotonic() + 10
        while guarded.metrics()["ernie45:num_requests_running"] < 1:  # it holds the only slot
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with b.stream("POST", "/v1/chat/completions", json=LONG) as waiting:
            assert waiting.status_code == 200  # admitted: the one place in the queue
            error = assert_error(c.post("/v1/chat/completions", json={**LONG, "stream": False}), 429, "queue_full")
            assert "--max-queue 1" in error["message"]
            assert_error(c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}), 429)
    # Both clients left: their requests are aborted, the queue drains, and requests are served again.
    m = guarded.wait_idle()
    assert m["ernie45:num_free_kv_blocks"] == m["ernie45:num_kv_blocks"]
    ok = httpx.post(guarded.url + "/v1/completions", headers=AUTH, json={"prompt": "hi", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


def test_sigterm_with_a_stream_in_flight_exits_cleanly(thinking_checkpoint, tmp_path):
    proc = ServerProcess(thinking_checkpoint, tmp_path / "sigterm.log", "--max-model-len", "4096",
                         "--shutdown-timeout", "1")
    body = {**LONG, "max_tokens": 4000}
    events = []
    try:
        with httpx.Client(base_url=proc.url, timeout=30) as http:
            with http.stream("POST", "/v1/chat/completions", json=body) as stream:
                lines = stream.iter_lines()
                next(line for line in lines if line.startswith("data: "))
                start = time.monotonic()
                proc.process.send_signal(signal.SIGTERM)
                events = [line for line in lines if line.startswith("data: ")]
            returncode = proc.process.wait(timeout=20)
            elapsed = time.monotonic() - start
    except subprocess.TimeoutExpired:
        proc.stop()
        raise
    assert returncode == 0, proc.log()[-3000:]
    assert elapsed < 10, elapsed
    # The stream was cut short by the shutdown, and said so before ending properly.
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][len("data: "):])["error"]["code"] == "engine_unavailable"
    assert "Traceback" not in proc.log(), proc.log()
    proc.stop()


def _engine_core_pid(server_pid: int) -> int:
    children = [int(pid) for task in Path(f"/proc/{server_pid}/task").iterdir()
                for pid in (task / "children").read_text().split()]
    # multiprocessing's resource tracker is a child too; the core is the one spawn started
    cores = [pid for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(cores) == 1, children  # `ernie45 serve` runs exactly one engine core process
    return cores[0]


def test_a_dead_engine_core_fails_requests_with_503_and_health(thinking_checkpoint, tmp_path):
    """The engine core process is killed mid-stream: the stream ends with an error event in OpenAI's shape, new
    requests get a 503 within seconds (never a hang), /health turns 503, and the server itself stays up."""
    proc = ServerProcess(thinking_checkpoint, tmp_path / "dead-core.log", "--max-model-len", "4096")
    try:
        with httpx.Client(base_url=proc.url, timeout=30) as http:
            with http.stream("POST", "/v1/chat/completions", json={**LONG, "max_tokens": 4000}) as stream:
                lines = stream.iter_lines()
                next(line for line in lines if line.startswith("data: "))
                start = time.monotonic()
                os.kill(_engine_core_pid(proc.process.pid), signal.SIGKILL)
                events = [line for line in lines if line.startswith("data: ")]
            elapsed = time.monotonic() - start
            assert elapsed < 5, elapsed
            assert events[-1] == "data: [DONE]"
            assert json.loads(events[-2][len("data: "):])["error"]["code"] == "engine_unavailable"
            response = http.post("/v1/chat/completions", json={**LONG, "stream": False, "max_tokens": 4})
            assert_error(response, 503, "engine_unavailable")
            assert_error(http.get("/health"), 503, "engine_unavailable")
            assert proc.process.poll() is None  # the API server keeps answering
    finally:
        proc.stop()
