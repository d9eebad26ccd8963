"""`AsyncLLM`: the EngineClient whose core runs on a background thread of this process (notebooks, tests, and
where a second process is not wanted). `ernie45 serve` uses `MPEngineClient` instead, so the HTTP event loop and
the model never share a GIL.

The engine is touched only on its thread: coroutines process a request's input in place (so bad input fails at
once), then hand it over through a thread-safe inbox; outputs come back through each request's asyncio.Queue.
"""

from __future__ import annotations

import logging
import queue
import threading

from .client import EngineClient, EngineDeadError, ModelInfo
from .input_processor import EnginePrompt
from .llm_engine import LLMEngine
from .sampling_params import SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["AsyncLLM", "EngineDeadError"]


class AsyncLLM(EngineClient):
    def __init__(self, engine: LLMEngine):
        super().__init__()
        self.engine = engine
        self.model_info = ModelInfo.of_engine(engine)
        self.inputs = engine.inputs
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # ("add", ...) | ("abort", id)
        self._wakeup = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="ernie45-engine", daemon=True)
        self._thread.start()

    def stats(self) -> dict[str, float | int]:
        return self.engine.stats()  # plain ints and floats: safe to read from another thread

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still running are aborted and their streams end with EngineDeadError."""
        self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout)

    def _send_add(self, request_id: str, prompt: EnginePrompt, params: SamplingParams, arrival_time: float,
                  extra_keys: tuple) -> None:
        if self._stopped:
            raise EngineDeadError("the engine is shut down")
        self._send(("add", request_id, prompt, params, arrival_time, extra_keys))

    def _send_abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    # ------------------------------------------------------------------------------------- engine thread
    def _send(self, message: tuple) -> None:
        self._inbox.put(message)
        self._wakeup.set()

    def _drain_inbox(self) -> None:
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return
            if message[0] == "add":
                _, request_id, prompt, params, arrival_time, extra_keys = message
                if request_id not in self._subscribers:
                    continue  # the client left before the engine saw it
                try:
                    self.engine.add_request(request_id, prompt, params, arrival_time, extra_keys)
                except Exception as exc:  # noqa: BLE001 (e.g. a duplicate id: reported to that request only)
                    self._deliver(request_id, exc)
            else:
                self.engine.abort_request(message[1])

    def _run(self) -> None:
        while not self._stopped:
            self._drain_inbox()
            if not self.engine.has_unfinished_requests():
                self._wakeup.wait()
                self._wakeup.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a failed step must not take the server down: fail its requests, go on
                logger.exception("engine step failed; aborting the running requests")
                for request_id in list(self._subscribers):
                    self.engine.abort_request(request_id)
                    self._deliver(request_id, RuntimeError(f"engine step failed: {exc}"))
                continue
            for output in outputs:
                self._deliver(output.request_id, output)
        self._dead = EngineDeadError("the engine shut down")
        for request_id in list(self._subscribers):
            self.engine.abort_request(request_id)
        self._fail_all(self._dead)
