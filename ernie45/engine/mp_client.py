"""`MPEngineClient`: the EngineClient whose core runs in its own process (`core_process.py`), as in vLLM v1.

The HTTP server's event loop, tokenization and media processing stay in this process; the model's steps run in the
core's, so neither waits for the other's GIL. A reader thread receives the core's messages and hands outputs to the
requests' asyncio queues. If the core process dies, every request in flight ends with EngineDeadError (the server
answers 503) within `_LIVENESS_POLL_MS`, and `is_running` turns False (the server's /health fails).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
import time

import zmq

from .client import EngineClient, EngineDeadError, ModelInfo
from .core_process import CoreLaunch, decode, encode, run_engine_core
from .input_processor import EnginePrompt, InputProcessor
from .sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_LIVENESS_POLL_MS = 200
_ERROR_TYPES = {"ValueError": ValueError}  # errors the core reports that mean "bad request" (HTTP 400)
# Start-up errors re-raised as themselves (the CLI reports these as the user's mistake: a wrong path, a bad config).
_STARTUP_ERROR_TYPES = {e.__name__: e for e in (FileNotFoundError, NotADirectoryError, ValueError)}


class MPEngineClient(EngineClient):
    def __init__(self, launch: CoreLaunch, tokenizer=None, startup_timeout: float = 900.0):
        """Starts the core process and waits until it has loaded the model (raises RuntimeError with the core's
        own error if it cannot). `tokenizer`: this side's tokenizer (default: loaded from the checkpoint)."""
        super().__init__()
        self._dir = tempfile.mkdtemp(prefix="ernie45-core-")  # 0700: only this user reaches the sockets
        self._context = zmq.Context()
        self._input = self._context.socket(zmq.PUSH)
        self._input.bind(f"ipc://{self._dir}/input")
        self._output = self._context.socket(zmq.PULL)
        self._output.bind(f"ipc://{self._dir}/output")
        self._send_lock = threading.Lock()  # sends come from the event loop and from shutdown()
        self._closed = False
        spawn = multiprocessing.get_context("spawn")  # a fork would copy this process's threads and sockets
        self.process = spawn.Process(
            target=run_engine_core, name="ernie45-engine-core", daemon=True,
            args=(launch, f"ipc://{self._dir}/input", f"ipc://{self._dir}/output", os.getpid()),
        )
        self.process.start()
        try:
            self.model_info, self._stats = self._wait_ready(startup_timeout)
            if tokenizer is None:
                from ..tokenizer import load_tokenizer

                tokenizer = load_tokenizer(launch.tokenizer or self.model_info.source_dir)
        except BaseException:
            self._stop_process(timeout=5.0)
            self._close_sockets()
            raise
        info = self.model_info
        self.inputs = InputProcessor(tokenizer, info.model_config, info.max_model_len, info.source_dir)
        self._reader = threading.Thread(target=self._read_outputs, name="ernie45-core-reader", daemon=True)
        self._reader.start()

    def _wait_ready(self, timeout: float) -> tuple[ModelInfo, dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._output.poll(_LIVENESS_POLL_MS):
                message = decode(self._output.recv())
                if message[0] == "ready":
                    return message[1], message[2]
                if message[0] == "failed":
                    _, error_type, text = message
                    if error_type in _STARTUP_ERROR_TYPES:
                        raise _STARTUP_ERROR_TYPES[error_type](text)
                    raise RuntimeError(f"the engine core could not start: {error_type}: {text}")
            elif not self.process.is_alive():
                raise RuntimeError(f"the engine core process exited with code {self.process.exitcode} before it "
                                   "was ready (its log is above)")
        raise RuntimeError(f"the engine core did not load the model within {timeout:.0f}s")

    # ------------------------------------------------------------------------------------- EngineClient
    def stats(self) -> dict[str, float | int]:
        return self._stats

    def _send_add(self, request_id: str, prompt: EnginePrompt, params: SamplingParams, arrival_time: float,
                  extra_keys: tuple) -> None:
        self._send(("add", request_id, prompt, params, arrival_time, extra_keys))

    def _send_abort(self, request_id: str) -> None:
        if self._dead is None:
            self._send(("abort", request_id))

    def _send(self, message: tuple) -> None:
        data = encode(message)
        with self._send_lock:
            if self._closed:
                raise EngineDeadError("the engine is shut down")
            self._input.send(data)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the core (it aborts what it still runs); requests in flight end with EngineDeadError."""
        with self._send_lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._input.send(encode(("shutdown",)), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        self._stop_process(timeout)
        self._reader.join(timeout=2 * _LIVENESS_POLL_MS / 1000 + 1)
        if self._dead is None:
            self._dead = EngineDeadError("the engine shut down")
        self._fail_all(self._dead)
        self._close_sockets()

    def _stop_process(self, timeout: float) -> None:
        self.process.join(timeout)
        if self.process.is_alive():
            logger.warning("the engine core did not stop within %.1fs; terminating it", timeout)
            self.process.terminate()
            self.process.join(5.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()

    def _close_sockets(self) -> None:
        self._input.close(linger=0)
        self._output.close(linger=0)
        self._context.term()
        shutil.rmtree(self._dir, ignore_errors=True)

    # ------------------------------------------------------------------------------------- reader thread
    def _read_outputs(self) -> None:
        while True:
            if self._output.poll(_LIVENESS_POLL_MS):
                self._dispatch(decode(self._output.recv()))
                continue
            if not self.process.is_alive():
                if not self._closed:
                    logger.error("the engine core process died (exit code %s)", self.process.exitcode)
                    self._dead = EngineDeadError(
                        f"the engine core process died (exit code {self.process.exitcode})")
                    self._fail_all(self._dead)
                return

    def _dispatch(self, message: tuple) -> None:
        kind = message[0]
        if kind == "outputs":
            _, outputs, self._stats = message
            for output in outputs:
                self._deliver(output.request_id, output)
        elif kind == "stats":
            self._stats = message[1]
        elif kind == "error":
            _, request_id, error_type, text = message
            self._deliver(request_id, _ERROR_TYPES.get(error_type, RuntimeError)(text))
        elif kind == "reply":  # an answer to a keyed control message (ernie45.disagg.routes)
            self._deliver(message[1], message[2])
