"""A real `ernie45 serve` process on 127.0.0.1 (free port, tiny checkpoint), shared by the server tests."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from ..tiny_checkpoint import make_tiny_checkpoint

MODEL_NAME = "tiny-ernie"

# The released non-thinking template plus a VL-style switch: `enable_thinking` leaves a <think> block open.
SWITCHABLE_THINKING_TEMPLATE = (
    '{{- cls_token -}}'
    '{%- for message in messages -%}'
    '{%- if message["role"] == "user" -%}{{- "User: " + message["content"] + "\\n" -}}'
    '{%- elif message["role"] == "assistant" -%}{{- "Assistant: " + message["content"] + sep_token -}}'
    '{%- elif message["role"] == "system" -%}{{- message["content"] + "\\n" -}}'
    '{%- endif -%}'
    '{%- endfor -%}'
    '{%- if add_generation_prompt -%}{{- "Assistant: " -}}'
    '{%- if enable_thinking is defined and enable_thinking -%}{{- "<think>\\n" -}}{%- endif -%}'
    '{%- endif -%}'
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m ernie45.cli.main serve CHECKPOINT --port P ...` until stop()."""

    def __init__(self, checkpoint: Path, log_path: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 (open for the life of the process, closed in stop())
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ernie45.cli.main", "serve", str(checkpoint), "--port", str(self.port),
             "--served-model-name", MODEL_NAME, "--threads", "1", *args],
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        self._wait_healthy()

    def _wait_healthy(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the server did not become healthy in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def metrics(self) -> dict[str, float]:
        """/metrics as {name: value} for the unlabelled-but-model_name series (histogram buckets left out)."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        values = {}
        for line in text.splitlines():
            match = re.match(r'^(ernie45:[a-z0-9_:]+)\{model_name="[^"]*"\} (\S+)$', line)
            if match:
                values[match.group(1)] = float(match.group(2))
        return values

    def wait_idle(self, timeout: float = 10.0) -> dict[str, float]:
        """Metrics once no sequence runs or waits and every KV block is free again."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            idle = (m["ernie45:num_requests_running"] == 0 and m["ernie45:num_requests_waiting"] == 0
                    and m["ernie45:num_free_kv_blocks"] == m["ernie45:num_kv_blocks"])
            if idle or time.monotonic() > deadline:
                return m
            time.sleep(0.05)

    def stop(self, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@pytest.fixture(scope="session")
def thinking_checkpoint(tmp_path_factory) -> Path:
    """The tiny checkpoint with a chat template whose thinking can be switched on (`enable_thinking`)."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("server") / "tiny")
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = SWITCHABLE_THINKING_TEMPLATE
    config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2))
    (path / "chat_template.jinja").unlink(missing_ok=True)
    return path


@pytest.fixture(scope="session")
def server(thinking_checkpoint, tmp_path_factory):
    """The shared server: 16 sequences at once, 512-token context, a queue bound the load test stays under."""
    proc = ServerProcess(thinking_checkpoint, tmp_path_factory.mktemp("logs") / "server.log",
                         "--max-num-seqs", "16", "--max-model-len", "512", "--max-queue", "200", "--seed", "0")
    yield proc
    assert proc.stop() == 0, proc.log()[-3000:]
    assert "Traceback" not in proc.log(), proc.log()[-5000:]


@pytest.fixture(scope="session")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c
