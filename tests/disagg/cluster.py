"""Real processes on loopback for the disaggregation tests: prefill, decode and mixed `ernie45 serve` instances
(tests/server's ServerProcess) and an `ernie45 router` in front of them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from ..server.conftest import MODEL_NAME, ServerProcess, free_port

# Small pools so "every block free again" is cheap to check; exports expire fast so the timeout path runs.
INSTANCE_ARGS = ("--max-num-seqs", "16", "--max-model-len", "512", "--seed", "0", "--num-kv-blocks", "256")
EXPORT_TIMEOUT_S = 3.0


def start_instances(checkpoint: Path, log_dir: Path, roles: list[str]) -> list[ServerProcess]:
    def start(i_role):
        i, role = i_role
        extra = ("--role", role, "--kv-export-timeout", str(EXPORT_TIMEOUT_S)) if role != "mixed" else ()
        return ServerProcess(checkpoint, log_dir / f"{i}-{role}.log", *INSTANCE_ARGS, *extra)

    with ThreadPoolExecutor(len(roles)) as pool:
        return list(pool.map(start, enumerate(roles)))


class RouterProcess:
    def __init__(self, log_path: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 (closed in stop())
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ernie45.cli.main", "router", "--port", str(self.port), "--health-interval",
             "0.5", *args], stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the router exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the router did not become healthy:\n{self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def metrics(self) -> dict[str, float]:
        """Router series as {name{labels}: value} (histogram buckets left out)."""
        values = {}
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            match = re.match(r"^(ernie45:router_[a-z_]+(?:\{[^}]*\})?) (\S+)$", line)
            if match and "_bucket" not in match.group(1):
                values[match.group(1)] = float(match.group(2))
        return values

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


def disagg_info(server: ServerProcess) -> dict:
    return httpx.get(server.url + "/disagg/info", timeout=10).json()


def kv_segments_of(server: ServerProcess) -> list[str]:
    """Shared-memory KV segments (ernie45.disagg.shm) left by the instance's processes (the engine core is a
    child of the server process)."""
    pids = {server.process.pid}
    for task in Path(f"/proc/{server.process.pid}/task").glob("*"):
        try:
            pids.update(int(p) for p in (task / "children").read_text().split())
        except OSError:
            pass
    return [n for n in os.listdir("/dev/shm") if n.startswith("ernie45-kv-") and int(n.split("-")[2]) in pids]


def wait_pool_full(server: ServerProcess, timeout: float = 15.0) -> dict[str, float]:
    """The instance's metrics once every KV block is free again (exports fetched or expired, imports released)."""
    m = server.wait_idle(timeout)
    assert m["ernie45:num_free_kv_blocks"] == m["ernie45:num_kv_blocks"], m
    return m


__all__ = ["MODEL_NAME", "RouterProcess", "ServerProcess", "disagg_info", "kv_segments_of", "start_instances",
           "wait_pool_full"]
